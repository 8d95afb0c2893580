"""GPU check: bf16 LoRA, full fine-tuning and QLoRA for a few steps on the built-in model.

Records training tokens/s and peak GPU memory (`torch.cuda.max_memory_allocated`) per method
to bench/results/gpu_check.json. Needs a CUDA GPU (and bitsandbytes for QLoRA); on a
machine without one it says so and exits cleanly.

    python bench/gpu_check.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "gpu_check.json"
METHODS = ("lora", "full", "qlora")


def run_method(method: str, steps: int, workdir: Path) -> dict[str, object]:
    """Train `method` for `steps` steps on the built-in task; return speed and peak memory."""
    from finesmith.config import load_config
    from finesmith.demo import demo_data
    from finesmith.errors import FinesmithError
    from finesmith.pipeline import train

    train_file, _ = demo_data()
    config = load_config(None, [f"method={method}", f"max_steps={steps}", "batch_size=8", "log_every=5"],
                         {"model": "smollm2-135m-instruct", "data.path": train_file, "output": str(workdir / method)})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        outcome = train(config, overwrite=True)
    except FinesmithError as exc:
        return {"method": method, "error": str(exc)}
    return {"method": method, "steps": outcome.result.steps, "tokens_per_s": round(outcome.result.tokens_per_second, 1),
            "max_memory_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "final_loss": round(outcome.result.final_loss, 4), "trainable": outcome.trainable, "total": outcome.total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; nothing to measure (run it on a GPU machine)")
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            results.append(run_method(method, args.steps, Path(tmp)))
            print(json.dumps(results[-1]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                   "autocast": "bf16", "results": results}, indent=2), encoding="utf-8")
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
