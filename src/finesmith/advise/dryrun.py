"""`finesmith train --dry-run`: predict a run's memory and time, refuse one that cannot fit."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from finesmith.advise.datastats import stats_of
from finesmith.advise.hardware import GIB, detect_hardware
from finesmith.advise.memory import MemoryEstimate, RunShape, estimate_memory
from finesmith.advise.model_shape import read_model_shape
from finesmith.advise.rules import HEADROOM, LABELS, Plan, recommend, size_approach
from finesmith.data.tokenize import TokenizedExample
from finesmith.errors import FinesmithError

DEFAULT_BATCH = 8  # what `batch_size: auto` is planned with


def check_run(config: Any, train_set: Sequence[TokenizedExample], console: Console) -> MemoryEstimate:
    """Print the predicted peak memory and time of `config`; raise when it cannot fit.

    Args:
        config: the resolved TrainConfig.
        train_set: its tokenized training examples.
        console: where to print.
    Returns:
        The MemoryEstimate.
    Raises:
        FinesmithError: the run is predicted not to fit; the message carries the advisor's suggestion.
    """
    hardware, shape, stats = detect_hardware(), read_model_shape(config.model), stats_of(train_set)
    batch = config.batch_size if isinstance(config.batch_size, int) else DEFAULT_BATCH
    tokens, supervised = stats.largest_batch(batch)
    if getattr(config, "packing", False):
        share = supervised / max(1, tokens)
        tokens = config.resolved_pack_tokens()
        supervised = int(tokens * share)
    checkpointing = bool(getattr(config, "gradient_checkpointing", False))
    run = RunShape(config.method, tokens, supervised, hardware.device, checkpointing,
                   lora_r=config.lora.r, lora_dropout=config.lora.dropout,
                   virtual_tokens=getattr(getattr(config, "prompt", None), "virtual_tokens", 20),
                   optimizer=getattr(config, "optimizer", "adamw"))
    memory = estimate_memory(shape, run)
    plan = Plan(hardware, shape, stats, batch_size=batch, checkpointing=checkpointing)

    time = size_approach(plan, config.method, config.method).time
    usable = int(hardware.training_memory * HEADROOM)
    parts = " + ".join(f"{k} {v / GIB:.2f}" for k, v in memory.components.items() if v >= 0.005 * GIB)
    console.print(f"dry run: {hardware.describe()}")
    console.print(f"dry run: {config.method} on {shape.name}, {stats.examples} examples, largest micro-batch {tokens} tokens")
    console.print(f"dry run: predicted peak memory {memory.peak / GIB:.2f} GiB of {usable / GIB:.2f} GiB usable ({parts} GiB)")
    if time is not None:
        console.print(f"dry run: about {time.seconds_per_epoch / 60:.1f} min per epoch ({time.source})")
    if memory.peak > usable:
        raise FinesmithError(f"predicted peak memory {memory.peak / GIB:.2f} GiB exceeds the {usable / GIB:.2f} GiB usable; "
                             + suggestion(plan, config.method, checkpointing))
    console.print("dry run: fits; nothing was trained")
    return memory


def suggestion(plan: Plan, method: str, checkpointing: bool) -> str:
    """The advisor's way out: activation checkpointing, a cheaper method, or a smaller run."""
    if not checkpointing and estimate_memory(plan.shape, dataclasses.replace(
            _largest(plan, method), checkpointing=True)).peak <= plan.hardware.training_memory * HEADROOM:
        return "set gradient_checkpointing=true (fits then)"
    rec = recommend(plan)
    if rec.approach != "few_shot" and rec.estimates[rec.approach].fits and rec.method != method:
        return f"use method={rec.method} ({LABELS[rec.approach]} fits) or run `finesmith advise` for the full comparison"
    return "lower batch_size or max_length, or pick a smaller model (`finesmith advise` compares the options)"


def _largest(plan: Plan, method: str) -> RunShape:
    tokens, supervised = plan.data.largest_batch(plan.batch_size)
    return RunShape(method, tokens, supervised, plan.hardware.device)
