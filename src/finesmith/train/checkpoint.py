"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `OUTPUT/checkpoints/step-N/` holding
- `sharded/`: the trainable weights and the optimizer state, written with
  `torch.distributed.checkpoint` (every rank writes its own shard under FSDP2, replicas are
  written once). Loading reshards, so a checkpoint continues on any number of processes and
  under either parallelism (FSDP2 on 2 ranks -> 1 process, 1 process -> 2 ranks);
- `state.pt`: the scheduler and every RNG state; `trainer_state.json`: the loop counters and
  the data position (written last: its presence marks the folder complete);
- for adapter runs on unsharded weights, a plain PEFT adapter, usable on its own.

Optimizers outside `torch.optim` (the 8-bit ones) keep their state in `state.pt` and the
weights in `trainable.safetensors`, as single-layout checkpoints. A checkpoint is written
into a hidden temporary folder and renamed into place, so a crash mid-write never leaves a
half checkpoint under a `step-N` name.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from finesmith.train import distributed

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
BEST_DIR = "best"
SHARDED_DIR = "sharded"
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

    Called on every rank of a run (the sharded state is written collectively); rank 0 writes
    the rest, renames the folder into place and rotates.

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
    world = distributed.current()
    root = checkpoint_root(output)
    name = f"step-{state.step}"
    final, tmp = root / name, root / f".tmp-{name}"  # one name every rank knows
    if world.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    try:
        write_contents(tmp, model, optimizer if with_optimizer else None, scheduler, state)
        distributed.barrier()  # every shard is on disk
        if world.main:
            if os.environ.get(PAUSE_ENV) == str(state.step):
                print(f"checkpoint write paused in {tmp}", flush=True)
                time.sleep(600)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            rotate_checkpoints(output, keep)
    finally:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    return final


def _write_atomically(root: Path, name: str, write: Any) -> Path:
    """`write(folder)` into a temporary folder, then rename it to `root/name` (one process)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_contents(folder: Path, model: Any, optimizer: torch.optim.Optimizer | None, scheduler: Any,
                   state: TrainerState) -> None:
    """Fill a checkpoint folder (every rank calls it; see the module docstring for the layout)."""
    import torch.distributed.checkpoint as dcp

    world = distributed.current()
    portable = optimizer is None or _portable(optimizer)
    if portable:
        content = {"model": _model_state(model)}
        if optimizer is not None:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            content["optim"] = get_optimizer_state_dict(model, optimizer)
        with _one_process_quietly():
            dcp.save(content, checkpoint_id=folder / SHARDED_DIR, no_dist=not world.distributed)
    if not world.main:
        return
    if not portable:
        save_file(trainable_weights(model), str(folder / "trainable.safetensors"))
    if hasattr(model, "peft_config") and not distributed.is_sharded(model):
        model.save_pretrained(folder, safe_serialization=True)  # a plain PEFT adapter, usable on its own
    if optimizer is not None:
        blob = {"scheduler": scheduler.state_dict(), "rng": rng_states()}
        if not portable:
            blob["optimizer"] = optimizer.state_dict()
        torch.save(blob, folder / "state.pt")
    # Written last: its presence marks the folder's contents as complete.
    (folder / STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")


@contextlib.contextmanager
def _one_process_quietly():
    """torch.distributed.checkpoint warns that it assumes one process when there is no process
    group; one process is what finesmith asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _portable(optimizer: torch.optim.Optimizer) -> bool:
    """Optimizers whose state `torch.distributed.checkpoint` can name and reshard (torch's own)."""
    return type(optimizer).__module__.startswith("torch.optim")


def _model_state(model: Any) -> dict[str, Any]:
    """The trainable weights by name (DTensor shards under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))


def trainable_weights(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save_best(output: Path, model: Any, state: TrainerState) -> Path:
    """Keep the current trainable weights as `checkpoints/best` (atomically), with their step and eval
    loss. Every rank calls it (sharded weights are gathered); rank 0 writes."""
    weights = distributed.gathered_weights(model) if distributed.is_sharded(model) else None
    folder = checkpoint_root(output) / BEST_DIR
    if not distributed.current().main:
        return folder

    def write(tmp: Path) -> None:
        save_file(weights if weights is not None else trainable_weights(model), str(tmp / "trainable.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")

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
    if distributed.is_sharded(model):  # full tensors in, this rank's shards kept
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        keys = set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True, strict=False))
        _refuse_unknown(folder, list(keys.unexpected_keys))
        return
    params = dict(model.named_parameters())
    _refuse_unknown(folder, [name for name in saved if name not in params])
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def _refuse_unknown(folder: Path, unknown: list[str]) -> None:
    if unknown:
        raise ValueError(f"{folder}: checkpoint has weights this model lacks, e.g. {unknown[0]}")


def load_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG states from `folder`; return the loop counters.
    Every rank calls it; the sharded state is resharded to this run's processes."""
    blob = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    if (folder / SHARDED_DIR).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        content = {"model": _model_state(model), "optim": get_optimizer_state_dict(model, optimizer)}
        with _one_process_quietly():
            dcp.load(content, checkpoint_id=folder / SHARDED_DIR, no_dist=not distributed.current().distributed)
        set_model_state_dict(model, content["model"], options=StateDictOptions(strict=False))  # frozen weights stay
        set_optimizer_state_dict(model, optimizer, content["optim"])
    else:
        _load_weights(folder, model)
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
