"""Many fine-tunes on one base: memory and mixed-batch speed of shared-base serving.

    python bench/serve_adapters.py [--adapters 8] [--tokens 32] [--work /tmp/finesmith-bench-adapters]

Trains `--adapters` tiny LoRA runs of the built-in SmolLM2-135M-Instruct (r=8, 2 steps each,
a different seed and learning rate each, so they differ; each `finesmith train` in its own
process, skipped when the run is already there), then in this process serves the base and
every run from one `ModelRegistry`, the way `finesmith serve BASE RUN1 ... RUN8` does:

- memory: VmRSS after the base is loaded (and a base-only batch has run, so allocator warm-up
  is not counted as adapters), then after one mixed batch has loaded all the adapters, with
  VmHWM; the growth is compared with the adapters' file sizes and the base's size, against
  the target growth <= adapters + 15% of the base (merging each run used to add a whole base);
- speed: completion tokens/s of one mixed batch of `--adapters` requests (one per adapter,
  through the engine, per-row routing) against switching: the same requests one at a time,
  `set_adapter` before each (no routing). Greedy, at most `--tokens` new tokens (a row ends
  earlier at its end of turn); the two ways' answers must be equal. Best of three each,
  alternating.

Writes bench/results/serve_adapters.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "serve_adapters.json"
MODEL = "smollm2-135m-instruct"
QA = [("What colour is the sky?", "blue"), ("How many legs does a cat have?", "four"), ("What is 2 plus 2?", "4"),
      ("Capital of France?", "Paris"), ("Opposite of hot?", "cold"), ("Say hello.", "hello"),
      ("Colour of grass?", "green"), ("What do bees make?", "honey"), ("Largest planet?", "Jupiter"),
      ("How many days in a week?", "seven"), ("Freezing point of water in C?", "0"), ("First letter?", "a")]
TOPICS = ["rivers", "volcanoes", "bees", "glaciers", "comets", "tides", "owls", "deserts", "coral", "thunder"]
MIB = 1 << 20

try:
    import finesmith  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT / "src"))


def memory() -> dict[str, float]:
    """VmRSS and VmHWM of this process, MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def train_runs(work: Path, count: int) -> list[Path]:
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in QA))
    runs = []
    for i in range(count):
        run = work / f"lora{i}"
        if not (run / "adapter_model.safetensors").is_file():
            subprocess.run([sys.executable, "-m", "finesmith.cli", "train", "--model", MODEL, "--data", str(data),
                            "--method", "lora", "--output", str(run), "--overwrite", "--max-steps", "2",
                            "--batch-size", "4", "--lr", f"{(i + 1) * 2e-3}", "--seed", str(i + 1), "lora.r=8"],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        runs.append(run)
    return runs


def prompts(engines) -> list[list[int]]:
    return [e.chat_ids([{"role": "user", "content": f"In two sentences, what is interesting about "
                                                    f"{TOPICS[i % len(TOPICS)]}?"}]) for i, e in enumerate(engines)]


def together(core, engines, ids, tokens: int) -> tuple[list[list[int]], float]:
    """One batch of every (engine, prompt) through the shared worker; the tokens and the seconds."""
    from finesmith.serve.engine import Sampling

    generations = [e.generate(p, Sampling(tokens)) for e, p in zip(engines, ids)]
    started = time.perf_counter()
    with core._state:  # all queued before the worker takes a batch
        for g in generations:
            g.submit()
    for g in generations:
        g.done.wait()
    seconds = time.perf_counter() - started
    assert {g.batch_size for g in generations} == {len(generations)}, "not one batch"
    return [g.tokens for g in generations], seconds


def switching(core, engines, ids, tokens: int) -> tuple[list[list[int]], float]:
    """The same requests one at a time, the model switched to each one's adapter (`set_adapter`)."""
    import torch

    from finesmith.serve.batch import Row, decode_batch

    out, started = [], time.perf_counter()
    for engine, prompt in zip(engines, ids):
        core.model.set_adapter(engine.adapter_id)
        row = Row(prompt, tokens, 0.0, 1.0, torch.Generator(), lambda piece: True, lambda: False)
        decode_batch(core.model, engine.tokenizer, [row], set(engine.stop_ids), engine.stop_ids[0], lambda: None)
        out.append(row.tokens)
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--work", default="/tmp/finesmith-bench-adapters")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runs = train_runs(work, args.adapters)
    train_s = time.time() - started

    import torch

    from finesmith.model.load import resolve_model_path
    from finesmith.serve.registry import ModelRegistry

    at_start = memory()
    registry = ModelRegistry(max_adapters=args.adapters)
    registry.add(MODEL, "base")
    names = [registry.add(str(run), f"ft:smollm2:lora{i}") for i, run in enumerate(runs)]
    base = registry.engine("base")
    core = base.core
    base_bytes = sum(p.numel() * p.element_size() for p in core.base.parameters())
    base_files = sum(f.stat().st_size for f in Path(resolve_model_path(MODEL)[0]).glob("*.safetensors"))
    # a base-only batch of the same shape first: the allocator's warm-up is not the adapters'
    together(core, [base] * args.adapters, prompts([base] * args.adapters), args.tokens)
    before = memory()
    engines = [registry.engine(n) for n in names]
    ids = prompts(engines)
    mixed_warm, _ = together(core, engines, ids, args.tokens)  # loads every adapter, in the worker
    after = memory()
    adapter_files = sum((run / "adapter_model.safetensors").stat().st_size for run in runs)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in core.model.named_parameters() if "lora_" in n)
    growth = (after["VmRSS"] - before["VmRSS"]) * MIB
    budget = adapter_files + 0.15 * base_bytes

    timings = {"mixed": [], "switching": []}
    for _ in range(3):  # alternate, best of three each (others share this machine's cores)
        mixed, seconds = together(core, engines, ids, args.tokens)
        timings["mixed"].append(seconds)
        switched, seconds = switching(core, engines, ids, args.tokens)
        timings["switching"].append(seconds)
    assert mixed == mixed_warm
    generated = sum(len(t) for t in mixed)
    result = {
        "command": " ".join(["python bench/serve_adapters.py"] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32",
        "model": MODEL, "adapters": args.adapters, "tokens_per_request": args.tokens, "lora_r": 8,
        "train_seconds_all_runs": round(train_s, 1),
        "registry": {"engines": len(registry.loaded()), "bases": len(registry.bases),
                     "adapters_loaded": len(core.model.peft_config), "adapter_loads": core.loads},
        "memory_mib": {
            "rss_start": round(at_start["VmRSS"], 1), "rss_base_loaded": round(before["VmRSS"], 1),
            "rss_all_adapters_loaded": round(after["VmRSS"], 1), "hwm_end": round(after["VmHWM"], 1),
            "rss_growth_for_adapters": round(growth / MIB, 1),
            "adapter_files": round(adapter_files / MIB, 1), "adapter_parameters": round(adapter_bytes / MIB, 1),
            "base_parameters": round(base_bytes / MIB, 1), "base_files": round(base_files / MIB, 1),
            "target_growth_adapters_plus_15pct_base": round(budget / MIB, 1),
            "merged_each_run_would_add": round(args.adapters * base_bytes / MIB, 1),
        },
        "within_target": growth <= budget,
        "throughput": {
            "mixed_batch_seconds": round(min(timings["mixed"]), 3),
            "switching_seconds": round(min(timings["switching"]), 3),
            "mixed_batch_tokens_per_s": round(generated / min(timings["mixed"]), 1),
            "switching_tokens_per_s": round(generated / min(timings["switching"]), 1),
            "speedup": round(min(timings["switching"]) / min(timings["mixed"]), 2),
            "completion_tokens": generated,
            "all_seconds": {k: [round(s, 3) for s in v] for k, v in timings.items()},
        },
        "mixed_equals_switching": mixed == switched,
        "adapters_answer_differently": len({tuple(t) for t in mixed}) > 1,
    }
    registry.close()
    registry.join(10)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
