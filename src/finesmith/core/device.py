"""Which device a command runs on."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def training_precision(precision: str, device: str | torch.device) -> str:
    """`fp32` or `bf16`: what a training run computes in.

    `auto` is bf16 on CUDA GPUs that support it and fp32 elsewhere. On the CPU, bf16 autocast
    was measured slower than fp32 on this project's AVX2 machine (see `bench/cpu_precision.py`
    and the README), so the CPU trains in fp32 unless `precision: bf16` asks otherwise.
    """
    from finesmith.errors import FinesmithError

    kind = torch.device(device).type
    if precision == "auto":
        return "bf16" if kind == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise FinesmithError("precision bf16: this GPU has no bf16 support; use precision: fp32")
    if precision not in ("fp32", "bf16"):
        raise FinesmithError(f"training precision must be auto, fp32 or bf16, not {precision!r}")
    return precision
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The dtype evaluation, chat and serving run the model in.

    `auto`: bf16 on CUDA devices that support it (else fp16), fp16 on Apple GPUs, and fp32
    on the CPU. The CPU stays fp32 because its half-precision matrix products were measured
    far slower on this project's AVX2 machine (a 1280×576 by 576×1536 product: 15 ms in fp32,
    1.9 s in bf16, 1.8 s in fp16, torch 2.13): without native bf16/fp16 instructions PyTorch
    emulates them. Ask for `bf16` explicitly on a CPU that has them (AMX, AVX512-BF16).
    """
    from finesmith.errors import FinesmithError

    if precision not in PRECISIONS:
        raise FinesmithError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "auto":
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if kind == "mps" else torch.float32
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise FinesmithError("this GPU has no bf16 support; use --precision fp16 or fp32")
    return DTYPES[precision]
