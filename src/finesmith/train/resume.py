"""Checks before continuing a run: there is a checkpoint, and the run is the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from finesmith.config import TrainConfig
from finesmith.errors import FinesmithError
from finesmith.train.checkpoint import latest_checkpoint, remove_partial_writes

# Keys that may change between the interrupted run and its continuation: they do not
# change what was already trained (more steps, other logging or checkpoint cadence).
MAY_CHANGE_ON_RESUME = {"max_steps", "epochs", "log_every", "eval_every", "save_every", "keep_checkpoints",
                        "report_to", "sample_prompts", "sample_max_new_tokens", "early_stopping_patience",
                        "max_bad_steps"}


def find_resume_checkpoint(output: Path) -> Path:
    """The latest complete checkpoint of the run in `output` (partial writes are removed)."""
    if not (output / "config.yaml").is_file():
        raise FinesmithError(f"--resume: {output} holds no run (no config.yaml); start it without --resume")
    remove_partial_writes(output)
    found = latest_checkpoint(output)
    if found is None:
        raise FinesmithError(f"--resume: no complete checkpoint in {output}/checkpoints; "
                             "start again with --overwrite (and save_every=N to checkpoint during training)")
    return found


def check_same_run(output: Path, config: TrainConfig) -> None:
    """Refuse to resume when a setting that shaped the saved state differs from the saved config."""
    saved: dict[str, Any] = yaml.safe_load((output / "config.yaml").read_text(encoding="utf-8")) or {}
    current = config.to_dict()
    changed = sorted(k for k in current.keys() | saved.keys()
                     if k not in MAY_CHANGE_ON_RESUME and saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:3])
        raise FinesmithError(f"--resume: the settings differ from the run in {output} ({details}); "
                             "resume with the original settings or start a new run")
