"""The device script: correctness on the accelerator first, then speed and memory against TRL.

    python bench/gpu_check.py              # on one CUDA GPU: about 6 minutes on an H100/H200
    python bench/gpu_check.py --reduced    # tiny shapes on whatever is here (CI runs it on CPU)

Correctness (each check records pass/fail, numbers, or why it was skipped):

1. `varlen`: packed rows through the variable-length attention path (PyTorch's Flash varlen
   kernel on CUDA) give the same loss and gradients as every example alone.
2. `bf16_vs_fp32`: the bf16 policy (frozen base in bf16, fp32 LoRA weights, bf16 autocast)
   against fp32 on one fixed batch: relative loss difference.
3. `chunked_loss`: the chunked cross-entropy equals the full one (loss and gradients).
4. `qlora`: a QLoRA step on a 4-bit NF4 base, then the merge into the dequantised weights
   and its parity (merged vs base + adapter logits). CUDA + bitsandbytes.
5. `adamw_8bit`: one 8-bit AdamW step. CUDA + bitsandbytes.
6. `resume`: 4 steps straight vs 2 steps, a new process, `--resume` for 2 more: bitwise
   equal weights.

Speed (`bench/compare_trl.py`, alternating fresh processes, random weights, 16 examples of
log-normal length per step, median 200 tokens): finesmith vs TRL + PEFT (padding-free with
flash-attn and Liger kernels when installed) for SmolLM2-135M and 1.7B shapes, LoRA and
full, with MFU from the model's FLOPs per token and the GPU's dense bf16 peak. `--reduced`
runs the tiny shape for 2 steps (finesmith alone when TRL is not installed).

Everything goes to bench/results/gpu_check[_reduced].json, written after every item so a
run that is cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest.make_tiny_model: a random Llama with a real tokenizer

try:
    import finesmith  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

QA = [("What colour is the sky?", "blue"), ("How many legs does a cat have?", "four"),
      ("Capital of France?", "Paris"), ("What do bees make?", "honey"), ("Largest planet?", "Jupiter")]


def tiny_model(folder: Path) -> str:
    from conftest import make_tiny_model

    return str(make_tiny_model(folder))


def examples(model_dir: str):
    from transformers import AutoTokenizer

    from finesmith.data.formats import Example
    from finesmith.data.tokenize import tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [Example(({"role": "user", "content": q}, {"role": "assistant", "content": a * 4}), f"c:{i}")
            for i, (q, a) in enumerate(QA)]
    return tokenize_examples(tokenizer, rows, max_length=256)[0]


def build(model_dir: str, method: str, device: str, precision: str = "fp32"):
    from finesmith.config import TrainConfig
    from finesmith.model.methods import apply_method, keep_trained_in_fp32, load_base_model

    config = TrainConfig(model=model_dir, data="-", output="-", method=method, precision=precision)
    config.lora.r, config.lora.dropout = 8, 0.0
    torch.manual_seed(0)
    return keep_trained_in_fp32(apply_method(load_base_model(config, device), config))


def loss_grads(model, batch, device, precision="fp32"):
    from finesmith.train.loop import autocast, to_device
    from finesmith.train.objectives import sft_loss

    model.zero_grad(set_to_none=True)
    with autocast(torch.device(device), precision):
        loss, _ = sft_loss(model, to_device(batch, torch.device(device)))
    loss.backward()
    return float(loss), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def max_relative(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in b)


def check_varlen(model_dir: str, device: str) -> dict:
    from finesmith.data.pack import pack_batch
    from finesmith.model.attention import cuda_kernel_available, pack_varlen, use_varlen

    precision = "bf16" if device == "cuda" else "fp32"  # the Flash kernel runs in half precision
    exs = examples(model_dir)
    model = build(model_dir, "lora", device)
    alone_loss, alone = 0.0, {}
    for ex in exs:
        loss, grads = loss_grads(model, pack_batch([ex]), device, precision)
        alone_loss += loss
        for k, g in grads.items():
            alone[k] = alone.get(k, 0) + g
    use_varlen(model)
    loss, grads = loss_grads(model, pack_varlen(exs), device, precision)
    tolerance = 2e-2 if precision == "bf16" else 1e-4
    rel_loss = abs(loss - alone_loss) / abs(alone_loss)
    rel_grad = max_relative(grads, alone)
    return {"kernel": "torch varlen_attn (Flash)" if device == "cuda" and cuda_kernel_available() else "per-sequence SDPA",
            "precision": precision, "relative_loss_difference": rel_loss, "max_relative_gradient_difference": rel_grad,
            "passed": rel_loss < tolerance and rel_grad < 10 * tolerance}


def check_bf16(model_dir: str, device: str) -> dict:
    from finesmith.data.pack import pack_batch

    batch = pack_batch(examples(model_dir))
    full, _ = loss_grads(build(model_dir, "lora", device, "fp32"), batch, device, "fp32")
    half_model = build(model_dir, "lora", device, "bf16")
    half, _ = loss_grads(half_model, batch, device, "bf16")
    frozen = sorted({str(p.dtype) for p in half_model.parameters() if not p.requires_grad})
    rel = abs(half - full) / abs(full)
    return {"fp32_loss": full, "bf16_loss": half, "relative_difference": rel, "frozen_dtypes": frozen,
            "passed": rel < 2e-2 and frozen == ["torch.bfloat16"]}


def check_chunked(model_dir: str, device: str) -> dict:
    from finesmith.data.pack import pack_batch
    from finesmith.train import objectives

    batch = pack_batch(examples(model_dir))
    model = build(model_dir, "full", device)
    loss, grads = loss_grads(model, batch, device)
    saved = objectives.CHUNK_ABOVE_ELEMENTS, objectives.CHUNK_ELEMENTS
    objectives.CHUNK_ABOVE_ELEMENTS, objectives.CHUNK_ELEMENTS = 0, 7 * model.get_output_embeddings().weight.shape[0]
    try:
        chunked, chunked_grads = loss_grads(model, batch, device)
    finally:
        objectives.CHUNK_ABOVE_ELEMENTS, objectives.CHUNK_ELEMENTS = saved
    rel, grad = abs(chunked - loss) / abs(loss), max_relative(chunked_grads, grads)
    return {"relative_loss_difference": rel, "max_relative_gradient_difference": grad, "passed": rel < 1e-5 and grad < 1e-4}


def check_qlora(model_dir: str, device: str) -> dict:
    if device != "cuda":
        return {"skipped": "QLoRA's 4-bit NF4 base needs a CUDA GPU and bitsandbytes"}
    from finesmith.data.pack import pack_batch
    from finesmith.export.merge import qlora_merge_parity

    model = build(model_dir, "qlora", device, "bf16")
    loss, _ = loss_grads(model, pack_batch(examples(model_dir)), device, "bf16")
    with torch.no_grad():  # move the adapter off zero so the merge has something to merge
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.01)
    parity = qlora_merge_parity(model, torch.tensor([[t for ex in examples(model_dir)[:2] for t in ex.input_ids]]))
    return {"loss": loss, **parity, "passed": bool(torch.isfinite(torch.tensor(loss))) and parity["passed"]}


def check_8bit(model_dir: str, device: str) -> dict:
    if device != "cuda":
        return {"skipped": "8-bit AdamW (bitsandbytes) needs a CUDA GPU"}
    from finesmith.data.pack import pack_batch
    from finesmith.train.optim import build_optimizer

    model = build(model_dir, "lora", device, "bf16")
    optimizer = build_optimizer(model, 1e-3, 0.0, "adamw_8bit")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss, _ = loss_grads(model, pack_batch(examples(model_dir)), device, "bf16")
    optimizer.step()
    moved = sum(int(not torch.equal(before[n], p)) for n, p in model.named_parameters() if p.requires_grad)
    return {"loss": loss, "parameters_updated": moved, "passed": moved > 0}


def check_resume(model_dir: str, device: str, work: Path) -> dict:
    """6 steps straight vs a SIGTERM during step 3 and a resume: bitwise equal weights and losses."""
    import os
    import signal

    from finesmith.train.loop import LoopSettings, Preempted, fit
    from finesmith.train.objectives import sft_loss

    precision = "bf16" if device == "cuda" else "fp32"
    data = examples(model_dir) * 3
    settings = LoopSettings(lr=1e-3, total_steps=6, batch_size=2, grad_accum=2, warmup_steps=1, log_every=1, seed=3,
                            save_every=100, precision=precision)
    calls = {"n": 0}

    def interrupted(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 3 (2 micro-batches per step)
            os.kill(os.getpid(), signal.SIGTERM)
        return sft_loss(model, batch)

    straight_model = build(model_dir, "lora", device, precision)
    straight = fit(straight_model, data, settings, work / "straight")
    try:
        fit(build(model_dir, "lora", device, precision), data, settings, work / "cut", objective=interrupted)
        return {"passed": False, "error": "the stop signal did not stop the run"}
    except Preempted as stopped:
        stopped_at = stopped.step
    resumed_model = build(model_dir, "lora", device, precision)
    resumed = fit(resumed_model, data, settings, work / "cut", resume=True)
    same_losses = resumed.step_losses == straight.step_losses[stopped_at:]
    same_weights = all(torch.equal(a, b) for a, b in zip(straight_model.parameters(), resumed_model.parameters()))
    return {"precision": precision, "stopped_at_step": stopped_at, "losses_bitwise_equal": same_losses,
            "weights_bitwise_equal": same_weights, "passed": same_losses and same_weights}


def speed(preset: str, method: str, steps: int, work: Path) -> dict:
    import importlib.util

    trainers = "finesmith,trl" if importlib.util.find_spec("trl") is not None else "finesmith"
    out = work / f"trl_{preset}_{method}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "compare_trl.py"), "--preset", preset, "--method", method,
           "--steps", str(steps), "--repeats", "1", "--trainers", trainers, "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    result = json.loads(out.read_text())
    result.pop("runs", None)
    if trainers == "finesmith":
        result["trl"] = "not installed (pip install -e '.[bench]'): finesmith alone"
    return result


def mfu(preset: str, method: str, tokens_per_s: float) -> float | None:
    from compare_trl import PRESETS

    from finesmith.advise.model_shape import ModelShape
    from finesmith.advise.timing import GPU_PEAK_FLOPS, flops_per_token, gpu_family

    if not torch.cuda.is_available():
        return None
    family = gpu_family(torch.cuda.get_device_name())
    if family is None:
        return None
    try:
        shape = ModelShape.from_config_dict(dict(PRESETS[preset], tie_word_embeddings=True))
        return tokens_per_s * flops_per_token(shape, method, 200) / GPU_PEAK_FLOPS[family]
    except Exception:  # MFU is a derived figure; never lose the measurement over it
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="tiny shapes, few steps: the CI smoke run")
    parser.add_argument("--output", help="result JSON (default bench/results/gpu_check[_reduced].json)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.output or ROOT / "bench" / "results" / f"gpu_check{'_reduced' if args.reduced else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                     "reduced": args.reduced, "date": time.strftime("%Y-%m-%d"), "checks": {}, "speed": {}}

    def record(section: str, name: str, fn) -> None:
        started = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # a failing check is a result, not the end of the run
            value = {"passed": False, "error": f"{type(exc).__name__}: {exc}",
                     "where": traceback.format_exc().strip().splitlines()[-3:]}
        value["seconds"] = round(time.perf_counter() - started, 1)
        results[section][name] = value
        out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"{section}/{name}: {json.dumps(value, default=str)}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = tiny_model(work / "tiny")
        record("checks", "varlen", lambda: check_varlen(model_dir, device))
        record("checks", "bf16_vs_fp32", lambda: check_bf16(model_dir, device))
        record("checks", "chunked_loss", lambda: check_chunked(model_dir, device))
        record("checks", "qlora", lambda: check_qlora(model_dir, device))
        record("checks", "adamw_8bit", lambda: check_8bit(model_dir, device))
        record("checks", "resume", lambda: check_resume(model_dir, device, work / "resume"))
        runs = [("tiny", "lora", 2)] if args.reduced else [
            ("smollm2-135m", "lora", 8), ("smollm2-135m", "full", 8), ("smollm2-1.7b", "lora", 6),
            ("smollm2-1.7b", "full", 6)]
        for preset, method, steps in runs:
            def measure(preset=preset, method=method, steps=steps):
                value = speed(preset, method, steps, work)
                if "finesmith" in value.get("tokens_per_s", {}):
                    value["finesmith_mfu"] = mfu(preset, method, value["tokens_per_s"]["finesmith"])
                return value
            record("speed", f"{preset}_{method}", measure)
    failed = [name for name, value in results["checks"].items() if value.get("passed") is False]
    print(f"written to {out}; checks failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
