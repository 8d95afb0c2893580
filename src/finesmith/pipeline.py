"""The table of contents: config → data → model → train → evaluate → save."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from finesmith.config import TrainConfig, save_config
from finesmith.data.formats import load_examples
from finesmith.data.tokenize import TokenizedExample, tokenize_examples
from finesmith.errors import FinesmithError
from finesmith.evaluate.generate import stop_token_ids
from finesmith.evaluate.tasks import AccuracyResult, evaluate_accuracy
from finesmith.model.load import load_model, load_tokenizer
from finesmith.model.methods import apply_method, count_parameters, load_for_inference
from finesmith.train.loop import LoopSettings, TrainResult, fit, steps_per_epoch

console = Console(highlight=False)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TrainOutcome:
    output: Path
    result: TrainResult
    trainable: int
    total: int


def train(config: TrainConfig, overwrite: bool = False) -> TrainOutcome:
    """Run one fine-tuning job described by `config`; write everything to `config.output`."""
    output = prepare_output(Path(config.output), overwrite)
    tokenizer = load_tokenizer(config.model)
    train_set = prepare_data(tokenizer, config.data, config, "train")
    eval_set = prepare_data(tokenizer, config.eval_data, config, "eval") if config.eval_data else None
    model = apply_method(load_model(config.model, str(pick_device())), config)
    trainable, total = count_parameters(model)
    console.print(f"method {config.method}: {trainable:,} trainable parameters of {total:,} "
                  f"({100 * trainable / total:.2f}%)")
    settings = loop_settings(config, len(train_set))
    console.print(f"{settings.total_steps} optimizer steps · {config.batch_size}×{config.grad_accum} "
                  f"examples per step · lr {settings.lr:g}")
    save_config(config, output / "config.yaml")
    result = fit(model, train_set, settings, output, eval_set)
    save_model(model, tokenizer, output)
    eval_text = f" · eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    console.print(f"done in {result.seconds:.0f}s · final loss {result.final_loss:.4f}{eval_text} · "
                  f"{result.tokens_per_second:.0f} tok/s · saved to {output}")
    return TrainOutcome(output, result, trainable, total)


def prepare_output(output: Path, overwrite: bool) -> Path:
    """Create the run folder; refuse to mix a new run into an old one unless asked."""
    if (output / "config.yaml").exists():
        if not overwrite:
            raise FinesmithError(f"{output} already holds a run; choose another --output or pass --overwrite")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    return output


def prepare_data(tokenizer: Any, path: str, config: TrainConfig, name: str) -> list[TokenizedExample]:
    examples = load_examples(path)
    tokenized, stats = tokenize_examples(tokenizer, examples, config.max_length, config.truncation)
    notes = []
    if stats.truncated:
        notes.append(f"{stats.truncated} truncated to {config.max_length} tokens")
    if stats.dropped:
        notes.append(f"{stats.dropped} dropped (over max_length or nothing to train)")
    console.print(f"{name} data {path}: {stats.examples} examples, {stats.tokens:,} tokens, "
                  f"{stats.supervised_tokens:,} trained" + (f" ({'; '.join(notes)})" if notes else ""))
    if not tokenized:
        raise FinesmithError(f"{path}: no trainable examples left; raise max_length (now {config.max_length}) or check the data")
    return tokenized


def loop_settings(config: TrainConfig, n_examples: int) -> LoopSettings:
    per_epoch = steps_per_epoch(n_examples, config.batch_size, config.grad_accum)
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    return LoopSettings(
        lr=config.resolved_lr(), total_steps=total, batch_size=config.batch_size, grad_accum=config.grad_accum,
        warmup_steps=math.ceil(config.warmup_ratio * total), weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, seed=config.seed, log_every=config.log_every,
        eval_every=config.eval_every)


def save_model(model: Any, tokenizer: Any, output: Path) -> None:
    """Adapter (PEFT) or full weights as safetensors, plus the tokenizer and stop tokens."""
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.generation_config is not None and not hasattr(model, "peft_config"):
        base.generation_config.eos_token_id = stop_token_ids(tokenizer)
        base.generation_config.pad_token_id = tokenizer.pad_token_id
        base.generation_config.save_pretrained(output)


def evaluate(model: str, data: str, adapter: str | None = None, shots: int = 0, shots_from: str | None = None,
             seed: int = 42, limit: int | None = None, max_new_tokens: int = 32, batch_size: int = 16,
             loaded: tuple[Any, Any] | None = None) -> AccuracyResult:
    """Accuracy of a base model, adapter or fine-tuned run on a held-out file."""
    if shots and not shots_from:
        raise FinesmithError("--shots needs --shots-from TRAIN.jsonl to draw the examples from")
    examples = load_examples(data)[:limit]
    pool = load_examples(shots_from) if shots and shots_from else []
    net, tokenizer = loaded or load_for_inference(model, adapter, str(pick_device()))
    return evaluate_accuracy(net, tokenizer, examples, shots, pool, seed, max_new_tokens, batch_size)
