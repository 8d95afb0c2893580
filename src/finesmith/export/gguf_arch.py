"""Each model family's layout in llama.cpp: its architecture, tensors and hyper-parameters.

Tensor names come from gguf-py's tensor name maps (`gguf.get_tensor_name_map`, the table
llama.cpp's own converter uses), so `model.layers.3.self_attn.q_norm.weight` becomes
`blk.3.attn_q_norm.weight` for every family that has one. What the name maps do not cover
is a family's *layout rule*, the difference between how transformers and llama.cpp compute
the same model; each is applied here, once, and named in its `Layout`:

- **RoPE layout.** Llama, Mistral and Granite run in llama.cpp with RoPE over interleaved
  pairs (2i, 2i+1), where transformers rotates halves (i, i + d/2): Q/K rows (and biases) are
  permuted per head. Qwen, Gemma, Phi-3 and OLMo 2 rotate halves in llama.cpp too (NEOX).
- **Norm offset.** Gemma computes RMSNorm as `x * (1 + w)`; llama.cpp multiplies by the stored
  weight, so `1 + w` is stored.
- **Scaled embeddings.** Gemma multiplies embeddings by `sqrt(hidden_size)`; llama.cpp's Gemma
  graph does that itself, so the embedding is written as trained.
- **Attention scale.** llama.cpp's Gemma 3 scales attention by `1/sqrt(head_dim)`; a config
  whose `query_pre_attn_scalar` says otherwise gets the ratio folded into the q-norm weights
  (Q is normalised, multiplied by that weight, then rotated, all linear, so every score scales).
- **Experts.** transformers 5 stores Qwen3-MoE experts as fused 3-D parameters
  (`experts.gate_up_proj`: experts × 2·ffn × hidden); llama.cpp wants `ffn_gate_exps` and
  `ffn_up_exps`, so the fused tensor is cut in two. llama.cpp always renormalises the top-k
  router weights, so a config that does not is refused.
- **Fused projections.** Phi-3's `qkv_proj` and `gate_up_proj` stay fused (`attn_qkv`, and
  `ffn_up` holding gate then up, which llama.cpp splits itself).
- **Sliding windows.** Gemma 3's window and which layers use it go into the file. llama.cpp
  runs Mistral and Phi-3 with full attention, so their files claim no longer a context than
  the window, within which the two agree. Qwen's optional window has no llama.cpp form: refused.
- **Granite multipliers** become llama.cpp's attention, embedding, residual and logit scales.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from finesmith.errors import FinesmithError

WAY_OUT = "export with --format hf instead"

# RoPE variants that only divide each frequency by a fixed factor: llama3's per-dimension
# factors go into a `rope_freqs` tensor (as llama.cpp's converter writes them), linear into
# the file's scaling factor. The others (dynamic, yarn, longrope) change with the sequence
# length or rescale attention and are refused.
FREQUENCY_ROPE = ("linear", "llama3")


@dataclass(frozen=True)
class Layout:
    """How one transformers `model_type` is written for llama.cpp.

    Attributes:
        arch: the `gguf.MODEL_ARCH` member name.
        activation: the MLP activation llama.cpp's graph applies (`hidden_act` must match).
        interleaved_rope: llama.cpp rotates interleaved pairs: permute Q/K rows per head.
        norm_offset: added to every norm weight (Gemma's `1 + w`).
        rope_types: RoPE scalings the file can state.
        metadata: writes the family's own hyper-parameters (beyond the common ones).
        check: refuses configs the family's llama.cpp graph would compute differently.
    """

    arch: str
    activation: str = "silu"
    interleaved_rope: bool = False
    norm_offset: float = 0.0
    rope_types: tuple[str, ...] = ("default", "linear")
    metadata: Callable[[Any, Any], None] | None = None
    check: Callable[[Any], None] | None = None


# --- family rules ------------------------------------------------------------------------

def no_qwen_window(config: Any) -> None:
    if getattr(config, "use_sliding_window", False):
        raise FinesmithError(f"GGUF export: llama.cpp runs {config.model_type} without a sliding window, "
                             f"and this model uses one; {WAY_OUT}")


def check_moe(config: Any) -> None:
    no_qwen_window(config)
    if not getattr(config, "norm_topk_prob", False):
        raise FinesmithError("GGUF export: llama.cpp renormalises the top-k expert weights of Qwen3-MoE and this "
                             f"model does not (norm_topk_prob false); {WAY_OUT}")
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise FinesmithError(f"GGUF export: llama.cpp's Qwen3-MoE has experts in every layer, and this model "
                             f"mixes in dense layers; {WAY_OUT}")


def moe_metadata(writer: Any, config: Any) -> None:
    writer.add_expert_count(experts(config))
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def experts(config: Any) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


def check_gemma3(config: Any) -> None:
    if getattr(config, "attn_logit_softcapping", None):
        raise FinesmithError(f"GGUF export: llama.cpp's Gemma 3 has no attention logit soft-capping; {WAY_OUT}")
    if getattr(config, "use_bidirectional_attention", False):
        raise FinesmithError(f"GGUF export: this Gemma 3 attends bidirectionally, llama.cpp's causally; {WAY_OUT}")
    inner = rope_by_layer_type(config).get("sliding_attention", {})
    if inner.get("rope_type", "default") != "default":
        raise FinesmithError(f"GGUF export: llama.cpp's Gemma 3 scales RoPE on global layers only; {WAY_OUT}")


def gemma3_metadata(writer: Any, config: Any) -> None:
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    sliding = [kind == "sliding_attention" for kind in layer_types(config)]
    if any(sliding) and config.sliding_window:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern(sliding)
        writer.add_rope_freq_base_swa(float(rope_by_layer_type(config)["sliding_attention"]["rope_theta"]))


def gemma3_attention_fold(config: Any) -> float:
    """Factor for the q-norm weights that turns llama.cpp's attention scale into the config's.

    llama.cpp scales Gemma 3's scores by `1/sqrt(head_dim)` (by `1/sqrt(hidden / heads)` for
    its 62-layer 27B); transformers by `query_pre_attn_scalar ** -0.5`.
    """
    if config.num_hidden_layers == 62:
        llama_cpp = (config.hidden_size // config.num_attention_heads) ** -0.5
    else:
        llama_cpp = head_size(config) ** -0.5
    return float(config.query_pre_attn_scalar) ** -0.5 / llama_cpp


def granite_metadata(writer: Any, config: Any) -> None:
    writer.add_attention_scale(float(config.attention_multiplier))
    writer.add_embedding_scale(float(config.embedding_multiplier))
    writer.add_residual_scale(float(config.residual_multiplier))
    writer.add_logit_scale(float(config.logits_scaling))


LAYOUTS: dict[str, Layout] = {
    "llama": Layout("LLAMA", interleaved_rope=True, rope_types=("default", *FREQUENCY_ROPE)),
    "mistral": Layout("LLAMA", interleaved_rope=True, rope_types=("default", *FREQUENCY_ROPE)),
    "granite": Layout("GRANITE", interleaved_rope=True, rope_types=("default", *FREQUENCY_ROPE),
                      metadata=granite_metadata),
    "qwen2": Layout("QWEN2", check=no_qwen_window),
    "qwen3": Layout("QWEN3", check=no_qwen_window),
    "qwen3_moe": Layout("QWEN3MOE", metadata=moe_metadata, check=check_moe),
    "gemma3_text": Layout("GEMMA3", activation="gelu_pytorch_tanh", norm_offset=1.0, metadata=gemma3_metadata,
                          check=check_gemma3),
    "phi3": Layout("PHI3"),
    "olmo2": Layout("OLMO2"),
}


# --- reading a config -------------------------------------------------------------------

def layout_of(config: Any) -> Layout:
    """The layout of this config's family, or a one-line refusal naming the supported ones."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in LAYOUTS:
        raise FinesmithError(f"GGUF export supports {', '.join(sorted(LAYOUTS))} models; this model is "
                             f"'{model_type}'; {WAY_OUT}")
    return LAYOUTS[model_type]


