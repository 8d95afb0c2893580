"""Memory estimator vs CUDA measurement: predicted peak vs torch.cuda.max_memory_allocated.

Trains a few real steps per configuration on the GPU (built-in model: full and LoRA at two
sequence lengths) and writes bench/results/memory_gpu.json. The estimator's CUDA runtime
overhead (context, cuBLAS workspace, allocator slack) is invisible to max_memory_allocated,
so it is left out of the comparison. On a machine without CUDA it says so and exits 0.

    .venv/bin/python bench/memory_gpu.py [--model smollm2-135m-instruct] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

CONFIGS = [("full", 256, 4), ("full", 1024, 4), ("lora", 256, 4), ("lora", 1024, 4)]  # method, tokens, batch


def measure(model: str, method: str, max_length: int, batch_size: int, steps: int) -> int:
    import torch

    from finesmith.advise.measure import synthetic_data
    from finesmith.config import load_config
    from finesmith.core.console import console
    from finesmith.pipeline import train

    console.quiet = True
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp) / "data.jsonl", max(16, batch_size * steps))
        train(load_config(flags={"model": model, "data": data, "output": str(Path(tmp) / "run"), "method": method,
                                 "max_length": max_length, "batch_size": batch_size, "max_steps": steps}))
    return int(torch.cuda.max_memory_allocated())


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "memory_gpu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("memory_gpu: no CUDA device here; run this benchmark on a machine with an NVIDIA GPU")
        return 0
    from finesmith.advise.memory import RunShape, estimate_memory
    from finesmith.advise.model_shape import read_model_shape

    shape = read_model_shape(args.model)
    rows = []
    for method, length, batch in CONFIGS:
        measured = measure(args.model, method, length, batch, args.steps)
        estimate = estimate_memory(shape, RunShape(method, length * batch, (length - 12) * batch, "cuda"))
        predicted = estimate.peak - estimate.components["runtime"]
        rows.append({"method": method, "max_length": length, "batch_size": batch, "measured_bytes": measured,
                     "predicted_bytes": predicted, "relative_error": round((predicted - measured) / measured, 4)})
        print(f"{method:5s} {length:5d}×{batch}: measured {measured / 2**30:.2f} GiB, "
              f"predicted {predicted / 2**30:.2f} GiB ({rows[-1]['relative_error']:+.1%})")
    result = {"device": torch.cuda.get_device_name(0), "model": args.model, "steps": args.steps, "runs": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
