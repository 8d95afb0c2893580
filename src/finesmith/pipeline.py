"""The table of contents: config → data → model → train → evaluate → save.

`train` writes the run record (`run.json`, see `finesmith.run`) before the first step and
updates it when the run ends; every later command reads the run through that record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finesmith.config import PREFERENCE_OBJECTIVES, PROMPT_METHODS, TrainConfig, save_config
from finesmith.core.console import console
from finesmith.core.device import pick_device
from finesmith.core.templates import stop_token_ids
from finesmith.data.cache import data_cache_key, load_tokenized, save_tokenized
from finesmith.data.formats import PreferenceExample, load_examples
from finesmith.data.pack import pack_bins, packing_efficiency
from finesmith.data.pairs import tokenize_groups
from finesmith.data.tokenize import TokenizedExample, tokenize_examples
from finesmith.data.template import install_thinking, installed_thinking
from finesmith.data.tool_templates import install_tool_format
from finesmith.data.validate import MIN_EXAMPLES, load_checked, refuse_sensitive
from finesmith.errors import FinesmithError
from finesmith.evaluate.tasks import EvalOptions, EvalResult, evaluate_examples
from finesmith.folders import fresh_folder
from finesmith.model.load import embedding_module_names, load_chat_tokenizer, model_fingerprint, resize_embeddings
from finesmith.model.methods import (Method, apply_method, check_method_supported, count_parameters, get_method,
                                     keep_trained_in_fp32, load_base_model, load_for_inference, trained_in_full)
from finesmith.model.attention import resolve_attention, use_varlen
from finesmith.run import RunRecord, versions, write_record
from finesmith.train import distributed
from finesmith.train.auto import resolve_auto
from finesmith.train.loop import LoopSettings, Preempted, TrainResult, fit, seed_everything, steps_per_epoch
from finesmith.train.optim import check_optimizer_supported
from finesmith.train.resume import check_same_run, find_resume_checkpoint, resumed_schedule
from finesmith.train.samples import SampleWriter
from finesmith.train.tracking import check_trackers_installed

__all__ = ["TrainOutcome", "console", "dry_run", "evaluate", "pick_device", "train"]


@dataclass
class TrainOutcome:
    output: Path
    result: TrainResult
    trainable: int
    total: int


@dataclass
class PreparedData:
    """Tokenized examples and what identifies them in the run record."""

    examples: list[TokenizedExample]
    fingerprint: dict[str, Any]


def train(config: TrainConfig, overwrite: bool = False, resume: bool = False, extend: bool = False) -> TrainOutcome:
    """Run one fine-tuning job described by `config`; write everything to `config.output`.

    With `resume`, continue the run in `config.output` from its latest complete checkpoint
    (refused when the model, data, settings or horizon differ; `extend` allows a longer
    horizon). Raises `finesmith.train.loop.Preempted` (after saving a checkpoint) on SIGTERM/SIGINT.
    """
    # Everything that can fail without the model is checked before the (slow) model load.
    method = get_method(config.method)
    check_method_supported(config)
    check_optimizer_supported(config.optimizer)
    check_trackers_installed(config.report_to)
    output = Path(config.output)
    world = distributed.world_from_env()
    check_world(config, world)
    if not world.main:
        console.quiet = True  # rank 0 speaks for the run
    previous = find_resume_checkpoint(output, extend) if resume else None
    if previous:
        console.print(f"resuming from {previous[1]}")
    with distributed.one_at_a_time("prepare-data"):  # the first rank tokenizes, the others read its cache
        tokenizer, added_tokens = load_chat_tokenizer(config.model, notify=console.print)
        hermes = apply_tool_format(tokenizer, config.tool_format, config.thinking)
        prepare = prepare_prompts if config.objective == "grpo" else prepare_data
        train_data = prepare(tokenizer, config.data.path, config, "train")
        eval_data = prepare(tokenizer, config.eval_data, config, "eval") if config.eval_data else None
    device = distributed.init(world) if world.distributed else pick_device()
    config, chosen = resolve_auto(config, len(train_data.examples))
    if chosen:
        console.print("auto settings: " + ", ".join(f"{k} {v:g}" for k, v in chosen.items()) +
                      f" (from {len(train_data.examples)} examples, method {config.method})")
    settings = loop_settings(config, train_data.examples)
    record = new_record(config, method, tokenizer, added_tokens, train_data, eval_data, settings)
    if hermes:
        record.tokenizer["template_source"] += "+hermes-tools"
    if previous:
        run, checkpoint = previous
        check_same_run(run.record, record, output)
        record.schedule = resumed_schedule(run.record.schedule, settings.total_steps, checkpoint_step(checkpoint),
                                           extend, output)
        record.created = run.record.created
        settings = dataclasses.replace(settings, planned_steps=record.schedule["planned_steps"],
                                       warmup_steps=record.schedule["warmup_steps"], extensions=tuple(tuple(e) for e in record.schedule.get("extensions", [])))
    elif world.main:
        prepare_output(output, overwrite)
    distributed.barrier()
    base = load_base_model(config, str(device))
    trained_config = fit_new_tokens(base, tokenizer, config, added_tokens)
    seed_everything(config.seed)  # adapter initialisation is random too
    model = keep_trained_in_fp32(apply_method(base, trained_config))
    trainable, total = count_parameters(model)
    console.print(f"method {config.method}: {trainable:,} trainable parameters of {total:,} "
                  f"({100 * trainable / total:.2f}%)")
    settings = dataclasses.replace(settings, **utilisation_inputs(base.config, config, train_data.examples))
    per_step = (f"bins of ≤{settings.pack_tokens} tokens" if settings.packing else "examples")
    console.print(f"{settings.total_steps} optimizer steps · {settings.batch_size if not settings.packing else 1}"
                  f"×{config.grad_accum} {per_step} per step · lr {settings.lr:g}")
    record.method["trained_in_full"] = trained_in_full(model) or (["all"] if config.method == "full" else [])
    record.tokenizer["vocab_size"] = int(base.get_input_embeddings().num_embeddings)
    record.world_size, record.parallelism = world.size, settings.parallelism
    if world.main:
        write_record(output, record)
        save_config(trained_config, output / "config.yaml")
    if config.objective == "grpo":  # the sampler is the batch layout: it needs the model and the rewards
        objective = build_grpo(model, tokenizer, config)
    else:
        objective = method.objective(config.objective, config.preference)
    attention = resolve_attention(config.attention, device)
    if attention == "varlen" and (config.objective != "sft" or method.layout != "packed"):
        attention = "dense"  # preference tries need their ancestor masks; virtual tokens need padded rows
    if attention == "varlen":
        use_varlen(model)
    collate = (objective.collate if config.objective == "grpo" else
               method.collate(config.row_tokens, config.objective, config.preference.share_prompt, attention))
    if config.compile:
        compile_body(model)
    if getattr(objective, "needs_reference", False):
        train_data.examples[:] = with_reference(model, train_data, collate, config)
        if eval_data:
            eval_data.examples[:] = with_reference(model, eval_data, collate, config)
    try:
        result = fit(model, train_data.examples, settings, output, eval_data.examples if eval_data else None,
                     objective=objective, collate=collate, resume=resume,
                     on_eval=sample_writer(tokenizer, config, output), run_config=trained_config.to_dict())
    except Preempted as stopped:
        record.state, record.result = "preempted", {"steps": stopped.step, "checkpoint": str(stopped.checkpoint)}
        if world.main:
            write_record(output, record)
        raise
    except BaseException as exc:
        record.state, record.error = "failed", (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        if world.main:
            write_record(output, record)
        raise
    if attention == "varlen":  # saved models load with the standard attention
        (model.get_base_model() if hasattr(model, "get_base_model") else model).set_attn_implementation("sdpa")
    gathered = distributed.gathered_weights(model, trainable_only=False) if distributed.is_sharded(model) else None
    if world.main:  # under FSDP2 the full weights were gathered to rank 0, once
        save_model(model, tokenizer, output, gathered)
    record.state, record.resumable = "finished", not result.restored_best
    record.result = {"steps": result.steps, "final_loss": result.final_loss, "eval_loss": result.eval_loss,
                     "best_step": result.best_step, "best_eval_loss": result.best_eval_loss,
                     "restored_best": result.restored_best, "stopped_early": result.stopped_early,
                     "skipped_steps": result.skipped_steps, "seconds": round(result.seconds, 2),
                     "tokens_per_second": round(result.tokens_per_second, 1)}
    if world.main:
        write_record(output, record)
        report_outcome(result, output)
    distributed.finish()
    return TrainOutcome(output, result, trainable, total)


def check_world(config: TrainConfig, world: distributed.World) -> None:
    """Refuse settings that cannot give every rank its share of each micro-batch, or cannot shard."""
    if not world.distributed:
        return
    if config.packing:
        raise FinesmithError(f"packing: true gives one bin per micro-batch, which cannot be split over {world.size} "
                             "processes; set packing: false (batches are packed padding-free anyway)")
    mode = distributed.parallelism(config.parallelism, config.method, world)
    if mode == "fsdp" and config.optimizer != "adamw":
        raise FinesmithError(f"optimizer {config.optimizer} keeps state FSDP2 cannot shard; use optimizer: adamw "
                             "with parallelism: fsdp (its state is sharded anyway), or parallelism: ddp")
    if mode == "fsdp" and config.objective == "grpo":
        raise FinesmithError("objective grpo samples different answers on each process, which FSDP2's shared "
                             "forward passes cannot do; use parallelism: ddp")
    if mode == "fsdp" and config.method in PROMPT_METHODS:
        raise FinesmithError(f"method {config.method} trains a few virtual tokens: there is nothing to shard; "
                             "use parallelism: ddp (or auto)")
    if isinstance(config.batch_size, int) and config.batch_size < world.size:
        raise FinesmithError(f"batch_size {config.batch_size} is smaller than the {world.size} processes: every "
                             f"process needs at least one example per micro-batch; set batch_size to {world.size} "
                             "or more (it is the global micro-batch)")


def with_reference(model: Any, data: PreparedData, collate: Any, config: TrainConfig) -> list[Any]:
    """The groups with their reference log-probabilities: from the cache when this model and
    these tokens were scored before (e.g. on resume), else one no-grad pass now."""
    from finesmith.data.cache import load_reference, save_reference
    from finesmith.train.preference import reference_logps

    key = hashlib.sha256(f"{data.fingerprint['tokens_sha256']}:{model_fingerprint(config.model)}".encode()).hexdigest()[:32]
    reference = load_reference(key, len(data.examples))
    if reference is None:
        console.print(f"reference log-probabilities: one pass over {len(data.examples)} examples "
                      "(the model before training)")
        reference = reference_logps(model, data.examples, collate, config.batch_size if isinstance(
            config.batch_size, int) else 8)
        save_reference(key, reference)
    else:
        console.print("reference log-probabilities from cache")
    return [dataclasses.replace(g, reference=tuple(r)) for g, r in zip(data.examples, reference)]


def report_outcome(result: TrainResult, output: Path) -> None:
    if result.skipped_steps:
        console.print(f"{result.skipped_steps} steps skipped because of non-finite loss or gradient")
    if result.stopped_early:
        console.print(f"early stop at step {result.steps}: no eval improvement since step {result.best_step}")
    if result.restored_best:
        console.print(f"ended with the best weights: step {result.best_step} (eval loss {result.best_eval_loss:.4f})")
    eval_text = f" · eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    console.print(f"done in {result.seconds:.0f}s · final loss {result.final_loss:.4f}{eval_text} · "
                  f"{result.tokens_per_second:.0f} tok/s · saved to {output}")


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("-")[-1])


def new_record(config: TrainConfig, method: Method, tokenizer: Any, added_tokens: list[str], train_data: PreparedData,
               eval_data: PreparedData | None, settings: LoopSettings) -> RunRecord:
    """The run record as known before the model is loaded (the model fills in the rest)."""
    return RunRecord(
        config=config.to_dict(),
        base_model={"spec": portable_spec(config.model), "fingerprint": model_fingerprint(config.model)},
        tokenizer={"added_tokens": list(added_tokens), "vocab_size": len(tokenizer),
                   "template_source": "chatml" if added_tokens or _is_fallback(tokenizer) else "model",
                   "thinking": config.thinking},
        method={"name": method.name, "adapter": method.adapter, "layout": method.layout,
                "mergeable": method.mergeable, "trained_in_full": []},
        data={"train": train_data.fingerprint, **({"eval": eval_data.fingerprint} if eval_data else {})},
        schedule={"planned_steps": settings.total_steps, "total_steps": settings.total_steps,
                  "warmup_steps": settings.warmup_steps, "lr": settings.lr, "extensions": []},
        versions=versions())


def _is_fallback(tokenizer: Any) -> bool:
    from finesmith.core.templates import CHATML_TEMPLATE

    return getattr(tokenizer, "chat_template", None) == CHATML_TEMPLATE


def apply_tool_format(tokenizer: Any, tool_format: str, thinking: str = "auto") -> bool:
    """Install the Hermes tool rendering when asked for and needed, and the thinking setting
    (`finesmith.data.template.install_thinking`); say so. True when the Hermes rendering was installed."""
    if install_thinking(tokenizer, thinking):
        console.print(f"thinking {thinking}: the chat template is fixed to "
                      f"{'think before answering' if thinking == 'on' else 'answer without thinking'}, "
                      "in training and in every later use of this run")
    installed = install_tool_format(tokenizer, tool_format)
    if installed:
        console.print("tool_format hermes: tools, tool calls and tool results are rendered as text "
                      "(<tools>, <tool_call>, <tool_response>) inside the model's chat template")
    elif tool_format == "hermes":
        console.print("tool_format hermes: the model's chat template renders tools itself; it is used as is")
    return installed


def portable_spec(spec: str) -> str:
    """A model spec that still names the same model from another folder: local paths made absolute."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def dry_run(config: TrainConfig) -> None:
    """Check the config and data as `train` would, print the predicted memory and time, train nothing.

    Raises FinesmithError (with the advisor's suggestion) when the run is predicted not to fit.
    """
    from finesmith.advise.dryrun import check_run

    check_method_supported(config)
    tokenizer, _ = load_chat_tokenizer(config.model, notify=console.print)
    apply_tool_format(tokenizer, config.tool_format, config.thinking)
    train_data = prepare_data(tokenizer, config.data.path, config, "train")
    if config.eval_data:
        prepare_data(tokenizer, config.eval_data, config, "eval")
    config, _ = resolve_auto(config, len(train_data.examples))
    check_run(config, train_data.examples, console)


