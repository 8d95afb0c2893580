"""The evaluation's memory budget, and the batch and pool sizes that follow from it.

`--eval-memory` bounds what an evaluation holds beyond the model's weights: the shared
prefix's keys and values, a prompt batch in flight and the pool of rows waiting to be
decoded. `auto` takes half of the RAM available when the evaluation starts (CPU), or 80% of
the free GPU memory (CUDA). The prompt batch and the decoding pool are then the largest (no
larger than `--batch-size` and 4 × that) whose estimate (`finesmith.advise.memory.
estimate_eval_memory`) fits, so one command works for a 135M and a 7B model alike, and the
memory of an evaluation does not grow with the number of held-out rows.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import re
from typing import Any

from finesmith.advise.memory import EvalShape, estimate_eval_memory, eval_working_bytes, fit_eval_batches
from finesmith.advise.model_shape import ModelShape
from finesmith.errors import FinesmithError

AUTO = "auto"
CPU_SHARE = 0.5  # of the available RAM: other programs (and a second evaluation) keep the rest
CUDA_SHARE = 0.8  # of the free GPU memory
UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int | None:
    """`auto` as None, else bytes: `4GB`, `2.5GiB`, `800MB`, `1e9`.

    Raises:
        FinesmithError: for anything else (one line, with an example).
    """
    value = str(text).strip().lower()
    if value == AUTO:
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", value)
    if not match or match.group(2) not in UNITS or float(match.group(1)) <= 0:
        raise FinesmithError(f"--eval-memory {text!r}: give a size such as 4GB, 2.5GiB or 800MB, or auto")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def auto_budget(device: Any) -> int:
    """Bytes an evaluation may use beyond the weights when the user does not say: a share of what
    is free now on the device that evaluates."""
    import torch

    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * CUDA_SHARE)
    from finesmith.advise.hardware import available_ram

    return int(available_ram() * CPU_SHARE)


def model_shape(model: Any) -> ModelShape:
    """The loaded model's dimensions (its text decoder's config)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config(decoder=True)
    return ModelShape.from_config_dict(config.to_dict(), getattr(config, "name_or_path", "model") or "model")


def plan_batches(model: Any, wanted: EvalShape, budget: int | None) -> EvalShape:
    """`wanted` with its batch and pool reduced until the estimate fits the budget.

    Args:
        model: the model under evaluation (its shape sizes the estimate).
        wanted: lengths of the work, and the batch and pool asked for.
        budget: bytes, or None for `auto_budget`.
    Raises:
        FinesmithError: when a budget the user gave cannot hold one prompt and one answer.
    """
    limit = budget if budget is not None else auto_budget(next(model.parameters()).device)
    fitted = fit_eval_batches(model_shape(model), wanted, limit)
    if fitted is not None:
        return fitted
    smallest = dataclasses.replace(wanted, batch=1, pool=1)
    if budget is None:  # too little free memory: go on one row at a time rather than refuse
        return smallest
    need = eval_working_bytes(estimate_eval_memory(model_shape(model), smallest))
    raise FinesmithError(f"--eval-memory {readable(budget)} cannot hold one prompt of {wanted.prefix + wanted.prompt} "
                         f"tokens and its answer (about {readable(need)}); raise it or use auto")


def readable(size: float) -> str:
    """`1.5 GB`, `40 MB`: bytes as a user writes them."""
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def release_freed_memory(device: Any) -> None:
    """Hand the memory of freed tensors back to the operating system (CPU with glibc).

    glibc serves allocations below its mmap threshold from its heap, and that threshold rises
    (up to 32 MB) as large tensors are freed, so most of a batch's tensors live in the heap. Freed,
    they stay there: over hundreds of batches of differently sized tensors the heap fragments
    and the resident size creeps up although live memory does not. `malloc_trim` returns the
    free pages; the engine calls it between batches. CUDA's caching allocator, and other C
    libraries, need nothing here.
    """
    import torch

    if torch.device(device).type == "cpu" and _malloc_trim() is not None:
        _malloc_trim()(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None
