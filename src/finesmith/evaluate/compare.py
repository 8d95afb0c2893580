"""`finesmith compare`: does fine-tuning beat prompting on this held-out file?

Evaluates the base model zero-shot, the base model k-shot (when asked) and each fine-tuned
run folder on the same examples, saves every result as JSON and writes the report.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path

from finesmith.errors import FinesmithError
from finesmith.evaluate.report import write_report
from finesmith.evaluate.tasks import EvalOptions, EvalResult


def compare(data: str, base: str, runs: Sequence[str], output: Path, shots_from: str | None = None,
            options: EvalOptions | None = None, limit: int | None = None) -> list[tuple[str, EvalResult]]:
    """Evaluate base (0-shot and `options.shots`-shot) and each run; write the report into `output`.

    Args:
        data: held-out file shared by every approach.
        base: base model (alias, folder, .gguf or hub id).
        runs: finesmith run folders (LoRA or full fine-tunes), evaluated zero-shot.
        output: report folder (`report.md`, `report.html`, `results/*.json`).
        shots_from: training file the k-shot prompts draw from.
        options: evaluation options; `shots` sets k for the base model only.
        limit: evaluate only the first N examples.

    Returns:
        (approach name, result) pairs in report order.
    """
    from finesmith.core.device import pick_device
    from finesmith.model.methods import load_for_inference
    from finesmith.pipeline import evaluate
    from finesmith.run import load_run

    options = (options or EvalOptions()).validate()
    if options.shots and not shots_from:
        raise FinesmithError("--shots needs --shots-from TRAIN.jsonl to draw the examples from")
    for run in runs:
        load_run(run)  # refuses a folder that is not a run, before any model is loaded
    zero = dataclasses.replace(options, shots=0)
    loaded = load_for_inference(base, device=str(pick_device()))
    entries = [("base · zero-shot", evaluate(base, data, options=zero, limit=limit, loaded=loaded))]
    if options.shots:
        entries.append((f"base · {options.shots}-shot ({options.shot_strategy})",
                        evaluate(base, data, shots_from=shots_from, options=options, limit=limit, loaded=loaded)))
    del loaded
    for run in runs:
        entries.append((f"fine-tuned · {run}", evaluate(run, data, options=zero, limit=limit)))
    notes = [f"held-out data: {data} ({entries[0][1].n} examples)", f"base model: {base}"]
    write_comparison(entries, [(str(run), Path(run)) for run in runs], output, notes)
    return entries


def write_comparison(entries: Sequence[tuple[str, EvalResult]], runs: Sequence[tuple[str, Path]], output: Path,
                     notes: Sequence[str], title: str = "Fine-tuning vs prompting") -> Path:
    """Save each result as `output/results/<approach>.json` and write the report; return report.html."""
    results = output / "results"
    results.mkdir(parents=True, exist_ok=True)
    for name, result in entries:
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        (results / f"{slug}.json").write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return write_report(entries, runs, output, title, notes)[1]