def prepare_output(output: Path, overwrite: bool) -> Path:
    """Create the run folder; never mix a new run into an old one, never delete what finesmith did not write."""
    return fresh_folder(output, overwrite)


def fit_new_tokens(model: Any, tokenizer: Any, config: TrainConfig, added_tokens: list[str]) -> TrainConfig:
    """Resize the embeddings for tokens the chat-template fallback added; adapters then train those rows too."""
    if not added_tokens or not resize_embeddings(model, len(tokenizer)):
        return config
    if config.method not in ("lora", "qlora"):
        return config
    extra = [m for m in embedding_module_names(model) if m not in (config.lora.modules_to_save or [])]
    console.print(f"new tokens {', '.join(added_tokens)}: also training {', '.join(extra)} in full")
    return dataclasses.replace(config, lora=dataclasses.replace(
        config.lora, modules_to_save=list(config.lora.modules_to_save or []) + extra))


def prepare_data(tokenizer: Any, path: str, config: TrainConfig, name: str) -> PreparedData:
    """Validate, tokenize and mask a data file, reusing the on-disk cache when nothing changed.

    Refuses invalid rows (or drops them with `skip_invalid`), sensitive data with
    `refuse_pii`, and preference pairs (not trainable yet), each with a one-line error.
    """
    if config.refuse_pii:
        refuse_sensitive(path, config.data.format, config.data.fields)
    data = config.data
    key = data_cache_key(path, tokenizer, config.max_length, data.format, data.fields, config.truncation,
                         config.skip_invalid, config.max_invalid_fraction)
    preference = config.objective in PREFERENCE_OBJECTIVES
    if preference:
        key = None  # pairs are tokenized afresh (the cache holds SFT sequences)
    cached = load_tokenized(key) if key else None
    if cached:
        tokenized, stats = cached
    else:
        examples = load_checked(path, data.format, data.fields, skip_invalid=config.skip_invalid,
                                max_invalid_fraction=config.max_invalid_fraction,
                                min_examples=MIN_EXAMPLES if name == "train" else 1,
                                notify=lambda line: console.print(line, markup=False))
        if preference:
            tokenized, stats = tokenize_groups(tokenizer, examples, config.max_length, config.truncation,
                                               unpaired=config.objective == "kto")
        else:
            tokenized, stats = tokenize_examples(tokenizer, examples, config.max_length, config.truncation)
        if key and tokenized:
            save_tokenized(key, tokenized, stats)
    notes = ["tokenized data from cache"] if cached else []
    if stats.truncated:
        notes.append(f"{stats.truncated} truncated to {config.max_length} tokens")
    if stats.dropped:
        notes.append(f"{stats.dropped} dropped (over max_length or nothing to train)")
    if stats.split:
        notes.append(f"{stats.split} documents split into {config.max_length}-token windows")
    unit = {"kto": "feedback examples"}.get(config.objective, "pairs") if preference else "examples"
    console.print(f"{name} data {path}: {stats.examples} {unit}, {stats.tokens:,} tokens, "
                  f"{stats.supervised_tokens:,} trained" + (f" ({'; '.join(notes)})" if notes else ""))
    if not tokenized:
        raise FinesmithError(f"{path}: no trainable examples left; raise max_length (now {config.max_length}) or check the data")
    return PreparedData(tokenized, {"path": portable_spec(path), "cache_key": key, "examples": len(tokenized),
                                    "tokens": stats.tokens, "tokens_sha256": tokens_fingerprint(tokenized)})


