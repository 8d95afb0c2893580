"""The training loop: one loop for every method, packed batches, exact accumulation.

Around the step itself the loop calls small helpers: checkpoints (`checkpoint.py`),
metrics (`tracking.py`), a signal guard that turns SIGTERM/SIGINT into "finish the step,
save, exit", and a guard against non-finite numbers that skips such steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from finesmith.data.pack import IGNORE, pack_batch, pack_bins, split_rows
from finesmith.data.tokenize import TokenizedExample
from finesmith.errors import FinesmithError
from finesmith.train.checkpoint import (TrainerState, latest_checkpoint, load_best, load_checkpoint, save_best,
                                        save_checkpoint)
from finesmith.train import distributed
from finesmith.train.objectives import sft_loss
from finesmith.train.optim import build_optimizer, warmup_cosine
from finesmith.train.tracking import MetricsLog

Objective = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
Collate = Callable[[Sequence[TokenizedExample]], dict[str, torch.Tensor]]
EvalHook = Callable[[Any, int], None]


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know; derived from TrainConfig by the pipeline."""

    lr: float
    total_steps: int
    batch_size: int = 8  # examples per micro-batch (ignored when packing)
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    log_every: int = 5
    eval_every: int = 0
    packing: bool = False  # micro-batch = one best-fit-decreasing bin of <= pack_tokens tokens
    pack_tokens: int = 1024
    save_every: int = 0  # 0: checkpoint only at the end
    keep_checkpoints: int = 2
    max_bad_steps: int = 5
    early_stopping_patience: int = 0
    optimizer: str = "adamw"
    report_to: tuple[str, ...] = ()
    embedding_lr_ratio: float = 1.0  # learning-rate multiplier for trainable embeddings / LM head
    planned_steps: int | None = None  # the schedule's original horizon (total_steps unless extended)
    extensions: tuple[tuple[int, int], ...] = ()  # (at_step, new_total) from `--resume --extend`
    precision: str = "auto"  # auto | fp32 | bf16: autocast dtype (see finesmith.core.device.training_precision)
    flops_per_token: float = 0.0  # with peak_flops: model FLOPs utilisation in the log (GPUs)
    peak_flops: float = 0.0
    parallelism: str = "ddp"  # ddp | fsdp, with several processes (see finesmith.train.distributed.parallelism)
    repeat: int = 1  # optimizer steps on each step's micro-batches (GRPO's iterations per batch of samples)


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed (fewer than planned after early stopping)
    final_loss: float
    eval_loss: float | None
    tokens_per_second: float
    seconds: float
    step_losses: list[float] = field(default_factory=list)  # mean loss of each step this call ran
    skipped_steps: int = 0  # steps skipped because of non-finite numbers (whole run)
    stopped_early: bool = False
    checkpoint: Path | None = None
    best_step: int | None = None  # step of the lowest eval loss
    best_eval_loss: float | None = None
    restored_best: bool = False  # the run ended with the best weights, not the last ones


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: the current step finished and a checkpoint was saved."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"stopped by a signal after step {step}; checkpoint saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class TrainingDiverged(FinesmithError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def steps_per_epoch(n_micro_batches: int, grad_accum: int) -> int:
    return max(1, math.ceil(n_micro_batches / grad_accum))


def micro_batches(examples: Sequence[TokenizedExample], settings: LoopSettings) -> Iterator[list[TokenizedExample]]:
    """Endless stream of micro-batches; each epoch is a fresh seeded shuffle.

    Without packing a micro-batch is `batch_size` consecutive examples of the shuffle; with
    packing it is one best-fit-decreasing bin, and the bins are shuffled too (BFD emits them
    longest-first). The stream depends only on the seed, so a resumed run finds its place by
    skipping the micro-batches it already trained on.
    """
    if settings.repeat > 1:  # each step's micro-batches, `repeat` steps in a row
        stream = micro_batches(examples, dataclasses.replace(settings, repeat=1))
        while True:
            step = [next(stream) for _ in range(settings.grad_accum)]
            for _ in range(settings.repeat):
                yield from step
    for epoch in itertools.count():
        generator = torch.Generator().manual_seed(settings.seed + epoch)
        order = torch.randperm(len(examples), generator=generator).tolist()
        if settings.packing:
            bins = pack_bins([len(examples[i]) for i in order], settings.pack_tokens)
            for b in torch.randperm(len(bins), generator=generator).tolist():
                yield [examples[order[i]] for i in bins[b]]
        else:
            for start in range(0, len(order), settings.batch_size):
                yield [examples[i] for i in order[start:start + settings.batch_size]]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast when the run's precision is bf16 (`auto`: on CUDA); plain fp32 otherwise.
    The loss is computed from fp32 logits either way (the objectives upcast them)."""
    from finesmith.core.device import training_precision

    if training_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Set to a step number, the run stops after that step as if a stop signal had come (on the
# rank it is set for; the others agree): to rehearse preemption and resumption.
STOP_AFTER_ENV = "FINESMITH_STOP_AFTER_STEP"


class StopSignal:
    """Within `with StopSignal() as stop:`, SIGTERM/SIGINT set `stop.requested` instead of killing.

    The loop checks the flag between steps, so a preempted job ends with a checkpoint. A
    second SIGINT (Ctrl-C twice) interrupts at once.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        with contextlib.suppress(ValueError):  # signals can only be caught in the main thread
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class _Window:
    """Running sums between two metric lines."""

    loss: float = 0.0
    tokens: int = 0
    real: int = 0
    started: float = field(default_factory=time.perf_counter)
    extras: dict[str, list[float]] = field(default_factory=dict)  # objective metrics of each step (GRPO's rewards)

    def add_extras(self, batches: list[dict[str, Any]]) -> None:
        logs = [b["log"] for b in batches if isinstance(b.get("log"), dict)]
        for key, value in step_metrics(logs).items():
            self.extras.setdefault(key, []).append(value)


def fit(model: Any, train: Sequence[TokenizedExample], settings: LoopSettings, output: Path,
        eval_set: Sequence[TokenizedExample] | None = None, objective: Objective = sft_loss,
        collate: Collate = pack_batch, resume: bool = False, on_eval: EvalHook | None = None,
        run_config: dict[str, Any] | None = None) -> TrainResult:
    """Train `model` in place for `settings.total_steps` optimizer steps.

    Each optimizer step sums token losses over `grad_accum` micro-batches and divides once
    by the number of supervised tokens in the step. A step whose loss or gradient norm is
    not finite is skipped (weights and optimizer untouched); `max_bad_steps` of them in a
    row raise TrainingDiverged.

    Args:
        model: the model to train (any method).
        train, eval_set: tokenized examples.
        settings: loop settings.
        output: run folder for metrics.jsonl and checkpoints/.
        objective, collate: loss function and the batch layout it expects.
        resume: continue from the latest complete checkpoint in `output`.
        on_eval: called as `on_eval(model, step)` after each eval (e.g. to write samples).
        run_config: the resolved config, passed to trackers.
    Returns:
        A TrainResult. Raises Preempted after saving a checkpoint when a stop signal arrives.
    """
    device = next(model.parameters()).device
    world = distributed.current()
    seed_everything(settings.seed)
    if world.distributed:  # DDP: a wrapper averaging gradients; FSDP2: `model` itself, sharded in place
        from finesmith.core.device import training_precision

        trained = distributed.wrap(model, device, settings.parallelism,
                                   bf16=training_precision(settings.precision, device) == "bf16")
    else:
        trained = model
    sharded = distributed.is_sharded(model)
    if sharded and on_eval is not None:
        on_eval = None  # generating samples would need every rank in each forward pass
        if world.main:
            from finesmith.core.console import console

            console.print("samples are not written under FSDP2 (eval loss is); evaluate the finished run instead")
    optimizer = build_optimizer(model, settings.lr, settings.weight_decay, settings.optimizer,
                                settings.embedding_lr_ratio)
    scheduler = warmup_cosine(optimizer, settings.planned_steps or settings.total_steps, settings.warmup_steps,
                              extensions=settings.extensions)
    state = TrainerState(step=0, micro_batches=0)
    if resume:
        state = load_checkpoint(latest_checkpoint(output), model, optimizer, scheduler)
    # Global micro-batches (the same on any world size); each rank collates its own share.
    stream = itertools.islice(micro_batches(train, settings), state.micro_batches, None)
    log = (MetricsLog(output, list(settings.report_to), run_config or {}, state.step if resume else None)
           if world.main else distributed.NoLog())

    def save(with_optimizer: bool = True) -> Path:  # every rank: shards are written collectively, the rest once
        return save_checkpoint(output, model, optimizer, scheduler, state, settings.keep_checkpoints, with_optimizer)

    if eval_set and getattr(objective, "measure_before", False) and state.step == 0:
        before = evaluate_metrics(model, eval_set, settings.batch_size, objective, collate, settings.precision)
        log.write({"step": 0, **{f"eval_{k}": round(v, 5) for k, v in before.items()}})
        model.train()
    result = TrainResult(state.step, float("nan"), state.eval_loss, 0.0, 0.0, skipped_steps=state.bad_steps)
    window, started, all_tokens = _Window(), time.perf_counter(), 0
    model.train()
    try:
        with _progress() as progress, StopSignal() as stop:
            task = progress.add_task("training", total=settings.total_steps, completed=state.step, info="")
            while state.step < settings.total_steps:
                batches = [_share(next(stream), world, collate) for _ in range(settings.grad_accum)]
                state.step += 1
                state.micro_batches += settings.grad_accum
                loss, grad_norm, tokens, real = train_step(trained, batches, objective, optimizer, settings, device)
                window.add_extras(batches)
                scheduler.step()
                all_tokens += real
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    _count_bad_step(state, log, output, settings, loss, grad_norm)
                else:
                    state.bad_in_a_row = 0
                    window.loss, window.tokens, window.real = window.loss + loss * tokens, window.tokens + tokens, window.real + real
                    result.step_losses.append(loss)
                last = state.step == settings.total_steps
                if state.step % settings.log_every == 0 or last:
                    result.final_loss = _log_window(log, window, state.step, scheduler, grad_norm, started, progress,
                                                    task, settings)
                    window = _Window()
                if eval_set and ((settings.eval_every and state.step % settings.eval_every == 0) or last):
                    _evaluate(model, eval_set, settings, objective, collate, state, log,
                              on_eval if world.main else None, output)
                    result.eval_loss = state.eval_loss
                    result.stopped_early = bool(settings.early_stopping_patience and
                                                state.evals_without_improvement >= settings.early_stopping_patience)
                if (last or result.stopped_early) and _should_restore_best(settings, state):
                    result.restored_best = restore_best(output, model, state, log)
                if STOP_AFTER_ENV in os.environ and state.step == int(os.environ[STOP_AFTER_ENV]):
                    stop.requested = stop.requested or STOP_AFTER_ENV  # a rehearsed preemption
                stopping = distributed.any_rank(bool(stop.requested), device) if world.distributed else stop.requested
                if last or result.stopped_early or stopping or (
                        settings.save_every and state.step % settings.save_every == 0):
                    # Rewound weights cannot be continued, so their checkpoint carries no optimizer state.
                    result.checkpoint = save(with_optimizer=not result.restored_best)
                state.eval_loss = None
                progress.advance(task)
                if stopping and not last:
                    raise Preempted(state.step, result.checkpoint)
                if result.stopped_early:
                    log.write({"step": state.step, "early_stop": f"no eval improvement in "
                               f"{settings.early_stopping_patience} evals"})
                    break
    finally:
        log.close()
    result.seconds = time.perf_counter() - started
    result.steps, result.skipped_steps = state.step, state.bad_steps
    result.best_step, result.best_eval_loss = state.best_step, state.best_eval_loss
    result.tokens_per_second = all_tokens / max(result.seconds, 1e-9)
    return result


def step_metrics(logs: list[dict[str, Any]]) -> dict[str, float]:
    """One step's objective metrics from its micro-batches' `log` dicts: plain values averaged
    over micro-batches; `_clipped`/`_kl` summed and divided by `_tokens` (clip fraction, KL per token)."""
    if not logs:
        return {}
    out: dict[str, float] = {}
    for key in logs[0]:
        if not key.startswith("_"):
            out[key] = sum(float(log.get(key, 0.0)) for log in logs) / len(logs)
    tokens = sum(float(log.get("_tokens", 0.0)) for log in logs)
    if tokens:
        out["clip_fraction"] = sum(float(log.get("_clipped", 0.0)) for log in logs) / tokens
        out["kl"] = sum(float(log.get("_kl", 0.0)) for log in logs) / tokens
    return out


def train_step(model: Any, batches: list[dict[str, Any]], objective: Objective,
               optimizer: torch.optim.Optimizer, settings: LoopSettings,
               device: torch.device) -> tuple[float, float, int, int]:
    """One optimizer step over `batches`; skipped when the loss or gradient is not finite.

    With several processes `batches` are this rank's share: the divisor is the step's count
    summed over all ranks, each loss is scaled by the world size because DDP and FSDP2 average
    the gradients, and only the step's last backward synchronises them. Under FSDP2 every
    forward pass is a collective, so every rank runs as many as the busiest rank (extra passes
    count zero).

    Returns:
        (mean loss per counted unit, gradient norm before clipping, units counted, real tokens),
        over all ranks. The counted unit is the objective's: supervised tokens for SFT, pairs
        (or feedback examples) for the preference objectives.
    """
    world = distributed.current()
    local_count = sum(batch_count(b) for b in batches if not b.get(EMPTY_SHARE))
    step_count = int(distributed.sum_all(local_count, device)) if world.distributed else local_count
    step_loss = torch.zeros((), device=device)
    sharded = world.distributed and distributed.is_sharded(model)
    units = forward_units(batches, device, split=not sharded)
    if sharded:
        units += [(units[-1][0], 0.0)] * (distributed.max_all(len(units), device) - len(units))
    for i, (unit, weight) in enumerate(units):
        with distributed.gradient_sync(model, on=not world.distributed or i == len(units) - 1):
            with autocast(device, settings.precision):
                loss_sum, _ = objective(model, to_device(unit, device))
            loss_sum = loss_sum * weight
            (loss_sum * world.size / max(1, step_count)).backward()
        step_loss += loss_sum.detach()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
    real = sum(real_tokens(b) for b in batches if not b.get(EMPTY_SHARE))
    if world.distributed:
        step_loss = torch.tensor(distributed.sum_all(float(step_loss), device), device=device)
        real = int(distributed.sum_all(real, device))
    # One host sync per step: whether to apply the update must be known before applying it.
    loss, norm = torch.stack([step_loss / max(1, step_count), grad_norm.to(step_loss.device)]).tolist()
    if math.isfinite(loss) and math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, step_count, real


# A rank whose share of a micro-batch is empty (the last, short micro-batch of an epoch) still
# runs a pass, on a copy of the first example that counts zero, so no rank waits for it.
EMPTY_SHARE = "empty_share"


def _share(global_batch: list[TokenizedExample], world: distributed.World, collate: Collate) -> dict[str, Any]:
    mine = distributed.shard(global_batch, world)
    if mine:
        return collate(mine)
    return {**collate(global_batch[:1]), EMPTY_SHARE: True}


def batch_count(batch: dict[str, Any]) -> int:
    """What the step's loss is divided by: the batch's `count`, else its supervised tokens."""
    return int(batch["count"]) if "count" in batch else int((batch["targets"] != IGNORE).sum())


def real_tokens(batch: dict[str, Any]) -> int:
    return int(batch["real_tokens"]) if "real_tokens" in batch else int(batch["seq_lens"].sum())


def forward_units(batches: list[dict[str, Any]], device: torch.device,
                  split: bool = True) -> list[tuple[dict[str, torch.Tensor], float]]:
    """What each forward/backward pass runs on, with the weight of its loss (0 for an empty share).

    A batch that is already a list of units (preference groups) runs unit by unit. On CPU
    the rows of a packed batch run one at a time (unless `split` is False): matrix products
    of a few hundred rows already keep the cores busy, so the speed is the same and the
    activation memory falls by the number of rows (SmolLM2-135M, 16 examples of ~200 tokens:
    ~5.7 GB of saved activations in one pass, under 1 GB per row). On GPUs one pass over all
    rows is faster.
    """
    out: list[tuple[dict[str, torch.Tensor], float]] = []
    for batch in batches:
        weight = 0.0 if batch.get(EMPTY_SHARE) else 1.0
        if "units" in batch:
            parts = batch["units"]
        elif split and device.type != "cuda" and "row_lens" in batch:
            parts = split_rows(batch)
        else:
            parts = [batch]
        out += [(part, weight) for part in parts]
    return out


def _count_bad_step(state: TrainerState, log: MetricsLog, output: Path, settings: LoopSettings,
                    loss: float, grad_norm: float) -> None:
    state.bad_steps += 1
    state.bad_in_a_row += 1
    what = "loss" if not math.isfinite(loss) else "gradient"
    log.write({"step": state.step, "skipped": f"non-finite {what}", "bad_steps": state.bad_steps})
    if state.bad_in_a_row >= settings.max_bad_steps:
        last_good = latest_checkpoint(output)
        where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was saved yet"
        raise TrainingDiverged(f"step {state.step}: {state.bad_in_a_row} steps in a row had a non-finite {what}; "
                               f"training stopped ({where}); lower lr or check the data, then resume or restart")


def _log_window(log: MetricsLog, window: _Window, step: int, scheduler: Any, grad_norm: float,
                started: float, progress: Progress, task: Any, settings: LoopSettings) -> float:
    loss = window.loss / window.tokens if window.tokens else float("nan")
    elapsed = time.perf_counter() - window.started
    record = {"step": step, "loss": round(loss, 5), "lr": scheduler.get_last_lr()[0],
              "grad_norm": round(grad_norm, 4), "tokens_per_s": round(window.real / max(elapsed, 1e-9), 1),
              "elapsed_s": round(time.perf_counter() - started, 2),
              **{k: round(sum(v) / len(v), 5) for k, v in window.extras.items() if v}}
    info = f"loss {loss:.4f} · {record['tokens_per_s']:.0f} tok/s"
    if settings.flops_per_token and settings.peak_flops:
        record["mfu"] = round(record["tokens_per_s"] * settings.flops_per_token / settings.peak_flops, 4)
        info += f" · MFU {record['mfu']:.1%}"
    log.write(record)
    progress.update(task, info=info)
    return loss


def _evaluate(model: Any, eval_set: Sequence[TokenizedExample], settings: LoopSettings, objective: Objective,
              collate: Collate, state: TrainerState, log: MetricsLog, on_eval: EvalHook | None,
              output: Path) -> None:
    """Measure eval loss, keep the best weights so far (with early stopping), run the eval hook.

    The best weights are saved whenever an eval improves, independently of `save_every`,
    so early stopping can end with them.
    """
    metrics = evaluate_metrics(model, eval_set, settings.batch_size, objective, collate, settings.precision)
    loss = metrics["loss"]
    state.eval_loss = loss
    if state.best_eval_loss is None or loss < state.best_eval_loss:
        state.best_eval_loss, state.best_step, state.evals_without_improvement = loss, state.step, 0
        if settings.early_stopping_patience:
            save_best(output, model, state)  # every rank: sharded weights are gathered for rank 0 to write
            distributed.barrier()  # every rank may restore these weights later
    else:
        state.evals_without_improvement += 1
    log.write({"step": state.step, "eval_loss": round(loss, 5),
               **{f"eval_{k}": round(v, 5) for k, v in metrics.items() if k != "loss"}})
    if on_eval:
        on_eval(model, state.step)
    model.train()


def _should_restore_best(settings: LoopSettings, state: TrainerState) -> bool:
    return bool(settings.early_stopping_patience and state.best_step is not None and state.best_step != state.step)


def restore_best(output: Path, model: Any, state: TrainerState, log: MetricsLog) -> bool:
    """Load the best weights saved by `_evaluate` into `model`; log which eval chose them."""
    best = load_best(output, model)
    if best is None:
        return False
    log.write({"step": state.step, "restored_best_step": best.step, "best_eval_loss": round(best.eval_loss, 5)})
    return True


@torch.no_grad()
def evaluate_loss(model: Any, examples: Sequence[Any], batch_size: int,
                  objective: Objective | None = None, collate: Collate | None = None) -> float:
    """Mean loss per counted unit (supervised token, or pair) over `examples`.

    Without `objective`/`collate`, the model's method decides (packed rows, or padded rows
    for prompt/prefix tuning), so perplexity and eval loss work for every method.
    """
    return evaluate_metrics(model, examples, batch_size, objective, collate)["loss"]


@torch.no_grad()
def evaluate_metrics(model: Any, examples: Sequence[Any], batch_size: int,
                     objective: Objective | None = None, collate: Collate | None = None,
                     precision: str = "auto") -> dict[str, float]:
    """`{"loss": ...}` plus whatever the objective measures (`objective.measure`, e.g. preference accuracy)."""
    if objective is None or collate is None:
        from finesmith.model.methods import method_of

        method = method_of(model)
        objective, collate = objective or method.objective("sft"), collate or method.collate()
    model.eval()
    device = next(model.parameters()).device
    # A generator, so only one micro-batch's masks exist at a time.
    units = (to_device(u, device) for start in range(0, len(examples), batch_size)
             for u, _ in forward_units([collate(examples[start:start + batch_size])], device))
    measure = getattr(objective, "measure", None)
    if measure is not None:
        with autocast(device, precision):
            return measure(model, units)
    total, count = 0.0, 0
    for unit in units:
        with autocast(device, precision):
            loss_sum, n = objective(model, unit)
        total += float(loss_sum)
        count += int(n)
    return {"loss": total / max(1, count)}


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not distributed.current().main)