def head_size(config: Any) -> int:
    """Size of one attention head: `config.head_dim` when set, else hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_types(config: Any) -> list[str]:
    return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


def rope_by_layer_type(config: Any) -> dict[str, dict[str, Any]]:
    """RoPE settings per attention kind; a flat `rope_parameters` applies to both."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        return {kind: dict(value) for kind, value in rope.items()}
    return {"full_attention": rope, "sliding_attention": rope}


def global_rope(config: Any) -> dict[str, Any]:
    """The RoPE of the full-attention layers (the file's main RoPE)."""
    return rope_by_layer_type(config)["full_attention"]


def rotary_fraction(config: Any) -> float:
    rope = global_rope(config)
    return float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))


def check_exportable(config: Any) -> Layout:
    """Refuse models llama.cpp would compute differently, with the reason and a way out.

    Returns:
        The family's layout.
    """
    layout = layout_of(config)
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if activation != layout.activation:
        raise FinesmithError(f"GGUF export: llama.cpp's {config.model_type} uses {layout.activation}, this model "
                             f"{activation}; {WAY_OUT}")
    rope_type = global_rope(config).get("rope_type", "default")
    if rope_type not in layout.rope_types:
        raise FinesmithError(f"GGUF export supports RoPE types {', '.join(layout.rope_types)} for "
                             f"{config.model_type}; this model uses rope_type '{rope_type}'; {WAY_OUT}")
    if rotary_fraction(config) != 1.0 and layout.interleaved_rope:
        raise FinesmithError(f"GGUF export supports RoPE over the whole head only for {config.model_type}; {WAY_OUT}")
    if getattr(config, "mlp_bias", False) and layout.arch != "LLAMA":
        raise FinesmithError(f"GGUF export: llama.cpp's {config.model_type} has no MLP biases; {WAY_OUT}")
    if layout.check:
        layout.check(config)
    return layout


