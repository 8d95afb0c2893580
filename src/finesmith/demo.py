"""`finesmith demo`: does fine-tuning beat prompting on a task the base model cannot do?

Zero-shot and 3-shot accuracy of the built-in model on the built-in ticket-triage task,
then a LoRA fine-tune, then the fine-tuned accuracy on the same held-out examples. Each
approach is scored by its greedy answer and by label log-likelihood; the results end up
in `report.md` / `report.html` in the demo's output folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path

from rich.table import Table

from finesmith.config import DataSettings, LoraSettings, TrainConfig
from finesmith.core.console import console
from finesmith.core.device import pick_device
from finesmith.evaluate.compare import write_comparison
from finesmith.evaluate.tasks import EvalOptions, EvalResult
from finesmith.model.methods import load_for_inference
from finesmith.pipeline import evaluate, train

DEMO_MODEL = "smollm2-135m-instruct"
SHOTS = 3
MAX_NEW_TOKENS = 12  # answers are at most ~8 tokens ("feature_request / medium")


def demo_data() -> tuple[str, str]:
    root = resources.files("finesmith") / "resources" / "demo"
    return str(root / "train.jsonl"), str(root / "eval.jsonl")


def demo_config(output: Path) -> TrainConfig:
    """The demo's training settings: LoRA, one epoch, sized to run in minutes on a laptop CPU."""
    train_file, eval_file = demo_data()
    return TrainConfig(model=DEMO_MODEL, data=DataSettings(path=train_file), eval_data=eval_file, output=str(output),
                       method="lora", epochs=1, lr=1e-3, batch_size=8, max_length=256, log_every=5,
                       lora=LoraSettings(r=16, alpha=32, dropout=0.0)).validate()


def run_demo(output: Path) -> dict[str, float]:
    started = time.perf_counter()
    config = demo_config(output)
    train_file, eval_file = config.data.path, config.eval_data
    device = str(pick_device())
    console.rule("[bold]1/3 · the base model, prompted")
    base = load_for_inference(DEMO_MODEL, device=device)
    options = EvalOptions(task="classification", max_new_tokens=MAX_NEW_TOKENS)
    zero = evaluate(DEMO_MODEL, eval_file, options=options, loaded=base)
    console.print(f"zero-shot accuracy: {zero.accuracy:.1%} · by label likelihood {loglik_accuracy(zero):.1%}")
    few = evaluate(DEMO_MODEL, eval_file, shots_from=train_file, options=replace(options, shots=SHOTS), loaded=base)
    console.print(f"{SHOTS}-shot accuracy:   {few.accuracy:.1%} · by label likelihood {loglik_accuracy(few):.1%}")
    del base
    console.rule("[bold]2/3 · LoRA fine-tuning")
    outcome = train(config, overwrite=True)
    console.rule("[bold]3/3 · the fine-tuned model")
    tuned = evaluate(str(output), eval_file, options=options)
    console.print(f"fine-tuned accuracy: {tuned.accuracy:.1%} · by label likelihood {loglik_accuracy(tuned):.1%}")
    show_samples(zero, few, tuned)
    seconds = time.perf_counter() - started
    summary = {"zero_shot": zero.accuracy, "few_shot": few.accuracy, "fine_tuned": tuned.accuracy,
               "zero_shot_loglik": loglik_accuracy(zero), "few_shot_loglik": loglik_accuracy(few),
               "fine_tuned_loglik": loglik_accuracy(tuned), "n_eval": zero.n, "shots": SHOTS,
               "train_seconds": round(outcome.result.seconds, 1), "total_seconds": round(seconds, 1)}
    show_summary(summary, outcome.trainable, outcome.total)
    (output / "demo_results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    entries = [("base · zero-shot", zero), (f"base · {SHOTS}-shot", few), ("LoRA fine-tune", tuned)]
    notes = [f"held-out data: {eval_file} ({zero.n} tickets)", f"base model: {DEMO_MODEL}",
             f"LoRA r={config.lora.r}, {outcome.result.steps} steps, training {outcome.result.seconds:.0f}s"]
    report = write_comparison(entries, [("LoRA fine-tune", output)], output, notes,
                              title="Support-ticket triage: fine-tuning vs prompting")
    console.print(f"report: {report}")
    return summary


def loglik_accuracy(result: EvalResult) -> float:
    """Accuracy when the answer is the most probable label (rather than the generated text)."""
    return result.metrics["loglik"]["accuracy"]


def show_samples(zero: EvalResult, few: EvalResult, tuned: EvalResult, n: int = 4) -> None:
    table = Table(title="sample answers", show_lines=True)
    for column in ("ticket", "reference", "zero-shot", f"{SHOTS}-shot", "fine-tuned"):
        table.add_column(column, overflow="fold")
    for z, f, t in list(zip(zero.predictions, few.predictions, tuned.predictions))[:n]:
        table.add_row(z["prompt"][:90], z["reference"], z["prediction"][:40], f["prediction"][:40], t["prediction"][:40])
    console.print(table)


def show_summary(summary: dict[str, float], trainable: int, total: int) -> None:
    table = Table(title=f"support-ticket triage · {summary['n_eval']} held-out tickets · {DEMO_MODEL}")
    table.add_column("approach")
    table.add_column("accuracy (answer)", justify="right")
    table.add_column("accuracy (label likelihood)", justify="right")
    table.add_column("trained parameters", justify="right")
    for name, key, params in (("zero-shot prompt", "zero_shot", "0"), (f"{SHOTS}-shot prompt", "few_shot", "0"),
                              ("LoRA fine-tune", "fine_tuned", f"{trainable:,} ({100 * trainable / total:.1f}%)")):
        table.add_row(name, f"{summary[key]:.1%}", f"{summary[key + '_loglik']:.1%}", params)
    console.print(table)
    console.print(f"demo finished in {summary['total_seconds']:.0f}s (training {summary['train_seconds']:.0f}s)")
