"""Reading a finesmith run folder and turning it into standalone models.

A LoRA run holds only the adapter; its base model is named in the run record (`run.json`).
`load_merged` loads the run and folds the adapter into the base weights
(`finesmith.model.merge.merge_adapter`, shared with `Method.merge`); `save_hf` writes the
result as a plain transformers folder with its tokenizer and stop tokens.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finesmith.errors import FinesmithError
from finesmith.core.templates import stop_token_ids
from finesmith.model.merge import merge_adapter, qlora_merge_parity, separate_adapted_head  # noqa: F401 (re-exported)
from finesmith.model.methods import load_for_inference

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@dataclass(frozen=True)
class RunInfo:
    """What a run folder holds: an adapter on `base_model`, or a whole model.

    `method` is the training method from the run record (`lora`, `ia3`, `full`, ...).
    """

    folder: Path
    method: str
    base_model: str | None
    adapter: bool


def inspect_run(run: str | Path) -> RunInfo:
    """Identify a run folder written by `finesmith train`, from its run record.

    Args:
        run: the run folder.

    Returns:
        A `RunInfo`; raises `FinesmithError` when the folder is not a run.
    """
    from finesmith.run import load_run

    loaded = load_run(run)
    if loaded.record.kind != "run":
        raise FinesmithError(f"{run}: a staged run; export one of its stage folders (see {run}/stages.json)")
    return RunInfo(loaded.folder, loaded.record.method_name, loaded.base_spec or None, loaded.record.adapter)


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


def save_merged(run: str | Path, target: str | Path) -> str:
    """Merge a run into a plain model folder (weights, tokenizer, generation stop tokens).

    The folder is what `export --format hf` writes, less its card and record; staged runs use
    it to turn one stage into the base model of the next.

    Args:
        run: the run folder.
        target: the folder to write (created if missing).

    Returns:
        `target` as a string, ready to pass as a model spec.
    """
    model, tokenizer = load_merged(run)
    save_hf(model, tokenizer, Path(target))
    return str(target)


def copy_adapter(info: RunInfo, output: Path) -> None:
    """Copy the PEFT adapter and tokenizer files of a LoRA run into `output`."""
    for name in ADAPTER_FILES + TOKENIZER_FILES:
        if (info.folder / name).is_file():
            shutil.copy2(info.folder / name, output / name)