def context_length(config: Any) -> int:
    """The context the file claims: the trained one, capped at a sliding window llama.cpp ignores."""
    length = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if config.model_type in ("mistral", "phi3") and window:
        length = min(length, int(window))
    return length


# --- metadata ---------------------------------------------------------------------------

def write_hyperparameters(writer: Any, config: Any, layout: Layout, vocab_rows: int) -> None:
    """The `<arch>.*` keys llama.cpp reads to build the graph."""
    import gguf

    head_dim = head_size(config)
    writer.add_vocab_size(vocab_rows)
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    # Always written: without them llama.cpp takes hidden_size / heads as the head size.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * rotary_fraction(config)))
    rope = global_rope(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if layout.metadata:
        layout.metadata(writer, config)


# --- tensors ----------------------------------------------------------------------------

def permute_for_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder Q/K projection rows (or biases) from transformers' rotary layout to llama.cpp's.

    transformers rotates dimension i with i + d/2 inside each head; llama.cpp (Llama graph)
    rotates dimension 2i with 2i + 1. Interleaving the two halves of each head makes the same
    computation; transformers' GGUF loader applies the inverse.

    Args:
        weight: `(n_heads * head_dim, in_features)` projection matrix, or its bias.
        n_heads: query heads for Q, key/value heads for K.

    Returns:
        The permuted array, same shape.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def rope_frequency_factors(config: Any) -> np.ndarray | None:
    """Per-dimension divisors of the plain RoPE frequencies for llama3 scaling, else None.

    llama.cpp divides frequency i by `rope_freqs[i]`; the divisors are plain / scaled inverse
    frequencies, the scaled ones computed by transformers itself, so the file rotates exactly
    as the trained model does.
    """
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = global_rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim = head_size(config)
    plain = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")  # attention factor: 1 for this type
    return (plain / scaled.float()).numpy().astype(np.float32)


def split_fused_experts(name: str, weight: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """transformers 5's fused expert parameters as the two or one tensors llama.cpp names."""
    if name.endswith("mlp.experts.gate_up_proj"):
        half = weight.shape[1] // 2  # (experts, 2 * ffn, hidden): gate rows, then up rows
        base = name.removesuffix("gate_up_proj")
        yield f"{base}gate_proj.weight", weight[:, :half]
        yield f"{base}up_proj.weight", weight[:, half:]
    elif name.endswith("mlp.experts.down_proj"):
        yield f"{name}.weight", weight
    else:
        yield name, weight


def adjust(name: str, weight: np.ndarray, config: Any, layout: Layout) -> np.ndarray:
    """Apply the family's layout rules (module docstring) to one tensor."""
    if layout.interleaved_rope and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
        heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
        weight = permute_for_rope(weight, heads)
    if layout.norm_offset and name.endswith("norm.weight"):
        weight = weight + np.float32(layout.norm_offset)
    if config.model_type == "gemma3_text" and name.endswith("self_attn.q_norm.weight"):
        weight = weight * np.float32(gemma3_attention_fold(config))
    return weight


def gguf_tensors(model: Any, layout: Layout | None = None) -> list[tuple[str, np.ndarray]]:
    """`(llama.cpp name, float32 array)` for every weight of `model`, layout rules applied.

    `output.weight` is written whenever the LM head differs from the embedding, whatever
    `tie_word_embeddings` says: a run that trained separate copies of a tied pair (or one of
    them) must keep the head it trained, and llama.cpp reuses `token_embd` only when the file
    has no `output`.
    """
    import gguf

    config = model.config
    layout = layout or layout_of(config)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, layout.arch), config.num_hidden_layers)
    state = model.state_dict()
    embedding = state["model.embed_tokens.weight"]
    tensors: list[tuple[str, np.ndarray]] = []
    factors = rope_frequency_factors(config)
    if factors is not None:
        tensors.append(("rope_freqs.weight", factors))
    for hf_name, value in state.items():
        if hf_name == "lm_head.weight" and value.shape == embedding.shape and bool((value == embedding).all()):
            continue
        for name, weight in split_fused_experts(hf_name, value.detach().float().cpu().numpy()):
            target = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise FinesmithError(f"GGUF export: llama.cpp's {layout.arch.lower()} has no tensor for {hf_name} "
                                     f"of this {config.model_type} model; {WAY_OUT}")
            tensors.append((target, adjust(name, weight, config, layout)))
    return tensors
