"""Attention for packed rows without a dense T×T mask: variable-length attention.

A packed batch already knows where each example starts and ends. With `attention: varlen`
(the default on CUDA when PyTorch has it) the batch is one padding-free token stream plus
cumulative sequence lengths (`cu_seq_lens`), which transformers passes down to the attention
function of every layer as `cu_seq_lens_q/k` and `max_length_q/k`. The function registered
here, `finesmith_varlen`, then runs

- on CUDA: PyTorch's own Flash-Attention kernel for variable lengths,
  `torch.nn.attention.varlen.varlen_attn` (causal, grouped-query heads native);
- elsewhere: causal SDPA on each sequence separately (no mask at all; the cost is the sum of
  the squared sequence lengths instead of the square of the row).

Without `cu_seq_lens` (evaluation, generation) it is plain SDPA with the mask it is given,
so a model switched to it keeps working everywhere. The dense block mask of
`finesmith.data.pack.pack_batch` stays the CPU default; both are tested equal to computing
every example on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from finesmith.data.pack import IGNORE
from finesmith.data.tokenize import TokenizedExample

NAME = "finesmith_varlen"
ATTENTIONS = ("auto", "dense", "varlen")
_registered = False


def cuda_kernel_available() -> bool:
    """Whether PyTorch's variable-length Flash-Attention kernel can run here."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention(attention: str, device: str | torch.device) -> str:
    """`dense` or `varlen`: `auto` is varlen on CUDA with PyTorch's kernel, dense elsewhere."""
    if attention == "auto":
        return "varlen" if torch.device(device).type == "cuda" and cuda_kernel_available() else "dense"
    return attention


def varlen_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: `[1, H, T, D]` inputs, `[1, T, H, D]` output."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("variable-length attention takes one packed row (batch size 1)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    if q.is_cuda and cuda_kernel_available():
        from torch.nn.attention.varlen import varlen_attn

        longest = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0),
                          enable_gqa=q.shape[1] != k.shape[1])
    else:
        out = torch.empty_like(q)
        bounds = cu.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None],
                v[start:end].transpose(0, 1)[None], is_causal=True, scale=scaling,
                enable_gqa=q.shape[1] != k.shape[1])[0].transpose(0, 1)
    return out[None], None


def use_varlen(model: Any) -> None:
    """Switch `model` (or the model inside a peft wrapper) to `finesmith_varlen` attention."""
    global _registered
    from transformers import AttentionInterface

    if not _registered:
        AttentionInterface.register(NAME, varlen_attention)
        _registered = True
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(NAME)


def pack_varlen(examples: Sequence[TokenizedExample]) -> dict[str, Any]:
    """One padding-free row of every example, with its cumulative sequence lengths.

    Returns:
        input_ids, position_ids, targets: `[1, T]` (targets already shifted, -100 where untrained);
        cu_seq_lens: `[n + 1]` int32 offsets; max_length: the longest example; seq_lens: `[n]`.
    """
    lens = [len(ex.input_ids) for ex in examples]
    ids, targets, positions = [], [], []
    for ex, n in zip(examples, lens):
        ids += list(ex.input_ids)
        positions += list(range(n))
        targets += [ex.input_ids[t + 1] if ex.supervised[t + 1] else IGNORE for t in range(n - 1)] + [IGNORE]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
            "targets": torch.tensor([targets]), "cu_seq_lens": cu, "max_length": max(lens),
            "seq_lens": torch.tensor(lens)}


def attention_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The forward's attention arguments for a batch: its dense mask, or its sequence boundaries."""
    if "cu_seq_lens" in batch:
        cu = batch["cu_seq_lens"]
        return {"attention_mask": None, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": int(batch["max_length"]), "max_length_k": int(batch["max_length"])}
    return {"attention_mask": batch["attention_mask"]}