def prepare_prompts(tokenizer: Any, path: str, config: TrainConfig, name: str) -> PreparedData:
    """The prompts of an SFT-shaped file for reinforcement fine-tuning (`objective: grpo`)."""
    from finesmith.train.grpo import load_prompts

    prompts = load_prompts(tokenizer, path, config.data.format, config.data.fields, config.max_length)
    if name == "train" and len(prompts) < MIN_EXAMPLES:
        raise FinesmithError(f"{path}: only {len(prompts)} prompts; at least {MIN_EXAMPLES} are needed")
    if not prompts:
        raise FinesmithError(f"{path}: no prompts found")
    with_reference = sum(p.fields.get("reference") is not None for p in prompts)
    console.print(f"{name} data {path}: {len(prompts)} prompts ({with_reference} with a reference answer)")
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(np.asarray(p.prompt_ids, dtype=np.int64).tobytes() + b"|")
        digest.update(json.dumps(p.fields, sort_keys=True, default=str).encode() + b"|")
    return PreparedData(prompts, {"path": portable_spec(path), "cache_key": None, "examples": len(prompts),
                                  "tokens": sum(len(p) for p in prompts), "tokens_sha256": digest.hexdigest()})


def build_grpo(model: Any, tokenizer: Any, config: TrainConfig) -> Any:
    """The GRPO sampler and objective for `model`, with the config's reward functions."""
    from finesmith.train.grpo import GRPO
    from finesmith.train.rewards import load_rewards

    specs = [config.reward] if isinstance(config.reward, str) else list(config.reward)
    rewards = load_rewards(specs, config.reward_weights)
    return GRPO(model, tokenizer, config.grpo, rewards)


