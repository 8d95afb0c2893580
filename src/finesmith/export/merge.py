"""Reading a finesmith run folder and turning it into standalone models.

A LoRA run holds only the adapter; its base model spec is in `config.yaml`. Merging folds
the low-rank update into the base weights (`W + B·A·scale`), so the result is a plain
transformers model with no peft at inference time.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finesmith.errors import FinesmithError
from finesmith.evaluate.generate import stop_token_ids
from finesmith.model.methods import load_for_inference

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@dataclass(frozen=True)
class RunInfo:
    """What a run folder holds: an adapter on `base_model`, or a whole model.

    `method` is the training method from `config.yaml` (`lora`, `ia3`, `full`, ...).
    """

    folder: Path
    method: str
    base_model: str | None
    adapter: bool


def inspect_run(run: str | Path) -> RunInfo:
    """Identify a run folder written by `finesmith train`.

    Args:
        run: the run folder.

    Returns:
        A `RunInfo`; raises `FinesmithError` when the folder is not a run.
    """
    folder = Path(run)
    if not folder.is_dir():
        raise FinesmithError(f"run folder not found: {run}; pass the --output folder of `finesmith train`")
    config = folder / "config.yaml"
    settings = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}) if config.is_file() else {}
    if (folder / "adapter_config.json").is_file():
        if not settings.get("model"):
            raise FinesmithError(f"{run}: an adapter without config.yaml, so its base model is unknown; "
                                 "pass a folder written by `finesmith train`")
        return RunInfo(folder, settings.get("method", "lora"), settings["model"], True)
    if (folder / "config.json").is_file():
        return RunInfo(folder, settings.get("method", "full"), settings.get("model"), False)
    raise FinesmithError(f"{run}: no adapter_config.json or config.json; pass a folder written by `finesmith train`")


def merge_adapter(model: Any) -> Any:
    """Fold a PEFT adapter into its base weights; a plain model is returned as is.

    Prompt and prefix tuning add virtual tokens rather than weight updates, so there is
    nothing to fold; those runs are refused with a pointer to the adapter export.
    """
    if not hasattr(model, "peft_config"):
        return model
    if model.peft_config[model.active_adapter].is_prompt_learning:
        raise FinesmithError("this run trained virtual prompt tokens, which cannot be merged into the weights; "
                             "use --format adapter (and load it with peft)")
    return model.merge_and_unload()


def load_merged(run: str | Path) -> tuple[Any, Any]:
    """The run as one plain transformers model (adapter merged into the base), in float32.

    Args:
        run: the run folder.

    Returns:
        `(model, tokenizer)`, the model in eval mode on the CPU.
    """
    info = inspect_run(run)
    model, tokenizer = load_for_inference(str(info.folder))
    model = merge_adapter(model)
    model.eval()
    return model, tokenizer


def save_hf(model: Any, tokenizer: Any, output: Path) -> None:
    """Save a safetensors model folder with tokenizer, chat template and stop tokens.

    `generation_config.eos_token_id` lists EOS plus the end-of-turn token, so plain
    `model.generate` stops at the end of an answer instead of running on into a new turn.
    """
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    generation = model.generation_config
    generation.eos_token_id = stop_token_ids(tokenizer)
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(output)


def copy_adapter(info: RunInfo, output: Path) -> None:
    """Copy the PEFT adapter and tokenizer files of a LoRA run into `output`."""
    for name in ADAPTER_FILES + TOKENIZER_FILES:
        if (info.folder / name).is_file():
            shutil.copy2(info.folder / name, output / name)
