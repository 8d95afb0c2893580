"""The shape of a model, read from its config without loading any weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finesmith.errors import FinesmithError


# config keys of the mixture-of-experts fields, in the spellings transformers' configs use
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
FUSED_PROJECTION_TYPES = ("phi3",)  # one qkv_proj and one gate_up_proj per block
EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_topk")


@dataclass(frozen=True)
class ModelShape:
    """The numbers the memory and time estimates need.

    A mixture-of-experts model (`experts` > 0) replaces the gated MLP of its sparse layers by
    `experts` gated MLPs of width `expert_intermediate` (plus always-on shared experts of total
    width `shared_intermediate`) and a router; each token runs through `experts_per_token` of them.
    Memory holds every expert (`params`, the total); compute per token touches the active ones
    (`active_params`). `dense_layers` of the `layers` keep a dense MLP of width `intermediate`.
    `fused_projections`: q, k, v are one linear layer and so are gate and up (Phi-3).
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    name: str = "model"
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    dense_layers: int = 0
    fused_projections: bool = False

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def sparse_layers(self) -> int:
        """Layers whose MLP is a mixture of experts."""
        return self.layers - self.dense_layers if self.moe else 0

    def _attention(self) -> int:
        return self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)

    def _mlp(self, experts: int) -> int:
        """Linear parameters of a sparse layer's MLP with `experts` routed experts (router included)."""
        return (experts * 3 * self.hidden * self.expert_intermediate + 3 * self.hidden * self.shared_intermediate
                + self.hidden * self.experts)

    def _linear(self, experts: int) -> int:
        dense = self.layers - self.sparse_layers
        return (self.layers * self._attention() + dense * 3 * self.hidden * self.intermediate
                + self.sparse_layers * self._mlp(experts))

    def _total(self, linear: int) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return linear + self.layers * 2 * self.hidden + embeddings + self.hidden

    @property
    def params(self) -> int:
        """Parameter count of a Llama-style decoder (attention + gated MLP or experts + RMSNorms): all experts."""
        return self._total(self.linear_params)

    @property
    def active_params(self) -> int:
        """Parameters one token computes with: the routed experts it is sent to, not all of them."""
        return self._total(self._linear(self.experts_per_token)) if self.moe else self.params

    @property
    def linear_params(self) -> int:
        """Parameters in the transformer blocks' linear layers (what `all-linear` LoRA adapts), every expert included."""
        return self._linear(self.experts)

    @property
    def active_intermediate(self) -> int:
        """MLP width one token's activations span in a sparse layer (its experts' and the shared ones)."""
        if not self.moe:
            return self.intermediate
        return self.experts_per_token * self.expert_intermediate + self.shared_intermediate

    def lora_params(self, r: int) -> int:
        """LoRA parameters for rank `r` on every linear layer of every block, and on every expert.

        Fused projections get one adapter each (`fused_projections`: Phi-3's `qkv_proj` and
        `gate_up_proj`). Experts are adapted per expert; their fused gate-and-up weight gets rank
        2r, as peft gives it (the rank the separate gate and up adapters had together).
        """
        h, q_out, kv_out = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim

        def adapters(shapes: list[tuple[int, int]], rank: int = r) -> int:
            return sum(rank * (a + b) for a, b in shapes)

        if self.fused_projections:
            attention = adapters([(h, q_out + 2 * kv_out), (q_out, h)])
            dense = adapters([(h, 2 * self.intermediate), (self.intermediate, h)])
        else:
            attention = adapters([(h, q_out), (h, kv_out), (h, kv_out), (q_out, h)])
            dense = adapters([(h, self.intermediate), (h, self.intermediate), (self.intermediate, h)])
        sparse = 0
        if self.moe:
            width = self.expert_intermediate
            sparse = (self.experts * (adapters([(h, 2 * width)], 2 * r) + adapters([(width, h)]))
                      + adapters([(h, self.experts)]))  # the router
            if self.shared_intermediate:
                sparse += adapters([(h, self.shared_intermediate)] * 2 + [(self.shared_intermediate, h)])
        return self.layers * attention + (self.layers - self.sparse_layers) * dense + self.sparse_layers * sparse

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], name: str = "model") -> "ModelShape":
        """Build from a Hugging Face `config.json` dict (Llama, Mistral, Qwen, Gemma, Phi, OLMo, MoE models, ...).

        Args:
            config: the parsed config (a multimodal config's `text_config` is used when present).
            name: how to call the model in reports.
        Returns:
            The ModelShape.
        """
        if isinstance(config.get("text_config"), dict) and "hidden_size" not in config:
            config = config["text_config"]
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            layers = int(config["num_hidden_layers"])
            shape = cls(
                layers=layers, hidden=hidden,
                intermediate=int(config.get("intermediate_size") or 4 * hidden), heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)), name=name,
                fused_projections=config.get("model_type") in FUSED_PROJECTION_TYPES,
                **_expert_fields(config, hidden, layers))
        except (KeyError, TypeError, ValueError) as exc:
            raise FinesmithError(f"model '{name}': its config lacks {exc} needed for the estimate; "
                                 "pass a decoder-only causal LM") from None
        return shape


def _expert_fields(config: dict[str, Any], hidden: int, layers: int) -> dict[str, int]:
    """The mixture-of-experts fields of a config (all zero for a dense model)."""
    experts = next((int(config[k]) for k in EXPERT_KEYS if config.get(k)), 0)
    if experts <= 1:
        return {}
    per_token = next((int(config[k]) for k in EXPERTS_PER_TOKEN_KEYS if config.get(k)), 1)
    width = int(config.get("moe_intermediate_size") or config.get("intermediate_size") or 4 * hidden)
    shared = int(config.get("shared_expert_intermediate_size") or 0)
    if not shared and config.get("n_shared_experts"):  # DeepSeek: shared experts of the routed width
        shared = int(config["n_shared_experts"]) * width
    # Dense layers: Qwen-MoE's `mlp_only_layers` and `decoder_sparse_step`, DeepSeek's `first_k_dense_replace`.
    step = int(config.get("decoder_sparse_step") or 1)
    dense_only = set(config.get("mlp_only_layers") or [])
    first_dense = int(config.get("first_k_dense_replace") or 0)
    dense = sum(1 for i in range(layers) if i in dense_only or (i + 1) % step != 0 or i < first_dense)
    return {"experts": experts, "experts_per_token": per_token, "expert_intermediate": width,
            "shared_intermediate": shared, "dense_layers": dense}


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
