"""Writing a Llama-architecture model as a GGUF file (llama.cpp's format).

What llama.cpp expects, and what transformers' GGUF loader reverses on the way back:

- tensor names `token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output` (omitted when
  the LM head equals the embedding: llama.cpp then reuses `token_embd`);
- the head size as `attention.key_length` / `value_length` (llama.cpp otherwise assumes
  `hidden_size / heads` and refuses a model whose `head_dim` is set otherwise);
- RoPE scaling that only rescales frequencies (`linear`, `llama3`) as a `rope_freqs`
  tensor of per-dimension divisors, as llama.cpp's own converter writes it;
- the rows of Q and K permuted per head from "rotate halves" (transformers' rotary
  layout) to "rotate interleaved pairs" (llama.cpp's), see `permute_for_rope`;
- norms and other 1-D tensors kept in float32, matrices in f16 or q8_0;
- a byte-level BPE tokenizer stored as `gpt2`: tokens, token types, merges, special ids,
  and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from finesmith.core.templates import END_OF_TURN_TOKENS
from finesmith.data.tokenize import bos_to_prepend
from finesmith.errors import FinesmithError
from finesmith.export import QUANTS


# transformers module name -> llama.cpp tensor name, per decoder layer
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


# RoPE variants that only divide each frequency by a fixed factor, so one `rope_freqs`
# tensor states them exactly; the others (dynamic, yarn, longrope) change with the
# sequence length or rescale attention, which llama.cpp would need other settings for.
FREQUENCY_ONLY_ROPE = ("linear", "llama3")


def rope_parameters(config: Any) -> dict[str, Any]:
    return dict(getattr(config, "rope_parameters", None) or {})


def check_exportable(config: Any) -> None:
    """Refuse models this writer cannot represent exactly, with the reason and a way out."""
    way_out = "export with --format hf instead"
    if getattr(config, "model_type", None) != "llama":
        raise FinesmithError(f"GGUF export supports Llama-architecture models only; this model is "
                             f"'{getattr(config, 'model_type', '?')}'; {way_out}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise FinesmithError(f"GGUF export does not support Llama models with linear biases; {way_out}")
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", *FREQUENCY_ONLY_ROPE):
        raise FinesmithError(f"GGUF export supports plain, linear and llama3 RoPE only; this model uses rope_type "
                             f"'{rope_type}'; {way_out}")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise FinesmithError(f"GGUF export supports RoPE over the whole head only; {way_out}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise FinesmithError(f"GGUF export supports SiLU-gated Llama models only; {way_out}")


def head_size(config: Any) -> int:
    """Size of one attention head: `config.head_dim` when set, else hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_frequency_factors(config: Any) -> np.ndarray | None:
    """Per-dimension divisors of the plain RoPE frequencies, or None for plain RoPE.

    llama.cpp divides frequency i by `rope_freqs[i]`; the divisors are plain / scaled
    inverse frequencies, the scaled ones computed by transformers itself, so the file
    rotates exactly as the trained model does.
    """
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        return None
    dim = head_size(config)
    plain = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")  # attention factor: 1 for these types
    return (plain / scaled.float()).numpy().astype(np.float32)


