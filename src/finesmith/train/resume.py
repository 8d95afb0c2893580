"""`--resume`: continue a run only when it can be continued exactly.

The run record (`run.json`) says what the interrupted run trained on and how; a resume is
refused, with one line saying what differs, when the base model, the data, a setting that
shaped the saved state, or the schedule horizon changed. A longer horizon is allowed
with `--extend`: the remaining steps then follow a new cosine from the current learning
rate down to the floor at the new horizon (see `finesmith.train.optim.warmup_cosine`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finesmith.config import TrainConfig
from finesmith.errors import FinesmithError
from finesmith.run import Run, RunRecord, load_run
from finesmith.train.checkpoint import latest_checkpoint, remove_partial_writes, resumable

# Keys that may change between the interrupted run and its continuation: they do not
# change what was already trained (logging, eval and checkpoint cadence). The horizon
# (`max_steps`, `epochs`) is checked separately, as the schedule depends on it.
MAY_CHANGE_ON_RESUME = {"max_steps", "epochs", "log_every", "eval_every", "save_every", "keep_checkpoints",
                        "report_to", "sample_prompts", "sample_max_new_tokens", "early_stopping_patience",
                        "max_bad_steps", "output"}


def find_resume_checkpoint(output: Path, extend: bool = False) -> tuple[Run, Path]:
    """The run in `output` and its latest complete checkpoint (partial writes are removed).

    Raises:
        FinesmithError: no run, a finished run (without `extend`), a run that ended with its
            best weights restored, or no checkpoint with optimizer state.
    """
    if not output.is_dir():
        raise FinesmithError(f"--resume: {output} does not exist; start the run without --resume")
    run = load_run(output)
    record = run.record
    if record.kind != "run":
        raise FinesmithError(f"--resume: {output} is not a single training run")
    if not record.resumable:
        raise FinesmithError(f"--resume: the run in {output} ended with its best weights restored (early stopping), "
                             "which cannot be continued; start a new run from it instead")
    if record.state == "finished" and not extend:
        raise FinesmithError(f"--resume: the run in {output} already finished "
                             f"({record.schedule.get('total_steps')} steps); to train longer, raise max_steps or "
                             "epochs and add --extend")
    remove_partial_writes(output)
    found = latest_checkpoint(output)
    if found is None or not resumable(found):
        raise FinesmithError(f"--resume: no complete checkpoint in {output}/checkpoints; "
                             "start again with --overwrite (and save_every=N to checkpoint during training)")
    return run, found


def check_same_run(saved: RunRecord, current: RunRecord, output: Path) -> None:
    """Refuse to resume when the model, the data or a setting that shaped the saved state differs."""
    if saved.base_model.get("fingerprint") != current.base_model.get("fingerprint"):
        raise FinesmithError(f"--resume: the base model changed since the run in {output} started "
                             f"({saved.base_model.get('spec')} had other files); resume with the original model "
                             "or start a new run")
    for name in ("train", "eval"):
        before, now = saved.data.get(name) or {}, current.data.get(name) or {}
        if before.get("tokens_sha256") != now.get("tokens_sha256"):
            raise FinesmithError(f"--resume: the {name} data changed since the run in {output} started "
                                 f"({before.get('path')}: {before.get('examples')} -> {now.get('examples')} examples "
                                 "or other contents); resume with the original data or start a new run")
    defaults = TrainConfig().to_dict()  # a key added since the run started reads as its default
    changed = sorted(k for k in saved.config.keys() | current.config.keys()
                     if k not in MAY_CHANGE_ON_RESUME
                     and saved.config.get(k, defaults.get(k)) != current.config.get(k, defaults.get(k)))
    if changed:
        details = ", ".join(f"{k}: {saved.config.get(k)!r} -> {current.config.get(k)!r}" for k in changed[:3])
        raise FinesmithError(f"--resume: the settings differ from the run in {output} ({details}); "
                             "resume with the original settings or start a new run")


def resumed_schedule(saved: dict[str, Any], wanted_total: int, done_steps: int, extend: bool,
                     output: Path) -> dict[str, Any]:
    """The schedule to continue with: the saved one, or the saved one extended to `wanted_total`.

    Args:
        saved: the record's schedule (`planned_steps`, `warmup_steps`, `total_steps`, `extensions`).
        wanted_total: the horizon the current settings ask for.
        done_steps: steps in the checkpoint being resumed.
        extend: the user passed `--extend`.
    """
    total = int(saved["total_steps"])
    if wanted_total == total:
        return dict(saved)
    if not extend:
        raise FinesmithError(f"--resume: the schedule horizon changed ({total} -> {wanted_total} steps; max_steps or "
                             f"epochs differ), which would move the warmup/cosine schedule mid-run; resume with the "
                             "original max_steps/epochs, or pass --extend to continue to the new horizon")
    if wanted_total <= done_steps:
        raise FinesmithError(f"--extend: the new horizon ({wanted_total} steps) must be beyond the {done_steps} steps "
                             "already trained; raise max_steps or epochs")
    extensions = [list(e) for e in saved.get("extensions", [])] + [[done_steps, wanted_total]]
    return {**saved, "total_steps": wanted_total, "extensions": extensions}
