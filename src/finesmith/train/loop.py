"""The training loop: one loop for every method, packed batches, exact accumulation."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from finesmith.data.pack import IGNORE, pack_batch
from finesmith.data.tokenize import TokenizedExample
from finesmith.train.objectives import sft_loss
from finesmith.train.optim import build_optimizer, warmup_cosine

Objective = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know; derived from TrainConfig by the pipeline."""

    lr: float
    total_steps: int
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    log_every: int = 5
    eval_every: int = 0


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    eval_loss: float | None
    tokens_per_second: float
    seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(math.ceil(n_examples / batch_size) / grad_accum))


def micro_batches(examples: Sequence[TokenizedExample], batch_size: int, seed: int) -> Iterator[list[TokenizedExample]]:
    """Endless stream of micro-batches; each epoch is a fresh seeded shuffle."""
    epoch = 0
    while True:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]
        epoch += 1


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 elsewhere (CPU bf16 is slower and less exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fit(model: Any, train: Sequence[TokenizedExample], settings: LoopSettings, output: Path,
        eval_set: Sequence[TokenizedExample] | None = None, objective: Objective = sft_loss) -> TrainResult:
    """Train `model` in place for `settings.total_steps` optimizer steps.

    Each optimizer step sums token losses over `grad_accum` packed micro-batches and
    divides once by the number of supervised tokens in the step. Metrics are appended to
    `output/metrics.jsonl`.
    """
    device = next(model.parameters()).device
    seed_everything(settings.seed)
    optimizer = build_optimizer(model, settings.lr, settings.weight_decay)
    scheduler = warmup_cosine(optimizer, settings.total_steps, settings.warmup_steps)
    stream = micro_batches(train, settings.batch_size, settings.seed)
    output.mkdir(parents=True, exist_ok=True)
    metrics_path = output / "metrics.jsonl"
    model.train()
    window_loss, window_tokens, window_real, window_start = 0.0, 0, 0, time.perf_counter()
    started, all_tokens, final_loss, eval_loss = time.perf_counter(), 0, float("nan"), None
    with _progress() as progress, metrics_path.open("a", encoding="utf-8") as log:
        task = progress.add_task("training", total=settings.total_steps, info="")
        for step in range(1, settings.total_steps + 1):
            batches = [pack_batch(next(stream)) for _ in range(settings.grad_accum)]
            step_tokens = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
            step_loss = torch.zeros((), device=device)
            for batch in batches:
                with autocast(device):
                    loss_sum, _ = objective(model, to_device(batch, device))
                (loss_sum / max(1, step_tokens)).backward()
                step_loss += loss_sum.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            real = sum(int(b["input_ids"].numel()) for b in batches)
            window_loss, window_tokens, window_real = window_loss + step_loss, window_tokens + step_tokens, window_real + real
            all_tokens += real
            if step % settings.log_every == 0 or step == settings.total_steps:
                # The only host sync of the loop: once per logging interval.
                elapsed = time.perf_counter() - window_start
                final_loss = float(window_loss) / max(1, window_tokens)
                record = {"step": step, "loss": round(final_loss, 5), "lr": scheduler.get_last_lr()[0],
                          "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(window_real / elapsed, 1),
                          "elapsed_s": round(time.perf_counter() - started, 2)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                progress.update(task, info=f"loss {final_loss:.4f} · {record['tokens_per_s']:.0f} tok/s")
                window_loss, window_tokens, window_real, window_start = 0.0, 0, 0, time.perf_counter()
            if eval_set and ((settings.eval_every and step % settings.eval_every == 0) or step == settings.total_steps):
                eval_loss = evaluate_loss(model, eval_set, settings.batch_size, objective)
                log.write(json.dumps({"step": step, "eval_loss": round(eval_loss, 5)}) + "\n")
                log.flush()
                model.train()
            progress.advance(task)
    seconds = time.perf_counter() - started
    return TrainResult(settings.total_steps, final_loss, eval_loss, all_tokens / seconds, seconds)


@torch.no_grad()
def evaluate_loss(model: Any, examples: Sequence[TokenizedExample], batch_size: int,
                  objective: Objective = sft_loss) -> float:
    """Mean loss per supervised token over `examples`."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = to_device(pack_batch(examples[start:start + batch_size]), device)
        with autocast(device):
            loss_sum, n = objective(model, batch)
        total += float(loss_sum)
        count += int(n)
    return total / max(1, count)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
