"""finesmith vs TRL SFTTrainer on the same work: tokens/s, peak memory, loss.

Both trainers get the same random-initialised model (saved once, loaded by each), the
same pre-tokenized prompt/completion data (seeded, log-normal lengths, loss on the
completion only), the same examples per optimizer step, optimizer, learning rate and
schedule. Each run is a fresh process, alternating finesmith / TRL, so peak memory is
per trainer and warm caches favour neither.

    pip install -e ".[bench]"      # TRL and its dependencies (bench only)
    python bench/compare_trl.py --preset smollm2-135m --method lora

Writes bench/results/compare_trl_<preset>_<method>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PRESETS = {
    # name: LlamaConfig fields (SmolLM2 shapes use SmolLM2's real dimensions)
    "tiny": dict(vocab_size=8192, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3),
    "smollm2-1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32),
}
LR = {"lora": 2e-4, "full": 2e-5}
LORA = dict(r=16, alpha=32, dropout=0.0)


def make_data(n: int, median: int, seed: int, vocab: int, max_len: int = 1024) -> list[dict]:
    """Prompt/completion examples with log-normal lengths; the last 40% of each is the completion."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.6, n).astype(int), 16, max_len)
    rows = []
    for n_tokens in lengths:
        ids = rng.integers(3, vocab, int(n_tokens)).tolist()
        prompt = int(round(0.6 * n_tokens))
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (int(n_tokens) - prompt)})
    return rows


def peak_memory_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    from finesmith.advise.measure import peak_rss_bytes

    return peak_rss_bytes() / 2**20  # this worker's own peak (VmHWM: not inherited from the parent)


