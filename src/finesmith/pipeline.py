"""The table of contents: config → data → model → train → evaluate → save."""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from finesmith.config import TrainConfig, save_config
from finesmith.data.cache import data_cache_key, load_tokenized, save_tokenized
from finesmith.data.formats import load_examples
from finesmith.data.template import load_chat_tokenizer, modules_for_new_tokens, resize_embeddings
from finesmith.data.validate import MIN_EXAMPLES, load_checked, refuse_sensitive
from finesmith.data.tokenize import TokenizedExample, tokenize_examples
from finesmith.errors import FinesmithError
from finesmith.evaluate.generate import stop_token_ids
from finesmith.evaluate.tasks import EvalOptions, EvalResult, evaluate_examples
from finesmith.data.pack import pack_batch, pack_bins, packing_efficiency, pad_batch
from finesmith.model.methods import (apply_method, check_method_supported, count_parameters, load_base_model,
                                     load_for_inference)
from finesmith.train.auto import resolve_auto
from finesmith.train.loop import LoopSettings, TrainResult, fit, seed_everything, steps_per_epoch
from finesmith.train.objectives import sft_loss, uses_virtual_tokens, virtual_sft_loss
from finesmith.train.optim import check_optimizer_supported
from finesmith.train.resume import check_same_run, find_resume_checkpoint
from finesmith.train.samples import SampleWriter
from finesmith.train.tracking import check_trackers_installed

console = Console(highlight=False)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TrainOutcome:
    output: Path
    result: TrainResult
    trainable: int
    total: int


def train(config: TrainConfig, overwrite: bool = False, resume: bool = False) -> TrainOutcome:
    """Run one fine-tuning job described by `config`; write everything to `config.output`.

    With `resume`, continue the run in `config.output` from its latest complete checkpoint.
    Raises `finesmith.train.loop.Preempted` (after saving a checkpoint) on SIGTERM/SIGINT.
    """
    # Everything that can fail without the model is checked before the (slow) model load.
    check_method_supported(config)
    check_optimizer_supported(config.optimizer)
    check_trackers_installed(config.report_to)
    output = Path(config.output)
    if resume:
        console.print(f"resuming from {find_resume_checkpoint(output)}")
    else:
        prepare_output(output, overwrite)
    tokenizer, added_tokens = load_chat_tokenizer(config.model, notify=console.print)
    train_set = prepare_data(tokenizer, config.data.path, config, "train")
    eval_set = prepare_data(tokenizer, config.eval_data, config, "eval") if config.eval_data else None
    config, chosen = resolve_auto(config, len(train_set))
    if chosen:
        console.print("auto settings: " + ", ".join(f"{k} {v:g}" for k, v in chosen.items()) +
                      f" (from {len(train_set)} examples, method {config.method})")
    if resume:
        check_same_run(output, config)
    base = load_base_model(config, str(pick_device()))
    config = fit_new_tokens(base, tokenizer, config, added_tokens)
    seed_everything(config.seed)  # adapter initialisation is random too
    model = apply_method(base, config)
    trainable, total = count_parameters(model)
    console.print(f"method {config.method}: {trainable:,} trainable parameters of {total:,} "
                  f"({100 * trainable / total:.2f}%)")
    settings = loop_settings(config, train_set, base.config)
    per_step = (f"bins of ≤{settings.pack_tokens} tokens" if settings.packing else "examples")
    console.print(f"{settings.total_steps} optimizer steps · {settings.batch_size if not settings.packing else 1}"
                  f"×{config.grad_accum} {per_step} per step · lr {settings.lr:g}")
    save_config(config, output / "config.yaml")
    virtual = uses_virtual_tokens(model)
    result = fit(model, train_set, settings, output, eval_set, objective=virtual_sft_loss if virtual else sft_loss,
                 collate=pad_batch if virtual else functools.partial(pack_batch, row_tokens=config.row_tokens),
                 resume=resume,
                 on_eval=sample_writer(tokenizer, config, output), run_config=config.to_dict())
    save_model(model, tokenizer, output)
    if result.skipped_steps:
        console.print(f"{result.skipped_steps} steps skipped because of non-finite loss or gradient")
    eval_text = f" · eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    console.print(f"done in {result.seconds:.0f}s · final loss {result.final_loss:.4f}{eval_text} · "
                  f"{result.tokens_per_second:.0f} tok/s · saved to {output}")
    return TrainOutcome(output, result, trainable, total)


