"""Fine-tuning methods: each one is a model setup, not a separate training script."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finesmith.config import TrainConfig
from finesmith.errors import FinesmithError
from finesmith.model.load import load_model, load_tokenizer, resolve_model_path, run_base_model


def apply_method(model: Any, config: TrainConfig) -> Any:
    """Return the model to train: all weights (`full`) or a PEFT LoRA wrapper (`lora`)."""
    if config.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules, task_type="CAUSAL_LM")
        try:
            return get_peft_model(model, lora)
        except ValueError as exc:
            raise FinesmithError(f"config: lora.target_modules {config.lora.target_modules!r} does not fit this model: {exc}") from None
    raise FinesmithError(f"unknown method '{config.method}'; use full or lora")


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_for_inference(model: str, adapter: str | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """Load (model, tokenizer) for evaluation or chat.

    `model` may be a base model spec or a finesmith run folder (full fine-tune, or a LoRA
    run whose base model is read from its `config.yaml`); `adapter` adds a LoRA folder.
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
            raise FinesmithError(f"{adapter}: not an adapter folder (no adapter_config.json); pass a LoRA run's output folder")
        base_model = PeftModel.from_pretrained(base_model, adapter)
    base_model.eval()
    return base_model, tokenizer


__all__ = ["apply_method", "count_parameters", "load_for_inference", "resolve_model_path"]
