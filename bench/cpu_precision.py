"""Should the CPU train in bf16? fp32 vs bf16 autocast on the built-in model, LoRA, same steps.

    python bench/cpu_precision.py [--steps 4]

Loads SmolLM2-135M-Instruct twice (fp32; and the bf16 policy: frozen base in bf16, LoRA
weights in fp32, bf16 autocast), trains each for the same few optimizer steps on the same
batches of the demo task (8 examples per step), alternating the two so that machine noise
hits both, and writes seconds per step and the loss of every step to
bench/results/cpu_precision.json. The CPU default (`precision: auto` = fp32 on CPUs) follows
from this measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "cpu_precision.json"

try:
    import finesmith  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

from finesmith.config import TrainConfig  # noqa: E402
from finesmith.data.formats import load_examples  # noqa: E402
from finesmith.data.pack import pack_batch  # noqa: E402
from finesmith.data.tokenize import tokenize_examples  # noqa: E402
from finesmith.demo import demo_data  # noqa: E402
from finesmith.model.load import load_chat_tokenizer  # noqa: E402
from finesmith.model.methods import apply_method, keep_trained_in_fp32, load_base_model  # noqa: E402
from finesmith.train.loop import autocast, split_rows  # noqa: E402
from finesmith.train.objectives import sft_loss  # noqa: E402

MODEL = "smollm2-135m-instruct"


def build(precision: str):
    config = TrainConfig(model=MODEL, data="-", output="-", method="lora", precision=precision)
    config.lora.dropout = 0.0
    torch.manual_seed(0)
    model = keep_trained_in_fp32(apply_method(load_base_model(config, "cpu"), config))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer


def step(model, optimizer, batch, precision: str) -> tuple[float, float]:
    started = time.perf_counter()
    count = int((batch["targets"] != -100).sum())
    total = 0.0
    for row in split_rows(batch):
        with autocast(torch.device("cpu"), precision):
            loss, _ = sft_loss(model, row)
        (loss / count).backward()
        total += float(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started, total / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    tokenizer, _ = load_chat_tokenizer(MODEL)
    train_file, _ = demo_data()
    tokenized = tokenize_examples(tokenizer, load_examples(train_file)[:8 * args.steps], 256)[0]
    batches = [pack_batch(tokenized[i:i + 8]) for i in range(0, len(tokenized), 8)]
    runs = {name: build(name) for name in ("fp32", "bf16")}
    results = {"model": MODEL, "method": "lora", "examples_per_step": 8, "steps": args.steps,
               "cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "fp32": {"seconds": [], "loss": []}, "bf16": {"seconds": [], "loss": []}}
    for batch in batches:
        for name, (model, optimizer) in runs.items():
            seconds, loss = step(model, optimizer, batch, name)
            results[name]["seconds"].append(round(seconds, 2))
            results[name]["loss"].append(round(loss, 5))
            print(f"{name}: {seconds:.1f} s, loss {loss:.4f}", flush=True)
    for name in ("fp32", "bf16"):
        times = sorted(results[name]["seconds"])
        results[name]["median_seconds_per_step"] = times[len(times) // 2]
    results["bf16_over_fp32_time"] = round(results["bf16"]["median_seconds_per_step"]
                                           / results["fp32"]["median_seconds_per_step"], 2)
    results["max_relative_loss_difference"] = round(max(
        abs(a - b) / abs(a) for a, b in zip(results["fp32"]["loss"], results["bf16"]["loss"])), 5)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: results[k] for k in ("bf16_over_fp32_time", "max_relative_loss_difference")}))


if __name__ == "__main__":
    main()