def tokens_fingerprint(examples: list[TokenizedExample]) -> str:
    """SHA-256 of the tokens and masks in order: identifies exactly the data a run trained on."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        digest.update(np.packbits(np.asarray(ex.supervised, dtype=bool)).tobytes() + b"|")
    return digest.hexdigest()


def loop_settings(config: TrainConfig, train_set: list[TokenizedExample]) -> LoopSettings:
    """Loop settings from a config whose `auto` values are resolved (see `resolve_auto`)."""
    if config.packing:
        lengths = [len(ex) for ex in train_set]
        bins = pack_bins(lengths, config.resolved_pack_tokens())
        console.print(f"packing: {len(lengths)} examples into {len(bins)} bins of ≤{config.resolved_pack_tokens()} "
                      f"tokens · efficiency {packing_efficiency(lengths, bins, config.resolved_pack_tokens()):.1%} "
                      "(real tokens / slots)")
        n_micro = len(bins)
    else:
        n_micro = math.ceil(len(train_set) / config.batch_size)
    repeat = config.grpo.iterations if config.objective == "grpo" else 1  # steps per batch of samples
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch(n_micro, config.grad_accum) * repeat))
    return LoopSettings(
        lr=config.resolved_lr(), total_steps=total, batch_size=config.batch_size, grad_accum=config.grad_accum,
        warmup_steps=math.ceil(config.warmup_ratio * total), weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, seed=config.seed, log_every=config.log_every,
        eval_every=config.eval_every, packing=config.packing, pack_tokens=config.resolved_pack_tokens(),
        save_every=config.save_every, keep_checkpoints=config.keep_checkpoints, max_bad_steps=config.max_bad_steps,
        early_stopping_patience=config.early_stopping_patience, optimizer=config.optimizer,
        embedding_lr_ratio=config.embedding_lr_ratio, precision=config.precision,
        report_to=tuple(config.report_to),
        parallelism=distributed.parallelism(config.parallelism, config.method, distributed.world_from_env()),
        repeat=repeat)


def compile_body(model: Any) -> None:
    """`torch.compile` the decoder body in place, with dynamic shapes so that packed rows of a
    new length do not trigger a recompile (the LM head and loss stay eager: their shapes
    change with the trained positions)."""
    import torch

    from finesmith.train.objectives import body_and_head

    parts = body_and_head(model)
    if parts is None:
        raise FinesmithError("compile: true needs a causal LM with a separate body and LM head; set compile: false")
    parts[0].compile(dynamic=True, backend=os.environ.get("FINESMITH_COMPILE_BACKEND", "inductor"))
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def utilisation_inputs(model_config: Any, config: TrainConfig, train_set: list[TokenizedExample]) -> dict[str, float]:
    """FLOPs per token and the GPU's dense peak, so the log can show MFU (CUDA only)."""
    import torch

    from finesmith.advise.model_shape import ModelShape
    from finesmith.advise.timing import GPU_PEAK_FLOPS, flops_per_token, gpu_family

    family = gpu_family(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    if model_config is None or family is None:
        return {}
    shape = ModelShape.from_config_dict(model_config.to_dict())
    context = sum(len(ex) for ex in train_set) / max(1, len(train_set))
    return {"flops_per_token": flops_per_token(shape, config.method, int(context)), "peak_flops": GPU_PEAK_FLOPS[family]}


def sample_writer(tokenizer: Any, config: TrainConfig, output: Path) -> SampleWriter | None:
    """Greedy samples for the first `sample_prompts` eval examples at every eval, if asked for."""
    if not (config.sample_prompts and config.eval_data):
        return None
    examples = [as_conversation(ex) for ex in load_examples(config.eval_data)[:config.sample_prompts]]
    return SampleWriter(tokenizer, examples, output / "samples.jsonl", config.sample_max_new_tokens)


def as_conversation(example: Any) -> Any:
    """A preference pair or feedback row as a conversation ending in its preferred answer (for samples)."""
    from finesmith.data.formats import Example, FeedbackExample, PreferenceExample

    if isinstance(example, PreferenceExample):
        return Example(example.prompt + ({"role": "assistant", "content": example.chosen},), example.source)
    if isinstance(example, FeedbackExample):
        return Example(example.prompt + ({"role": "assistant", "content": example.completion},), example.source)
    return example


def save_model(model: Any, tokenizer: Any, output: Path, state_dict: dict[str, Any] | None = None) -> None:
    """Adapter (PEFT) or full weights as safetensors (`state_dict`: the gathered weights of a
    sharded model), plus the tokenizer and stop tokens."""
    model.save_pretrained(output, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    tokenizer.save_pretrained(output)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.generation_config is not None and not hasattr(model, "peft_config"):
        base.generation_config.eos_token_id = stop_token_ids(tokenizer)
        base.generation_config.pad_token_id = tokenizer.pad_token_id
        base.generation_config.save_pretrained(output)


def evaluate(model: str, data: str, adapter: str | None = None, shots_from: str | None = None,
             options: EvalOptions | None = None, limit: int | None = None,
             loaded: tuple[Any, Any] | None = None) -> EvalResult:
    """Evaluate a base model, adapter or fine-tuned run on a held-out file (see `EvalOptions`)."""
    options = (options or EvalOptions()).validate()
    if options.shots and not shots_from:
        raise FinesmithError("--shots needs --shots-from TRAIN.jsonl to draw the examples from")
    examples = load_examples(data)[:limit]
    pool = load_examples(shots_from) if options.shots and shots_from else []
    net, tokenizer = loaded or load_for_inference(model, adapter, str(pick_device()), options.precision)
    if options.thinking != "auto" and installed_thinking(tokenizer) != options.thinking:
        install_thinking(tokenizer, options.thinking)
    if examples and all(isinstance(ex, PreferenceExample) for ex in examples):
        from finesmith.evaluate.preference import evaluate_preferences

        return evaluate_preferences(net, tokenizer, examples, beta=run_beta(model))
    return evaluate_examples(net, tokenizer, examples, pool, options)


def run_beta(spec: str) -> float:
    """The run's `preference.beta` (for implicit rewards), or the default for anything else."""
    from finesmith.run import has_record, load_run

    if Path(spec).is_dir() and has_record(Path(spec)):
        return float(load_run(spec).record.config.get("preference", {}).get("beta", 0.1))
    return 0.1
