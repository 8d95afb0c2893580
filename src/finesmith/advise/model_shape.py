"""The shape of a model, read from its config without loading any weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finesmith.errors import FinesmithError


@dataclass(frozen=True)
class ModelShape:
    """The numbers the memory and time estimates need."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    name: str = "model"

    @property
    def params(self) -> int:
        """Parameter count of a Llama-style decoder (attention + gated MLP + RMSNorms)."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attention + mlp + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embeddings + self.hidden

    @property
    def linear_params(self) -> int:
        """Parameters in the transformer blocks' linear layers (what `all-linear` LoRA adapts)."""
        return self.layers * (self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
                              + 3 * self.hidden * self.intermediate)

    def lora_params(self, r: int) -> int:
        """LoRA parameters for rank `r` on every linear layer of every block."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = [(self.hidden, q_out), (self.hidden, kv_out), (self.hidden, kv_out), (q_out, self.hidden),
                  (self.hidden, self.intermediate), (self.hidden, self.intermediate), (self.intermediate, self.hidden)]
        return self.layers * sum(r * (a + b) for a, b in shapes)

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], name: str = "model") -> "ModelShape":
        """Build from a Hugging Face `config.json` dict (Llama, Mistral, Qwen, SmolLM, ...).

        Args:
            config: the parsed config.
            name: how to call the model in reports.
        Returns:
            The ModelShape.
        """
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            shape = cls(
                layers=int(config["num_hidden_layers"]), hidden=hidden,
                intermediate=int(config.get("intermediate_size") or 4 * hidden), heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)), name=name)
        except (KeyError, TypeError, ValueError) as exc:
            raise FinesmithError(f"model '{name}': its config lacks {exc} needed for the estimate; "
                                 "pass a decoder-only causal LM") from None
        return shape


def read_model_shape(spec: str) -> ModelShape:
    """Read a model's shape from its config (config.json, GGUF metadata or the hub), no weights.

    Args:
        spec: a `--model` value (built-in alias, folder, .gguf file or hub id).
    Returns:
        The ModelShape.
    """
    from transformers import AutoConfig

    from finesmith.model.load import resolve_model_path

    path, gguf_file = resolve_model_path(spec)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise FinesmithError(f"could not read the config of model '{spec}' ({first}); "
                             "pass a local model folder or .gguf file") from None
    return ModelShape.from_config_dict(config.to_dict(), name=spec)
