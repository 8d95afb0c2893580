"""Merging an adapter into its base weights: what `Method.merge`, export and staged runs share.

Merging folds the low-rank update into the base weights (`W + B·A·scale`), so the result is a
plain transformers model with no peft at inference time. Experts of a mixture-of-experts model
(fused 3-D parameters that peft adapts with `target_parameters`) merge the same way, expert by expert.

Tied embeddings need care. When the input embedding and the LM head share one matrix,
an adapter may still have trained them apart: `lora.modules_to_save` trains a separate
full copy of each module named (new tokens train `embed_tokens` and `lm_head`), and a
LoRA on `lm_head` adds its update to the head only. The merged model then keeps two
matrices and says so in its config (`tie_word_embeddings: false`); otherwise saving
would drop the trained head, and loading (transformers or llama.cpp) would reuse the
embedding in its place.
"""

from __future__ import annotations

from typing import Any

from finesmith.errors import FinesmithError


def merge_adapter(model: Any) -> Any:
    """Fold a PEFT adapter into its base weights and return a plain transformers model.

    A plain model is returned as is. Input and output embeddings that the adapter trained
    apart stay apart (see the module docstring), so the merged model computes what the
    run computes. Prompt and prefix tuning add virtual tokens rather than weight updates,
    so there is nothing to fold; those runs are refused with a pointer to the adapter export.

    Args:
        model: a `PeftModel` (as `load_for_inference` returns for an adapter run) or a plain model.

    Returns:
        The merged model; the PEFT wrapper is consumed.
    """
    if not hasattr(model, "peft_config"):
        return model
    if model.peft_config[model.active_adapter].is_prompt_learning:
        raise FinesmithError("this run trained virtual prompt tokens, which cannot be merged into the weights; "
                             "use --format adapter (and load it with peft)")
    separate_adapted_head(model)
    merged = model.merge_and_unload()
    inputs, outputs = merged.get_input_embeddings(), merged.get_output_embeddings()
    if outputs is not None and outputs.weight.data_ptr() != inputs.weight.data_ptr():
        for config in {id(c): c for c in (merged.config, merged.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    return merged


def qlora_merge_parity(model: Any, input_ids: Any, tolerance: float = 0.02) -> dict[str, Any]:
    """Merge a QLoRA model into its dequantised base and compare the logits with base + adapter.

    Args:
        model: a peft model on a 4-bit NF4 base, as training leaves it (CUDA, bitsandbytes).
        input_ids: `[1, T]` tokens to compare on.
        tolerance: largest logit difference accepted, relative to the largest logit.

    Returns:
        `{"max_abs_logit_difference", "logit_scale", "relative", "passed"}`; the model is merged in place.
    """
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        reference = model(input_ids=input_ids.to(device)).logits.float()
    base = model.get_base_model()
    if getattr(base, "is_quantized", False):
        base.dequantize()  # every NF4 layer (also under the LoRA wrappers) becomes a plain Linear
    merged = merge_adapter(model).float()
    with torch.no_grad():
        out = merged(input_ids=input_ids.to(device)).logits.float()
    diff, scale = float((out - reference).abs().max()), float(reference.abs().max())
    return {"max_abs_logit_difference": diff, "logit_scale": scale, "relative": diff / max(scale, 1e-9),
            "passed": diff <= tolerance * scale}


def separate_adapted_head(model: Any) -> None:
    """Give a tied LM head its own matrix before merging when an adapter layer sits on either side.

    Merging writes `W + ΔW` into the base weight; with one shared matrix, a LoRA update to
    the head would also change the embedding (and one to the embedding, the head). Copies
    trained with `modules_to_save` need nothing here: merging swaps in each trained copy.
    """
    import torch

    base = model.get_base_model()
    inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    if outputs is None:
        return
    inner_in, inner_out = getattr(inputs, "base_layer", inputs), getattr(outputs, "base_layer", outputs)
    weight = getattr(inner_in, "weight", None)
    shared = weight is not None and weight is getattr(inner_out, "weight", None)
    adapted = inner_in is not inputs or inner_out is not outputs
    if shared and adapted:
        inner_out.weight = torch.nn.Parameter(inner_out.weight.detach().clone(), requires_grad=False)
