"""Attention for packed rows: examples kept apart, sliding windows kept, without a dense mask if wanted.

A packed batch already knows where each example starts and ends. Two layouts reach the
attention of every layer:

- **dense** (the CPU default): rows with a block-diagonal `[R, 1, T, T]` boolean mask
  (`finesmith.data.pack.pack_batch`); preference and label-scoring token tries use the same
  kind of mask over their ancestors.
- **varlen** (`attention: varlen`, the default on CUDA when PyTorch has the kernel): one
  padding-free row plus cumulative sequence lengths (`cu_seq_lens`), which transformers
  passes down to the attention function as `cu_seq_lens_q/k` and `max_length_q/k`. On CUDA
  that runs PyTorch's Flash-Attention kernel for variable lengths
  (`torch.nn.attention.varlen.varlen_attn`, grouped-query heads native); elsewhere causal
  SDPA on each sequence separately.

**Sliding windows.** transformers builds a sliding-window layer's mask itself only when it is
given a 2-D padding mask or none; a ready 4-D mask is used as it is, for every layer. A
Gemma 3, Mistral-7B-v0.1 or Phi-3-mini model trained on packed rows through plain SDPA would
therefore let its sliding-window layers see the whole example, while inference limits them to
the window: training would teach a different model than the one that runs. The attention
function registered here, `finesmith_packed`, keeps the window on every path: a key is seen
by a query only if the mask allows it *and* its position is less than `sliding_window`
positions back (`position_ids` restart at 0 for every example, and in a trie they are each
token's depth, so the distance is measured inside the example, as when it runs alone). With
a KV cache (generation), the query and key lengths differ and the masks are transformers'
own, which carry the window already. Layers without a window (`sliding_window` None) run
plain SDPA with the mask given.

`load_model` switches models with a sliding window to it; `use_varlen` switches any model.
Both layouts are tested equal to computing every example on its own (tests/test_family_arch.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from finesmith.data.pack import IGNORE
from finesmith.data.tokenize import TokenizedExample

NAME = "finesmith_packed"
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


def packed_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: `[B, H, T, D]` inputs, `[B, T, H, D]` output.

    `cu_seq_lens_q` in `kwargs` selects the variable-length path; otherwise SDPA with the mask
    given, narrowed to the layer's sliding window (`kwargs["sliding_window"]`) where it has one.
    """
    window = kwargs.get("sliding_window")
    # Without a cache every key a query may see is in the row with every token between them (packed
    # rows, tries), so it is never more positions back than tokens back: rows no longer than the
    # window need no narrowing (and the check needs no device sync).
    if kwargs.get("cu_seq_lens_q") is not None:
        return _varlen(query, key, value, kwargs["cu_seq_lens_q"], kwargs.get("max_length_q"), scaling, window), None
    if window is not None and query.shape[2] == key.shape[2] and query.shape[2] > window:
        attention_mask = within_window(attention_mask, kwargs.get("position_ids"), window, query.shape[2],
                                       query.device)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("sliding_window", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


varlen_attention = packed_attention  # the name the GPU lane's tests call it by


def within_window(mask: torch.Tensor | None, position_ids: torch.Tensor | None, window: int, length: int,
                  device: torch.device) -> torch.Tensor | None:
    """`mask` (`[B|1, 1, T, T]` bool, or None for plain causal) narrowed to keys less than `window`
    positions before their query. A float (additive) mask is returned unchanged."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    if position_ids is None:
        position_ids = torch.arange(length, device=device)[None]
    distance = position_ids[:, :, None] - position_ids[:, None, :]  # [B, T, T]: query position - key position
    near = (distance < window)[:, None]
    if mask is None:
        return near & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return mask & near


def _varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu: torch.Tensor, longest: int | None,
            scaling: float | None, window: int | None) -> torch.Tensor:
    """Causal attention of each packed sequence on its own (`[1, T, H, D]` out), within `window` if given."""
    if query.shape[0] != 1:
        raise ValueError("variable-length attention takes one packed row (batch size 1)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda and cuda_kernel_available():
        from torch.nn.attention.varlen import varlen_attn

        longest = int(longest or int((cu[1:] - cu[:-1]).max()))
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling,
                          window_size=(-1 if window is None else window - 1, 0), enable_gqa=gqa)
        return out[None]
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        mask = None if window is None or n <= window else within_window(None, None, window, n, q.device)[0]
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None],
            v[start:end].transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None, scale=scaling,
            enable_gqa=gqa)[0].transpose(0, 1)
    return out[None]


def register() -> None:
    """Make `finesmith_packed` known to transformers (its attention, and SDPA's mask builder for it)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    _registered = True


def has_sliding_window(model: Any) -> bool:
    """Whether any attention layer of `model` (or the model inside a peft wrapper) has a sliding window."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config(decoder=True)
    if getattr(config, "sliding_window", None) is None:
        return False
    types = getattr(config, "layer_types", None)
    return types is None or "sliding_attention" in types


def use_packed_attention(model: Any) -> Any:
    """Switch `model` (or the model inside a peft wrapper) to `finesmith_packed` attention; return it."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(NAME)
    return model


def use_varlen(model: Any) -> None:
    """Switch `model` to the attention that takes variable-length packed rows (`finesmith_packed`)."""
    use_packed_attention(model)


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