def dry_run(config: TrainConfig) -> None:
    """Check the config and data as `train` would, print the predicted memory and time, train nothing.

    Raises FinesmithError (with the advisor's suggestion) when the run is predicted not to fit.
    """
    from finesmith.advise.dryrun import check_run

    check_method_supported(config)
    tokenizer, _ = load_chat_tokenizer(config.model, notify=console.print)
    train_set = prepare_data(tokenizer, config.data.path, config, "train")
    if config.eval_data:
        prepare_data(tokenizer, config.eval_data, config, "eval")
    config, _ = resolve_auto(config, len(train_set))
    check_run(config, train_set, console)


def prepare_output(output: Path, overwrite: bool) -> Path:
    """Create the run folder; refuse to mix a new run into an old one unless asked."""
    if (output / "config.yaml").exists():
        if not overwrite:
            raise FinesmithError(f"{output} already holds a run; choose another --output or pass --overwrite")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    return output


def fit_new_tokens(model: Any, tokenizer: Any, config: TrainConfig, added_tokens: list[str]) -> TrainConfig:
    """Resize the embeddings for tokens the chat-template fallback added; adapters then train those rows too."""
    if not added_tokens or not resize_embeddings(model, tokenizer):
        return config
    if config.method not in ("lora", "qlora"):
        return config
    extra = [m for m in modules_for_new_tokens(model) if m not in (config.lora.modules_to_save or [])]
    console.print(f"new tokens {', '.join(added_tokens)}: also training {', '.join(extra)} in full")
    return dataclasses.replace(config, lora=dataclasses.replace(
        config.lora, modules_to_save=list(config.lora.modules_to_save or []) + extra))


def prepare_data(tokenizer: Any, path: str, config: TrainConfig, name: str) -> list[TokenizedExample]:
    """Validate, tokenize and mask a data file, reusing the on-disk cache when nothing changed.

    Refuses invalid rows (or drops them with `skip_invalid`), sensitive data with
    `refuse_pii`, and preference pairs (not trainable yet), each with a one-line error.
    """
    if config.refuse_pii:
        refuse_sensitive(path)
    data = config.data
    key = data_cache_key(path, tokenizer, config.max_length, data.format, data.fields, config.truncation,
                         config.skip_invalid, config.max_invalid_fraction)
    cached = load_tokenized(key) if key else None
    if cached:
        tokenized, stats = cached
    else:
        examples = load_checked(path, data.format, data.fields, skip_invalid=config.skip_invalid,
                                max_invalid_fraction=config.max_invalid_fraction,
                                min_examples=MIN_EXAMPLES if name == "train" else 1,
                                notify=lambda line: console.print(line, markup=False))
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
    console.print(f"{name} data {path}: {stats.examples} examples, {stats.tokens:,} tokens, "
                  f"{stats.supervised_tokens:,} trained" + (f" ({'; '.join(notes)})" if notes else ""))
    if not tokenized:
        raise FinesmithError(f"{path}: no trainable examples left; raise max_length (now {config.max_length}) or check the data")
    return tokenized


def loop_settings(config: TrainConfig, train_set: list[TokenizedExample], model_config: Any = None) -> LoopSettings:
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
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch(n_micro, config.grad_accum)))
    return LoopSettings(
        lr=config.resolved_lr(), total_steps=total, batch_size=config.batch_size, grad_accum=config.grad_accum,
        warmup_steps=math.ceil(config.warmup_ratio * total), weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, seed=config.seed, log_every=config.log_every,
        eval_every=config.eval_every, packing=config.packing, pack_tokens=config.resolved_pack_tokens(),
        save_every=config.save_every, keep_checkpoints=config.keep_checkpoints, max_bad_steps=config.max_bad_steps,
        early_stopping_patience=config.early_stopping_patience, optimizer=config.optimizer,
        embedding_lr_ratio=config.embedding_lr_ratio,
        report_to=tuple(config.report_to), **utilisation_inputs(model_config, config, train_set))


def utilisation_inputs(model_config: Any, config: TrainConfig, train_set: list[TokenizedExample]) -> dict[str, float]:
    """FLOPs per token and the GPU's dense peak, so the log can show MFU (CUDA only)."""
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
    examples = load_examples(config.eval_data)[:config.sample_prompts]
    return SampleWriter(tokenizer, examples, output / "samples.jsonl", config.sample_max_new_tokens)


def save_model(model: Any, tokenizer: Any, output: Path) -> None:
    """Adapter (PEFT) or full weights as safetensors, plus the tokenizer and stop tokens."""
    model.save_pretrained(output, safe_serialization=True)
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
    net, tokenizer = loaded or load_for_inference(model, adapter, str(pick_device()))
    return evaluate_examples(net, tokenizer, examples, pool, options)
