"""The run record: what a training run knew, written once and trusted by every reader.

A run is a folder with `run.json`. `finesmith train` writes it atomically before the first
step (state `running`) and updates it when the run ends (`finished`, `preempted` or
`failed`). Every command that reads a run (eval, compare, chat, serve, export, resume,
staged runs, the advisor's calibration) goes through `load_run`, so none of them re-derives
what the writer knew: the base model and its fingerprint, the tokenizer state (tokens
added, vocabulary size, where the chat template came from), the method and the modules it
trained in full, the data fingerprints, the schedule horizon and the versions.

Exports get a smaller record of their own (`export.json`), so `--overwrite` can tell a
folder finesmith wrote from one it did not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finesmith.errors import FinesmithError

RECORD_FILE = "run.json"
EXPORT_RECORD_FILE = "export.json"
SCHEMA = 1
STATES = ("running", "preempted", "finished", "failed")
KINDS = ("run", "stages")


@dataclass
class RunRecord:
    """Everything a reader of a run needs to know; stored as `run.json`.

    Fields:
        kind: `run` (one training run) or `stages` (a staged run's top folder).
        state: running, preempted, finished or failed.
        config: the resolved config as the user asked for it (auto values filled in).
        base_model: `{"spec": ..., "fingerprint": ...}`: what the run started from.
        tokenizer: `{"added_tokens": [...], "vocab_size": N, "template_source": "model"|"chatml"}`.
        method: `{"name", "adapter", "layout", "mergeable", "trained_in_full": [...]}`.
        data: `{"train": {"path", "fingerprint", "examples", "tokens"}, "eval": {...}}`.
        schedule: `{"total_steps", "warmup_steps", "lr", "segments": [...]}` (see train.optim).
        versions: finesmith and library versions that wrote the run.
        result: final numbers once finished (steps, losses, best step, early stop).
        resumable: whether `--resume` may continue it (False once best weights were restored).
        error: the one-line reason when `failed`.
    """

    kind: str = "run"
    state: str = "running"
    config: dict[str, Any] = field(default_factory=dict)
    base_model: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    resumable: bool = True
    world_size: int = 1  # processes that trained it (a checkpoint resumes on any number)
    parallelism: str = "none"  # none (one process) | ddp | fsdp
    error: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def adapter(self) -> bool:
        return bool(self.method.get("adapter"))

    @property
    def method_name(self) -> str:
        return str(self.method.get("name", ""))


@dataclass(frozen=True)
class Run:
    """A run folder and its record."""

    folder: Path
    record: RunRecord

    @property
    def base_spec(self) -> str:
        return str(self.record.base_model.get("spec", ""))


def versions() -> dict[str, str]:
    """finesmith and the libraries whose behaviour shapes a run."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("finesmith", "torch", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON so a reader never sees half a file (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_record(folder: Path, record: RunRecord) -> RunRecord:
    """Save `record` as `folder/run.json` (atomically) and return it."""
    record.updated = time.time()
    write_json_atomic(folder / RECORD_FILE, record.to_dict())
    return record


def update_record(folder: Path, **changes: Any) -> RunRecord:
    """Load the record, change some fields, save it."""
    record = load_run(folder).record
    for key, value in changes.items():
        if not hasattr(record, key):
            raise AttributeError(key)
        setattr(record, key, value)
    return write_record(folder, record)


def has_record(folder: Path) -> bool:
    return (Path(folder) / RECORD_FILE).is_file()


def load_run(folder: str | Path) -> Run:
    """The run in `folder`; a folder without `run.json` is not a run.

    Raises:
        FinesmithError: the folder is missing, has no record, or the record is unreadable.
    """
    path = Path(folder)
    if not path.is_dir():
        raise FinesmithError(f"run folder not found: {folder}; pass the --output folder of `finesmith train`")
    record_path = path / RECORD_FILE
    if not record_path.is_file():
        raise FinesmithError(f"{folder}: not a finesmith run (no {RECORD_FILE}); pass the --output folder of "
                             "`finesmith train` (runs written before run records must be trained again)")
    try:
        raw = json.loads(record_path.read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(RunRecord)}
        record = RunRecord(**{k: v for k, v in raw.items() if k in known})
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise FinesmithError(f"{record_path}: unreadable run record ({exc}); the run folder is damaged") from None
    if record.kind not in KINDS or record.state not in STATES:
        raise FinesmithError(f"{record_path}: unknown kind/state {record.kind}/{record.state}; "
                             "written by a newer finesmith? upgrade finesmith")
    return Run(path, record)


def write_export_record(folder: Path, payload: dict[str, Any]) -> None:
    """Mark an export folder as written by finesmith (what it came from and how)."""
    write_json_atomic(folder / EXPORT_RECORD_FILE, {"schema": SCHEMA, "created": time.time(),
                                                     "versions": versions(), **payload})


def written_by_finesmith(folder: Path) -> bool:
    """True when `folder` holds a finesmith run record or export record."""
    return (folder / RECORD_FILE).is_file() or (folder / EXPORT_RECORD_FILE).is_file()
