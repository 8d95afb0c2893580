"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from finesmith.errors import FinesmithError
from finesmith.model.load import embedding_module_names

MIN_LR_RATIO = 0.1  # the cosine ends at this share of the peak rate


def build_optimizer(model: Any, lr: float, weight_decay: float, kind: str = "adamw",
                    embedding_lr_ratio: float = 1.0) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D).

    Args:
        model: the model; only parameters with `requires_grad` are optimised.
        lr: peak learning rate (the schedule scales it).
        weight_decay: decoupled weight decay for matrices.
        kind: `adamw` (torch), or `adamw_8bit` / `paged_adamw_8bit` (bitsandbytes, CUDA only:
            8-bit moments use a quarter of the memory; paged moments can spill to CPU memory).
        embedding_lr_ratio: trainable input/output embeddings get `lr * embedding_lr_ratio`
            (continued pre-training often trains them more gently than the rest).
    Returns:
        The optimizer.
    """
    # Matched by name part, so the full copies an adapter trains
    # (`...embed_tokens.modules_to_save.default.weight`) count as embeddings too.
    embedding_modules = set(embedding_module_names(model))
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            embedding = any(part in embedding_modules for part in name.split("."))
            groups.setdefault((param.ndim >= 2, embedding), []).append(param)
    param_groups = [{"params": params, "weight_decay": weight_decay if decay else 0.0,
                     "lr": lr * (embedding_lr_ratio if embedding else 1.0)}
                    for (decay, embedding), params in sorted(groups.items())]
    if kind != "adamw":
        return _bitsandbytes_adamw(kind, param_groups, lr)
    fused = torch.cuda.is_available() and all(p.is_cuda for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


def check_optimizer_supported(kind: str) -> None:
    """Fail early (before loading a model) when an 8-bit optimizer cannot run here."""
    if kind == "adamw":
        return
    if not torch.cuda.is_available():
        raise FinesmithError(f"optimizer {kind} needs a CUDA GPU (bitsandbytes) and none is available; "
                             "use optimizer=adamw on this machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FinesmithError(f"optimizer {kind} needs bitsandbytes; install it with `pip install 'finesmith[qlora]'`")


def _bitsandbytes_adamw(kind: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    check_optimizer_supported(kind)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if kind == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=lr, betas=(0.9, 0.999))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_ratio: float = MIN_LR_RATIO,
                  extensions: Sequence[tuple[int, int]] = ()) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak rate, then cosine decay to `min_ratio` of it.

    `extensions` lists `(at_step, new_total)` pairs from `--resume --extend`: from `at_step`
    on, the rate follows a new cosine from the value it had at `at_step` down to the floor
    at `new_total` (a run that had already reached the floor stays there). The schedule is
    rebuilt from the run record on every resume, so it is the same however often a run is
    interrupted.
    """
    factor = schedule_factor(total_steps, warmup_steps, min_ratio, extensions)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def schedule_factor(total_steps: int, warmup_steps: int, min_ratio: float = MIN_LR_RATIO,
                    extensions: Sequence[tuple[int, int]] = ()) -> Callable[[int], float]:
    """The learning-rate multiplier as a function of the step (see `warmup_cosine`)."""

    def base(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    factor = base
    for at_step, new_total in extensions:
        factor = _extended(factor, at_step, new_total, min_ratio)
    return factor


def _extended(previous: Callable[[int], float], at_step: int, new_total: int,
              min_ratio: float) -> Callable[[int], float]:
    start = previous(at_step)

    def factor(step: int) -> float:
        if step < at_step:
            return previous(step)
        progress = (step - at_step) / max(1, new_total - at_step)
        return min_ratio + (start - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
