"""Fine-tuning methods: each one is a model setup, not a separate training script.

`full` trains the weights themselves (optionally keeping embeddings or the first blocks
fixed); every other method is a PEFT config on top of a frozen base: `lora` (with rsLoRA,
DoRA and fully trained extra modules), `qlora` (LoRA on a 4-bit NF4 base, CUDA only),
`prompt_tuning` and `prefix_tuning` (learned virtual tokens), and `ia3` (learned scaling
vectors). All of them go through the same training loop.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from finesmith.config import TrainConfig
from finesmith.errors import FinesmithError
from finesmith.model.load import load_model, load_tokenizer, resolve_model_path, run_base_model


def check_method_supported(config: TrainConfig) -> None:
    """Fail before any model is loaded when the method cannot run on this machine.

    Loading a model takes minutes for large ones; finding out afterwards that 4-bit
    quantisation needs a GPU wastes them.
    """
    if config.method == "qlora":
        if not torch.cuda.is_available():
            raise FinesmithError("method qlora needs a CUDA GPU (4-bit NF4 weights via bitsandbytes) and none is "
                                 "available; use --method lora on this machine")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise FinesmithError("method qlora needs bitsandbytes; install it with `pip install 'finesmith[qlora]'`")
        if resolve_model_path(config.model)[1] is not None:
            raise FinesmithError(f"method qlora cannot quantise a .gguf file ({config.model}); "
                                 "pass a Hugging Face model folder or use --method lora")


def load_base_model(config: TrainConfig, device: str) -> Any:
    """The base model the method starts from: float32 for all methods, 4-bit NF4 for qlora."""
    check_method_supported(config)
    if config.method != "qlora":
        return load_model(config.model, device)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    path, _ = resolve_model_path(config.model)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                attn_implementation="sdpa", device_map={"": torch.cuda.current_device()})


def apply_method(model: Any, config: TrainConfig) -> Any:
    """Return the model to train, set up for `config.method`.

    Args:
        model: the base model (from `load_base_model`).
        config: the run config; reads `method` and its section (`full`, `lora`, `prompt`).
    Returns:
        The model itself (full) or a PEFT wrapper whose only trainable parameters are the method's.
    """
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (PEFT) without extra hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.method == "full":
        return freeze_for_full(model, config.full.freeze_embeddings, config.full.freeze_layers)
    if config.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config(config))
    except ValueError as exc:
        raise FinesmithError(f"config: method {config.method} does not fit this model ({exc}); "
                             "check lora.target_modules / lora.modules_to_save") from None


def peft_config(config: TrainConfig) -> Any:
    """The PEFT config object for a non-full method."""
    import peft

    if config.method in ("lora", "qlora"):
        lora = config.lora
        return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=lora.target_modules, use_rslora=lora.use_rslora,
                               use_dora=lora.use_dora, modules_to_save=lora.modules_to_save, task_type="CAUSAL_LM")
    if config.method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=config.prompt.virtual_tokens, task_type="CAUSAL_LM")
    if config.method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=config.prompt.virtual_tokens, task_type="CAUSAL_LM")
    if config.method == "ia3":
        return peft.IA3Config(task_type="CAUSAL_LM")
    raise FinesmithError(f"unknown method '{config.method}'")


def freeze_for_full(model: Any, freeze_embeddings: bool, freeze_layers: int) -> Any:
    """Make every weight trainable except the input embeddings and/or the first N blocks."""
    for param in model.parameters():
        param.requires_grad_(True)
    if freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if freeze_layers:
        blocks = transformer_blocks(model)
        if freeze_layers > len(blocks):
            raise FinesmithError(f"config: full.freeze_layers is {freeze_layers} but the model has {len(blocks)} "
                                 "blocks; use a smaller number")
        for block in blocks[:freeze_layers]:
            block.requires_grad_(False)
    return model


def transformer_blocks(model: Any) -> torch.nn.ModuleList:
    """The model's list of decoder blocks (the ModuleList with one entry per hidden layer)."""
    n_layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise FinesmithError("config: full.freeze_layers needs a model with a list of decoder blocks; "
                         "this architecture has none, so leave it at 0")


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts (4-bit weights count as their logical size)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_logical_numel(p) for p in model.parameters())
    return trainable, total


def _logical_numel(param: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte and keeps the real shape in quant_state.
    quant_state = getattr(param, "quant_state", None)
    return int(torch.Size(quant_state.shape).numel()) if quant_state is not None else param.numel()


def load_for_inference(model: str, adapter: str | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """Load (model, tokenizer) for evaluation or chat.

    `model` may be a base model spec or a finesmith run folder (full fine-tune, or an
    adapter run whose base model is read from its `config.yaml`); `adapter` adds a PEFT
    adapter folder (LoRA, IA3, prompt or prefix tuning).
    """
    run = Path(model)
    if run.is_dir() and (run / "adapter_config.json").is_file() and adapter is None:
        base = run_base_model(run)
        if base is None:
            raise FinesmithError(f"{model}: an adapter folder without config.yaml; pass --model BASE --adapter {model}")
        model, adapter = base, str(run)
    tokenizer = load_tokenizer(adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model)
    base_model = load_model(model, device)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FinesmithError(f"{adapter}: not an adapter folder (no adapter_config.json); pass an adapter run's output folder")
        base_model = PeftModel.from_pretrained(base_model, adapter)
    base_model.eval()
    return base_model, tokenizer


__all__ = ["apply_method", "check_method_supported", "count_parameters", "load_base_model", "load_for_inference",
           "resolve_model_path"]
