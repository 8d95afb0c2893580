"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `OUTPUT/checkpoints/step-N/` holding the trainable weights
(`trainable.safetensors`; adapter runs also get a plain PEFT adapter next to it), the
optimizer and scheduler state, every RNG state and the data position
(`trainer_state.json`). It is written into a hidden temporary folder and renamed into
place, so a crash mid-write never leaves a half checkpoint under a `step-N` name.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
BEST_DIR = "best"
# Test hook: pause inside the write of the checkpoint for this step (after the files are
# written, before the rename) so a test can kill the process at the worst moment.
PAUSE_ENV = "FINESMITH_CHECKPOINT_PAUSE_AT_STEP"


@dataclass
class TrainerState:
    """Loop counters saved with every checkpoint."""

    step: int  # optimizer steps completed
    micro_batches: int  # micro-batches drawn from the data stream (the data position)
    eval_loss: float | None = None  # eval loss measured at this step, if any
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    bad_steps: int = 0  # non-finite steps skipped so far
    bad_in_a_row: int = 0  # consecutive non-finite steps up to this one
    best_step: int | None = None  # step whose weights had the lowest eval loss (saved in checkpoints/best)


def checkpoint_root(output: Path) -> Path:
    return output / "checkpoints"


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first, ordered by step number (not name)."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(output: Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1][1] if found else None


def save_checkpoint(output: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: TrainerState, keep: int, with_optimizer: bool = True) -> Path:
    """Write a checkpoint atomically, then drop old ones (keeping the newest `keep`).

    Args:
        output: the run folder.
        model, optimizer, scheduler: what the loop trains with.
        state: loop counters; `state.step` names the folder.
        keep: newest checkpoints to keep.
        with_optimizer: include optimizer, scheduler and RNG states (what `--resume` needs);
            False for weights that cannot be continued (best weights restored at the end).
    Returns:
        The checkpoint folder.
    """
    root = checkpoint_root(output)
    final = _write_atomically(root, f"step-{state.step}", lambda tmp: write_contents(
        tmp, model, optimizer if with_optimizer else None, scheduler, state), pause=str(state.step))
    rotate_checkpoints(output, keep)
    return final


def _write_atomically(root: Path, name: str, write: Any, pause: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        write(tmp)
        if pause is not None and os.environ.get(PAUSE_ENV) == pause:
            print(f"checkpoint write paused in {tmp}", flush=True)
            time.sleep(600)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_contents(folder: Path, model: Any, optimizer: torch.optim.Optimizer | None, scheduler: Any,
                   state: TrainerState) -> None:
    save_file(trainable_weights(model), str(folder / "trainable.safetensors"))
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder, safe_serialization=True)  # a plain PEFT adapter, usable on its own
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states()},
                   folder / "state.pt")
    # Written last: its presence marks the folder's contents as complete.
    (folder / STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")


def trainable_weights(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save_best(output: Path, model: Any, state: TrainerState) -> Path:
    """Keep the current trainable weights as `checkpoints/best` (atomically), with their step and eval loss."""
    def write(folder: Path) -> None:
        save_file(trainable_weights(model), str(folder / "trainable.safetensors"))
        (folder / STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")

    return _write_atomically(checkpoint_root(output), BEST_DIR, write)


def load_best(output: Path, model: Any) -> TrainerState | None:
    """Load `checkpoints/best` into `model`; return its counters (None when there is none)."""
    folder = checkpoint_root(output) / BEST_DIR
    if not (folder / STATE_FILE).is_file():
        return None
    _load_weights(folder, model)
    return TrainerState(**json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))


def _load_weights(folder: Path, model: Any) -> None:
    saved = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [name for name in saved if name not in params]
    if missing:
        raise ValueError(f"{folder}: checkpoint has weights this model lacks, e.g. {missing[0]}")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def load_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG states from `folder`; return the loop counters."""
    _load_weights(folder, model)
    blob = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    restore_rng_states(blob["rng"])
    return TrainerState(**json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))


def rotate_checkpoints(output: Path, keep: int) -> None:
    """Delete complete step checkpoints except the newest `keep` (the best weights live in `best/`)."""
    found = list_checkpoints(output)
    for _, path in found[:-keep] if keep else found:
        shutil.rmtree(path, ignore_errors=True)


def best_checkpoint(output: Path) -> Path | None:
    folder = checkpoint_root(output) / BEST_DIR
    return folder if (folder / STATE_FILE).is_file() else None


def resumable(folder: Path) -> bool:
    """Whether a checkpoint holds what `--resume` needs (optimizer, scheduler, RNG states)."""
    return (folder / "state.pt").is_file()


def remove_partial_writes(output: Path) -> None:
    """Delete temporary folders left by a checkpoint write that was killed."""
    root = checkpoint_root(output)
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry, ignore_errors=True)


def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA RNG states, as tensors and plain values."""
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(_as_tuples(states["python"]))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuples(value: Any) -> Any:
    # random.setstate wants the nested tuples it produced; serialisation may return lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