def run_finesmith(spec: dict) -> dict:
    import torch

    from finesmith.config import LoraSettings, TrainConfig
    from finesmith.data.tokenize import TokenizedExample
    from finesmith.model.methods import apply_method
    from finesmith.train.loop import LoopSettings, fit, micro_batches
    from transformers import AutoModelForCausalLM

    from finesmith.core.device import training_precision
    from finesmith.model.attention import pack_varlen, resolve_attention, use_varlen
    from finesmith.model.methods import keep_trained_in_fp32

    device = spec["device"]
    # finesmith's own policy: on CUDA the frozen base of an adapter run is stored in bf16
    # (fp32 LoRA weights, bf16 autocast) and packed rows use variable-length attention
    precision = training_precision("auto", device)
    dtype = torch.bfloat16 if precision == "bf16" and spec["method"] != "full" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, attn_implementation="sdpa").to(device)
    config = TrainConfig(model="bench", data="bench", output="bench", method=spec["method"],
                         lora=LoraSettings(**LORA))
    torch.manual_seed(0)
    model = keep_trained_in_fp32(apply_method(model, config))
    attention = resolve_attention("auto", device)
    collate_kwargs = {}
    if attention == "varlen":
        use_varlen(model)
        collate_kwargs["collate"] = pack_varlen
    if spec.get("compile"):
        from finesmith.pipeline import compile_body

        compile_body(model)
    rows = json.loads(Path(spec["data"]).read_text())
    examples = [TokenizedExample(tuple(r["input_ids"]), tuple(bool(m) for m in r["completion_mask"]), f"bench:{i}")
                for i, r in enumerate(rows)]
    settings = LoopSettings(lr=LR[spec["method"]], total_steps=spec["steps"], batch_size=spec["batch"],
                            log_every=1, seed=0, max_grad_norm=1.0, precision=precision)
    with tempfile.TemporaryDirectory() as out:
        fit(model, examples, settings, Path(out), **collate_kwargs)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    # Exact non-padding tokens per step: replay the loop's own (seeded) batch order.
    stream = micro_batches(examples, settings)
    tokens = [sum(len(ex) for ex in next(stream)) for _ in range(spec["steps"])]
    ends = [r["elapsed_s"] for r in records]
    return summarise(tokens, ends, [r["loss"] for r in records], spec)


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    device = spec["device"]
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = json.loads(Path(spec["data"]).read_text())
    dataset = Dataset.from_list(rows)
    ends, losses, seen = [], [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])
                seen.append(logs.get("num_tokens"))

    liger = device == "cuda" and _installed("liger_kernel")
    # TRL's best settings on a GPU: padding-free batches need a varlen attention kernel
    padding_free = device == "cuda" and _installed("flash_attn")
    if padding_free:
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                     attn_implementation="flash_attention_2")
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
            max_steps=spec["steps"], learning_rate=LR[spec["method"]], lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            logging_steps=1, report_to="none", save_strategy="no", use_cpu=device == "cpu", bf16=device == "cuda",
            completion_only_loss=True, max_length=None, padding_free=padding_free, seed=0, disable_tqdm=True,
            dataloader_num_workers=0, use_liger_kernel=liger, optim="adamw_torch_fused" if device == "cuda" else "adamw_torch")
        peft_config = None
        if spec["method"] == "lora":
            peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                     target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[Clock()])
        trainer.train()
    totals = [int(s) for s in seen]  # cumulative non-padding tokens
    tokens = [b - a for a, b in zip([0] + totals[:-1], totals)]
    result = summarise(tokens, ends, losses, spec)
    result["liger_kernel"], result["padding_free"] = liger, padding_free
    return result


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def summarise(tokens: list[int], ends: list[float], losses: list[float], spec: dict) -> dict:
    """Tokens/s over the steps after the warm-up steps; peak memory of this process."""
    warm = spec["warmup_steps"]
    seconds = ends[-1] - ends[warm - 1] if warm else ends[-1]
    return {"tokens_per_s": sum(tokens[warm:]) / seconds, "timed_steps": len(tokens) - warm,
            "timed_tokens": sum(tokens[warm:]), "seconds": seconds,
            "peak_memory_mib": peak_memory_mib(spec["device"]), "losses": losses, "final_loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--method", choices=sorted(LR), default="lora")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the timing")
    parser.add_argument("--batch", type=int, default=16, help="examples per optimizer step")
    parser.add_argument("--median-length", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per trainer")
    parser.add_argument("--output", help="result JSON (default bench/results/compare_trl_<preset>_<method>_<device>.json)")
    parser.add_argument("--trainers", default="finesmith,trl",
                        help="which to run (finesmith alone checks the harness where TRL is not installed)")
    parser.add_argument("--compile", action="store_true", help="finesmith with compile: true (torch.compile, dynamic)")
    parser.add_argument("--before", metavar="CHECKOUT",
                        help="also train with an earlier finesmith (a checkout, e.g. from `git worktree add`), "
                             "alternating with this one, and report this one's speed and memory as ratios to it")
    parser.add_argument("--worker", choices=["finesmith", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.spec)
        result = (run_finesmith if args.worker == "finesmith" else run_trl)(spec)
        print("RESULT " + json.dumps(result))
        return
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="compare-trl-"))
    tokenizer = AutoTokenizer.from_pretrained(HERE.parent / "tests" / "assets" / "tokenizer-chatml")
    shape = PRESETS[args.preset]
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    data = make_data(args.steps * args.batch, args.median_length, 0, shape["vocab_size"])
    (work / "data.json").write_text(json.dumps(data))
    spec = {"model_dir": str(work / "model"), "data": str(work / "data.json"), "method": args.method,
            "steps": args.steps, "batch": args.batch, "warmup_steps": args.warmup_steps, "device": device,
            "compile": args.compile}
    trainers = [t for t in ("finesmith", "trl") if t in args.trainers.split(",")]
    if args.before:  # the earlier checkout's own worker, importing the earlier package
        trainers.insert(1, "before")
    runs: dict[str, list[dict]] = {name: [] for name in trainers}
    for repeat in range(args.repeats):
        for name in trainers:
            script, env = __file__, os.environ
            if name == "before":
                script = str(Path(args.before) / "bench" / "compare_trl.py")
                env = {**os.environ, "PYTHONPATH": str(Path(args.before).resolve() / "src")}
            proc = subprocess.run([sys.executable, script, "--worker", "finesmith" if name == "before" else name,
                                   "--spec", json.dumps(spec)], capture_output=True, text=True, env=env)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{name} run failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(line[len("RESULT "):]))
            r = runs[name][-1]
            print(f"[{repeat + 1}/{args.repeats}] {name:9s} {r['tokens_per_s']:9.1f} tok/s  "
                  f"peak {r['peak_memory_mib']:8.0f} MiB  final loss {r['final_loss']:.4f}", flush=True)
    best = {name: max(rs, key=lambda r: r["tokens_per_s"]) for name, rs in runs.items()}
    summary = {
        "preset": args.preset, "method": args.method, "device": device_name(device),
        "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.executable).name] + sys.argv),
        "settings": {k: spec[k] for k in ("steps", "batch", "warmup_steps", "compile")} | {
            "median_length": args.median_length, "repeats": args.repeats, "lr": LR[args.method],
            "lora": LORA if args.method == "lora" else None, "precision": "bf16" if device == "cuda" else "fp32"},
        "tokens_per_s": {n: round(b["tokens_per_s"], 1) for n, b in best.items()},
        "peak_memory_mib": {n: round(min(r["peak_memory_mib"] for r in rs)) for n, rs in runs.items()},
        "final_loss": {n: round(b["final_loss"], 4) for n, b in best.items()},
        "runs": runs,
    }
    if "before" in runs:
        summary["vs_before"] = {
            "checkout": args.before,
            "speed_ratio": round(best["finesmith"]["tokens_per_s"] / best["before"]["tokens_per_s"], 3),
            "memory_ratio": round(min(r["peak_memory_mib"] for r in runs["finesmith"]) /
                                  min(r["peak_memory_mib"] for r in runs["before"]), 3)}
        print(f"finesmith now / before: {summary['vs_before']['speed_ratio']}x tokens/s, "
              f"{summary['vs_before']['memory_ratio']}x peak memory")
    if "trl" in runs and "finesmith" in runs:
        summary["speedup"] = round(best["finesmith"]["tokens_per_s"] / best["trl"]["tokens_per_s"], 2)
        summary["memory_ratio"] = round(min(r["peak_memory_mib"] for r in runs["finesmith"]) /
                                        min(r["peak_memory_mib"] for r in runs["trl"]), 3)
    out = Path(args.output or HERE / "results" / f"compare_trl_{args.preset}_{args.method}_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    if "speedup" in summary:
        print(f"finesmith / TRL: {summary['speedup']}x tokens/s, {summary['memory_ratio']}x peak memory -> {out}")
    else:
        print(f"{trainers[0]}: {summary['tokens_per_s'][trainers[0]]} tok/s -> {out}")


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