def permute_for_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder Q/K projection rows from transformers' rotary layout to llama.cpp's.

    transformers rotates dimension i with i + d/2 inside each head; llama.cpp rotates
    dimension 2i with 2i + 1. Interleaving the two halves of each head makes the same
    computation; transformers' GGUF loader applies the inverse.

    Args:
        weight: `(n_heads * head_dim, in_features)` projection matrix.
        n_heads: query heads for Q, key/value heads for K.

    Returns:
        The permuted matrix, same shape.
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model: Any) -> list[tuple[str, np.ndarray]]:
    """`(llama.cpp name, float32 array)` for every weight of a Llama model, Q/K permuted.

    `output.weight` is written whenever the LM head differs from the embedding, whatever
    `tie_word_embeddings` says: a run that trained separate copies of a tied pair (or one
    of them) must keep the head it trained, and llama.cpp reuses `token_embd` only when
    the file has no `output`.
    """
    config = model.config
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    embedding = state["model.embed_tokens.weight"]
    tensors = [("token_embd.weight", embedding)]
    factors = rope_frequency_factors(config)
    if factors is not None:
        tensors.append(("rope_freqs.weight", factors))
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = permute_for_rope(weight, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = permute_for_rope(weight, config.num_key_value_heads)
            tensors.append((f"blk.{layer}.{gguf_name}.weight", weight))
    tensors.append(("output_norm.weight", state["model.norm.weight"]))
    head = state.get("lm_head.weight")
    if head is not None and not np.array_equal(head, embedding):
        tensors.append(("output.weight", head))
    return tensors


def encode_tensor(weight: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """Encode one tensor: 1-D in float32 (as llama.cpp does), matrices as f16 or q8_0.

    q8_0 packs rows in blocks of 32 values; a matrix whose rows do not divide into
    blocks falls back to f16.
    """
    import gguf

    types = gguf.GGMLQuantizationType
    if weight.ndim == 1:
        return weight.astype(np.float32), types.F32
    block = gguf.GGML_QUANT_SIZES[types.Q8_0][0]
    if quant == "q8_0" and weight.shape[-1] % block == 0:
        return gguf.quants.quantize(weight.astype(np.float32), types.Q8_0), types.Q8_0
    return weight.astype(np.float16), types.F16


def tokenizer_metadata(tokenizer: Any, vocab_rows: int) -> dict[str, Any]:
    """The tokenizer as llama.cpp's `gpt2` (byte-level BPE) metadata.

    Args:
        tokenizer: a fast tokenizer with a byte-level BPE model and the GPT-2 split.
        vocab_rows: rows of the embedding matrix; extra rows become unused `[PADn]` tokens.

    Returns:
        tokens, token types, merges, special token ids, add-BOS flag and chat template.
    """
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise FinesmithError("GGUF export supports byte-level BPE tokenizers with the GPT-2 split only "
                             f"(this one: {model.get('type')} / {pre.get('type')}); export with --format hf instead")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_rows:
        raise FinesmithError(f"tokenizer has {len(vocab)} tokens but the model only {vocab_rows} embeddings; "
                             "the run's tokenizer does not match its model")
    by_id = {index: token for token, index in vocab.items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for index in range(vocab_rows):
        token = by_id.get(index, f"[PAD{index}]")
        tokens.append(token)
        if index not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            types.append(gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    end_of_turn = [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and vocab[t] != tokenizer.eos_token_id]
    return {"tokens": tokens, "types": types, "merges": merges, "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
            "eot": end_of_turn[0] if end_of_turn else None,
            "add_bos": bos_to_prepend(tokenizer) is not None, "add_eos": appends_eos(tokenizer),
            "chat_template": tokenizer.chat_template}


def appends_eos(tokenizer: Any) -> bool:
    """True when the tokenizer ends every encoded text with EOS by itself."""
    eos = tokenizer.eos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return eos is not None and bool(probe) and probe[-1] == eos


def write_gguf(model: Any, tokenizer: Any, path: Path, quant: str = "f16", name: str = "model") -> Path:
    """Write `model` (a transformers Llama) and its tokenizer to one GGUF file.

    Args:
        model: a plain (merged) LlamaForCausalLM.
        tokenizer: its fast tokenizer with a chat template.
        path: the `.gguf` file to write.
        quant: `f16` or `q8_0` for the matrices.
        name: `general.name` stored in the file.

    Returns:
        `path`.
    """
    import gguf

    if quant not in QUANTS:
        raise FinesmithError(f"unknown GGUF quantisation '{quant}'; use one of {', '.join(QUANTS)}")
    config = model.config
    check_exportable(config)
    tensors = gguf_tensors(model)
    vocab_rows = tensors[0][1].shape[0]
    meta = tokenizer_metadata(tokenizer, vocab_rows)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    write_architecture(writer, config, vocab_rows)
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(writer, meta)
    for tensor_name, weight in tensors:
        data, dtype = encode_tensor(weight, quant)
        writer.add_tensor(tensor_name, data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_architecture(writer: Any, config: Any, vocab_rows: int) -> None:
    """The `llama.*` hyper-parameters llama.cpp reads to build the graph."""
    head_dim = head_size(config)
    writer.add_vocab_size(vocab_rows)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    # Always written: without them llama.cpp takes hidden_size / heads as the head size.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_parameters(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def write_tokenizer(writer: Any, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("eot", writer.add_eot_token_id)):
        if meta[key] is not None:
            add(meta[key])
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(meta["add_eos"])
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])
