"""Evaluation speed on the built-in model: 500 ticket-triage examples, zero-shot.

    python bench/eval_speed.py [N]

Makes N (default 500) fresh tickets with the demo task's generator
(examples/support_triage/make_data.py, another seed than the shipped data), loads the
built-in SmolLM2-135M-Instruct once, and times the two classification scorings:
greedy generation (batched, left-padded, KV cache) and label log-likelihood (every
prompt against all 15 labels, prompt-sharing packed rows). Writes
bench/results/eval_speed.json with seconds and examples/s of each.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "eval_speed.json"
MODEL = "smollm2-135m-instruct"

try:
    import finesmith  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT / "src"))

from finesmith.data.formats import Example  # noqa: E402
from finesmith.evaluate.tasks import EvalOptions, evaluate_examples  # noqa: E402
from finesmith.model.methods import load_for_inference  # noqa: E402


def make_examples(n: int, seed: int = 7) -> list[Example]:
    """n synthetic tickets from the demo generator, as chat examples."""
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "examples" / "support_triage" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    rows = make_data.make(n, random.Random(seed), set())
    return [Example(tuple(row["messages"]), f"generated:{i + 1}") for i, row in enumerate(rows)]


def time_scoring(model, tokenizer, examples: list[Example], scoring: str) -> dict:
    options = EvalOptions(task="classification", scoring=scoring, max_new_tokens=12, batch_size=16)
    started = time.perf_counter()
    result = evaluate_examples(model, tokenizer, examples, options=options)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "examples_per_s": round(len(examples) / seconds, 2),
            "accuracy": result.accuracy}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    examples = make_examples(n)
    model, tokenizer = load_for_inference(MODEL)
    results = {"model": MODEL, "examples": n, "shots": 0, "labels": 15, "max_new_tokens": 12, "batch_size": 16,
               "device": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(),
               "load_average_1m_at_start": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for scoring in ("generate", "loglik"):
        results[scoring] = time_scoring(model, tokenizer, examples, scoring)
        print(f"{scoring:9s} {results[scoring]['seconds']:8.1f} s  {results[scoring]['examples_per_s']:6.2f} examples/s  "
              f"accuracy {results[scoring]['accuracy']:.3f}", flush=True)
        # written after each mode, so a long run that is stopped still leaves what it measured
        RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
