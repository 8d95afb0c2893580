"""Tiny random models of every architecture family finesmith supports, each with its family's chat format.

`make_family_model(folder, family)` saves a model folder (config, safetensors weights, tokenizer, chat
template, generation config) that `finesmith train --model FOLDER` takes like a downloaded model. The
dimensions are tiny (hidden size 64, two layers, a vocabulary of about 600) so a test trains in seconds;
the *shape* of each architecture is the real one:

| family | transformers class | what is particular | chat template |
|---|---|---|---|
| llama | LlamaForCausalLM | Llama 3 rope scaling, tied embeddings | llama32 |
| qwen2 | Qwen2ForCausalLM | biases on q/k/v, vocabulary padded past the tokenizer | qwen3 |
| qwen3 | Qwen3ForCausalLM | q/k RMS norms, head_dim * heads != hidden size | qwen3 |
| qwen3_moe | Qwen3MoeForCausalLM | 4 routed experts, top-2 (fused 3-D expert weights) | qwen3 |
| gemma3 | Gemma3ForCausalLM | a sliding-window layer (window 16) and a global one, scaled embeddings, q/k norms | gemma2 |
| mistral | MistralForCausalLM | head_dim * heads != hidden size (as Nemo) | mistral_nemo |
| phi3 | Phi3ForCausalLM | fused `qkv_proj` and `gate_up_proj`, padded vocabulary | phi35 |
| olmo2 | Olmo2ForCausalLM | norms after attention and MLP, q/k norms over all heads | olmo2 |

The chat template is the family's real one from `../shared/templates/` when that folder exists (CI has
it), else finesmith's own restatement of its rules in `tests/assets/templates/` (tested to render the
same). Tokenizers are the byte-level BPEs of `tests/assets/make_tokenizers.py`: every marker the template
emits is one token, and BOS/EOS/pad and whether the tokenizer adds BOS itself are the family's own.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets"
SHARED_TEMPLATES = Path(__file__).resolve().parents[1].parent / "shared" / "templates"
OWN_TEMPLATES = ASSETS / "templates"


@dataclass(frozen=True)
class Family:
    """How to build one family's tiny model.

    Attributes:
        config_class: the transformers config class name.
        template: the chat template file's stem (`qwen3` for `qwen3.jinja`).
        tokenizer: the folder `tests/assets/tokenizer-<tokenizer>`.
        config: the architecture's own settings on top of the shared tiny dimensions.
        stops: end tokens the real model's generation_config lists (besides EOS).
        pad_vocab_to: the model's vocabulary rounded up to this multiple (real Qwen and Phi models have more
            embedding rows than tokens), or 0 for exactly the tokenizer's size.
    """

    config_class: str
    template: str
    tokenizer: str
    config: dict[str, Any] = field(default_factory=dict)
    stops: tuple[str, ...] = ()
    pad_vocab_to: int = 0


TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512}
SPECS: dict[str, Family] = {
    "llama": Family("LlamaConfig", "llama32", "llama32", {
        "tie_word_embeddings": True, "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
        stops=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")),
    "qwen2": Family("Qwen2Config", "qwen3", "qwen3", {"tie_word_embeddings": True}, pad_vocab_to=64),
    "qwen3": Family("Qwen3Config", "qwen3", "qwen3", {"tie_word_embeddings": True, "head_dim": 32}, pad_vocab_to=64),
    "qwen3_moe": Family("Qwen3MoeConfig", "qwen3", "qwen3", {
        "tie_word_embeddings": False, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 1}, pad_vocab_to=64),
    "gemma3": Family("Gemma3TextConfig", "gemma2", "gemma", {
        "tie_word_embeddings": True, "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32,
        "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]},
        stops=("<end_of_turn>",)),
    "mistral": Family("MistralConfig", "mistral_nemo", "mistral-nemo", {
        "tie_word_embeddings": False, "head_dim": 32, "sliding_window": None}),
    "phi3": Family("Phi3Config", "phi35", "phi35", {"tie_word_embeddings": False, "num_key_value_heads": 4},
                   stops=("<|end|>", "<|assistant|>"), pad_vocab_to=64),
    "olmo2": Family("Olmo2Config", "olmo2", "olmo2", {"tie_word_embeddings": False, "num_key_value_heads": 4}),
}
FAMILIES: tuple[str, ...] = tuple(SPECS)
TEMPLATE_FILES = ("llama32", "qwen3", "gemma2", "mistral_nemo", "phi35", "olmo2")


def family_template(name: str) -> str:
    """A chat template by family (`qwen3_moe`) or file stem (`mistral_nemo`): the real file from
    `../shared/templates/` when it is there, else finesmith's own restatement under `tests/assets/templates/`."""
    stem = SPECS[name].template if name in SPECS else name
    if stem not in TEMPLATE_FILES:
        raise KeyError(f"no chat template named {name!r}; families: {', '.join(FAMILIES)}")
    shared = SHARED_TEMPLATES / f"{stem}.jinja"
    source = shared if shared.is_file() else OWN_TEMPLATES / f"{stem}.jinja"
    return source.read_text(encoding="utf-8")


def own_template(name: str) -> str:
    """finesmith's own restatement of a family's template (never the shared copy)."""
    stem = SPECS[name].template if name in SPECS else name
    return (OWN_TEMPLATES / f"{stem}.jinja").read_text(encoding="utf-8")


def family_config(family: str, tokenizer: Any) -> Any:
    """The tiny transformers config of `family` for `tokenizer` (special token ids included)."""
    import transformers

    spec = SPECS[family]
    vocab = len(tokenizer)
    if spec.pad_vocab_to:
        vocab = -(-vocab // spec.pad_vocab_to) * spec.pad_vocab_to
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if family.startswith("qwen"):  # Qwen's tokenizer has no BOS; its config names <|endoftext|>
        ids["bos_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return getattr(transformers, spec.config_class)(vocab_size=vocab, **{**TINY, **spec.config, **ids})


def make_family_model(folder: Path, family: str, seed: int = 0) -> Path:
    """Save a tiny random `family` model with its tokenizer and chat template into `folder`.

    Args:
        folder: created if missing; existing files of the same names are replaced.
        family: one of `FAMILIES`.
        seed: the weights' random seed (same seed, same weights).
    Returns:
        `folder`, ready for `--model`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if family not in SPECS:
        raise KeyError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    spec = SPECS[family]
    folder = Path(folder)
    shutil.copytree(ASSETS / f"tokenizer-{spec.tokenizer}", folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(family_template(family), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = family_config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if spec.stops:  # the real generation_config stops at the end of a turn as well as at EOS
        ids = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in spec.stops]
        model.generation_config.eos_token_id = sorted(set(ids))
    model.save_pretrained(folder)
    return folder


__all__ = ["FAMILIES", "SPECS", "family_config", "family_template", "make_family_model", "own_template"]
