"""`finesmith advise`: size every approach for this machine and data, print, write a config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from finesmith.advise.datastats import DataStats, measure_dataset
from finesmith.advise.hardware import GIB, detect_hardware
from finesmith.advise.measure import measure_in_subprocess
from finesmith.advise.model_shape import read_model_shape
from finesmith.advise.rules import GOALS, LABELS, TASKS, Plan, Recommendation, recommend
from finesmith.errors import FinesmithError

console = Console(highlight=False)
PLAN_MAX_LENGTH = 2048  # tokens per example while measuring the data


@dataclass(frozen=True)
class AdviseRequest:
    """The `advise` command's arguments."""

    model: str
    data: str
    task: str = "generation"
    goal: str = "balanced"
    gpu_memory_gb: float | None = None
    time_budget_hours: float | None = None
    calibrate: bool = False
    write_config: str | None = None
    gpus: int | None = None


def advise(request: AdviseRequest) -> Recommendation:
    """Measure, size every approach, print the table and reasons, optionally write a config.

    Args:
        request: the command's arguments.
    Returns:
        The Recommendation.
    """
    _check_choice("--task", request.task, TASKS)
    _check_choice("--goal", request.goal, GOALS)
    from finesmith.model.load import load_tokenizer

    hardware = detect_hardware(request.gpu_memory_gb, request.gpus)
    shape = read_model_shape(request.model)
    stats = measure_dataset(load_tokenizer(request.model), request.data, PLAN_MAX_LENGTH)
    if not stats.examples:
        raise FinesmithError(f"{request.data}: no trainable examples; check the file with `finesmith data check`")
    rate = calibrate_lora(request, stats) if request.calibrate else None
    plan = Plan(hardware, shape, stats, request.task, request.goal, request.time_budget_hours,
                calibrated_lora_tokens_per_second=rate)
    rec = recommend(plan)
    print_report(plan, rec)
    if request.write_config:
        write_config(plan, rec, request, Path(request.write_config))
    return rec


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FinesmithError(f"{flag} must be one of {', '.join(choices)}; got '{value}'")


def calibrate_lora(request: AdviseRequest, stats: DataStats) -> float:
    """Tokens/s of 3 real LoRA steps on this machine with the user's model and data."""
    console.print("calibrating: 3 LoRA training steps on this machine ...")
    max_length = fitted_max_length(stats)
    measured = measure_in_subprocess(request.model, "lora", max_length, batch_size=8, steps=3, data=request.data)
    console.print(f"measured {measured.tokens_per_step / measured.seconds_per_step:,.0f} tokens/s, "
                  f"peak RSS {measured.peak_rss_bytes / GIB:.2f} GiB")
    return measured.tokens_per_step / measured.seconds_per_step


def print_report(plan: Plan, rec: Recommendation) -> None:
    data = plan.data
    console.print(f"hardware: {plan.hardware.describe()}")
    active = (f" ({plan.shape.active_params / 1e6:,.1f}M active: {plan.shape.experts_per_token} of "
              f"{plan.shape.experts} experts per token)" if plan.shape.moe else "")
    console.print(f"model: {plan.shape.name} · {plan.shape.params / 1e6:,.1f}M parameters{active} · {plan.shape.layers} layers · "
                  f"hidden {plan.shape.hidden} · vocab {plan.shape.vocab:,}")
    console.print(f"data: {data.examples:,} examples · {data.tokens:,} tokens ({data.supervised:,} trained) · "
                  f"length p50 {data.percentile(0.5)} / p95 {data.percentile(0.95)} / max {data.percentile(1.0)}")
    per_gpu = f" · memory per GPU over {plan.hardware.gpus} GPUs" if plan.hardware.device == "cuda" and plan.hardware.gpus > 1 else ""
    table = Table(title=f"approaches · batch {plan.batch_size} · {plan.epochs:g} epochs{per_gpu}")
    for column in ("approach", "trains", "peak memory", "time / epoch", "fits"):
        table.add_column(column, justify="left" if column in ("approach", "fits") else "right")
    for approach, est in rec.estimates.items():
        label = (LABELS[approach] + (f" ({est.method})" if approach == "cpt_sft" else "")
                 + (f" · {est.parallelism.upper()}" if est.parallelism else "")
                 + (" + checkpointing" if est.checkpointing else ""))
        mark = "[green]yes[/]" if est.fits else f"[red]no[/]: {est.why_not}"
        trains = "-" if est.time is None else _trainable(plan, est.method)
        time = "-" if est.time is None else _duration(est.time.seconds_per_epoch)
        style = "bold" if approach == rec.approach else ""
        table.add_row(label, trains, f"{est.memory.peak / GIB:.2f} GiB", time, mark, style=style)
    console.print(table)
    chosen = rec.estimates[rec.approach]
    if chosen.time is not None:
        console.print(f"time estimate: {chosen.time.source}")
    console.print(f"[bold]recommendation: {LABELS[rec.approach]}[/] ({rec.rule})")
    for reason in rec.reasons:
        console.print(f"  · {reason}")
    if rec.scale_out:
        console.print(f"  · {rec.scale_out}")


def _trainable(plan: Plan, method: str) -> str:
    from finesmith.advise.memory import trainable_parameters
    from finesmith.advise.rules import run_shape

    n = trainable_parameters(plan.shape, run_shape(plan, method))
    return f"{n / 1e6:,.2f}M" if n >= 10_000 else f"{n:,}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def fitted_max_length(stats: DataStats) -> int:
    """The longest example rounded up to a multiple of 64 (no example is truncated)."""
    longest = stats.lengths[-1] if stats.lengths else 64
    return min(PLAN_MAX_LENGTH, -(-longest // 64) * 64)


def recommended_config(plan: Plan, rec: Recommendation, request: AdviseRequest) -> dict[str, Any]:
    """The TrainConfig keys for the recommendation (continued pre-training: its first stage)."""
    if rec.approach == "few_shot":
        raise FinesmithError(
            "the recommendation is few-shot prompting, which trains nothing, so there is no training config; "
            f"measure it with `finesmith eval --model {request.model} --data HELDOUT.jsonl --shots 4 --shots-from {request.data}`")
    data: Any = request.data
    if rec.approach == "cpt_sft":
        data = {"path": request.data, "format": "text"}
    config = {"model": request.model, "data": data, "output": f"runs/{rec.approach}", "method": rec.method,
              "epochs": plan.epochs, "batch_size": plan.batch_size, "max_length": fitted_max_length(plan.data)}
    if rec.estimates[rec.approach].checkpointing:
        config["gradient_checkpointing"] = True
    if rec.estimates[rec.approach].parallelism:
        config["parallelism"] = rec.estimates[rec.approach].parallelism
    return config


def write_config(plan: Plan, rec: Recommendation, request: AdviseRequest, path: Path) -> None:
    """Write the recommendation as YAML and check that `finesmith train` accepts it."""
    from finesmith.config import load_config

    config = recommended_config(plan, rec, request)
    launch = f" --nproc-per-node {plan.hardware.gpus}" if "parallelism" in config else ""
    header = f"# written by `finesmith advise` ({rec.rule}); run: finesmith train {path}{launch}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    load_config(str(path))
    gpus = f" --nproc-per-node {plan.hardware.gpus}" if "parallelism" in config else ""
    console.print(f"config written to {path}; run it with `finesmith train {path}{gpus}`")
    if rec.approach == "cpt_sft":
        console.print("this is stage 1 (continued pre-training on the raw text); for stage 2 train on your "
                      "instruction data with the stage-1 model as `model`")
