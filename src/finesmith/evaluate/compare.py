"""`finesmith compare`: does fine-tuning beat prompting on this held-out file?

Evaluates the base model zero-shot, the base model k-shot (when asked) and each fine-tuned
run folder on the same examples, saves every result as JSON and writes the report.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finesmith.core.console import console
from finesmith.errors import FinesmithError
from finesmith.evaluate.report import write_report
from finesmith.evaluate.tasks import EvalOptions, EvalResult


DEFAULT_SHOTS = (1, 4, 8)


def compare(data: str, base: str, runs: Sequence[str], output: Path, shots_from: str | None = None,
            options: EvalOptions | None = None, limit: int | None = None,
            shots: Sequence[int] | None = None) -> list[tuple[str, EvalResult]]:
    """Evaluate base zero-shot and k-shot for every k in `shots`, and each run; write the report.

    Args:
        data: held-out file shared by every approach.
        base: base model (alias, folder, .gguf or hub id).
        runs: finesmith run folders (LoRA or full fine-tunes), evaluated zero-shot.
        output: report folder (`report.md`, `report.html`, `results/*.json`).
        shots_from: training file the k-shot prompts draw from.
        options: evaluation options (`options.shots` is ignored: see `shots`).
        limit: evaluate only the first N examples.
        shots: the k to sweep for the base model (0 is always evaluated); default
            `DEFAULT_SHOTS` when `shots_from` is given. Prompts that would not fit the
            model's context drop shots (farthest first), and the report says how many did.

    Returns:
        (approach name, result) pairs in report order. The report's verdict compares each
        run with the best of the prompting results.
    """
    from finesmith.core.device import pick_device
    from finesmith.model.methods import load_for_inference
    from finesmith.pipeline import evaluate
    from finesmith.run import load_run

    options = (options or EvalOptions()).validate()
    sweep = sorted({k for k in (shots if shots is not None else (DEFAULT_SHOTS if shots_from else ())) if k > 0})
    if sweep and not shots_from:
        raise FinesmithError("--shots needs --shots-from TRAIN.jsonl to draw the examples from")
    for run in runs:
        load_run(run)  # refuses a folder that is not a run, before any model is loaded
    thinking = options.thinking if options.thinking != "auto" else runs_thinking(runs)
    options = dataclasses.replace(options, thinking=thinking)
    loaded = load_for_inference(base, device=str(pick_device()), precision=options.precision)
    budget = options.max_prompt_tokens or context_budget(loaded[0], options.max_new_tokens)
    zero = dataclasses.replace(options, shots=0)
    total = 1 + len(sweep) + len(runs)
    entries = [("base · zero-shot", approach(1, total, "base · zero-shot",
                                             lambda: evaluate(base, data, options=zero, limit=limit, loaded=loaded)))]
    notes = []
    for k in sweep:
        k_options = dataclasses.replace(options, shots=k, max_prompt_tokens=budget)
        result = approach(len(entries) + 1, total, f"base · {k}-shot", lambda: evaluate(
            base, data, shots_from=shots_from, options=k_options, limit=limit, loaded=loaded))
        strategy = result.shot_info.get("strategy", options.shot_strategy)
        entries.append((f"base · {k}-shot ({strategy})", result))
        short = sum(1 for p in result.predictions if p.get("shots", k) < k)
        if short:
            notes.append(f"{k}-shot: {short} of {result.n} prompts dropped shots to fit {budget} tokens")
    del loaded
    names = [f"fine-tuned · {run}" for run in runs]
    as_trained = dataclasses.replace(zero, thinking="auto")  # each run asks as its own template says
    for name, run in zip(names, runs):
        entries.append((name, approach(len(entries) + 1, total, name,
                                       lambda: evaluate(run, data, options=as_trained, limit=limit))))
    if thinking != "auto":
        notes.append(f"the base model was asked with thinking {thinking}, as the fine-tuned runs were trained")
    notes = [f"held-out data: {data} ({entries[0][1].n} examples)", f"base model: {base}",
             *([f"prompting: zero-shot and k = {', '.join(map(str, sweep))} from {shots_from}; the verdict uses the "
                "best of them (chosen on this held-out set, which favours prompting)"] if sweep else []), *notes]
    write_comparison(entries, list(zip(names, map(Path, runs))), output, notes)
    return entries


def approach(index: int, total: int, name: str, run: Callable[[], EvalResult]) -> EvalResult:
    """Evaluate one approach between a line that names it and a line with its headline, so a log
    of `compare` says which approach its progress lines belong to."""
    console.print(f"[{index}/{total}] {name}", markup=False, soft_wrap=True)
    result = run()
    headline = f"accuracy {result.accuracy:.3f}" if result.accuracy is not None else "done"
    console.print(f"[{index}/{total}] {name}: {headline} on {result.n} examples in {result.seconds:.0f} s",
                  markup=False, soft_wrap=True)
    return result


def runs_thinking(runs: Sequence[str]) -> str:
    """The `thinking` setting the runs were trained with, when they all agree; else `auto`."""
    from finesmith.run import load_run

    settings = {load_run(run).record.tokenizer.get("thinking", "auto") for run in runs}
    return settings.pop() if len(settings) == 1 else "auto"


def context_budget(model: Any, max_new_tokens: int) -> int:
    """Prompt tokens that leave room for the answer in the model's context window."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    context = int(getattr(base.config, "max_position_embeddings", 0) or 4096)
    return max(64, context - max_new_tokens)


def write_comparison(entries: Sequence[tuple[str, EvalResult]], runs: Sequence[tuple[str, Path]], output: Path,
                     notes: Sequence[str], title: str = "Fine-tuning vs prompting") -> Path:
    """Save each result as `output/results/<approach>.json` and write the report; return report.html."""
    results = output / "results"
    results.mkdir(parents=True, exist_ok=True)
    for name, result in entries:
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        (results / f"{slug}.json").write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return write_report(entries, runs, output, title, notes)[1]
