"""The fine-tuning service's state: files, jobs, events and checkpoints in one SQLite database.

Everything lives in finesmith's home folder (`$FINESMITH_HOME`, else `~/.finesmith`):
`service.db`, the uploaded files under `files/` and each job's run folder under `jobs/`.
SQLite in WAL mode lets the HTTP process and a job's worker process read and write the
same database; every write is one short transaction (`BEGIN IMMEDIATE`), so a process
killed at any moment leaves the database as it was before or after that write, never
half-way. Reads take plain (deferred) transactions: under WAL they never wait for a writer.

The home is private: folders 0700, files 0600 (also fixed on start for a home made before).
One server at a time serves a home's jobs (`lock_home`).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from finesmith.errors import FinesmithError

LOCK_FILE = "server.lock"
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, path TEXT NOT NULL, lines INTEGER NOT NULL, kind TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, model TEXT NOT NULL, training_file TEXT NOT NULL,
    validation_file TEXT, suffix TEXT, seed INTEGER NOT NULL, method TEXT NOT NULL, status TEXT NOT NULL,
    created_at INTEGER NOT NULL, finished_at INTEGER, fine_tuned_model TEXT, error TEXT, output TEXT NOT NULL,
    trained_tokens INTEGER, cancel_requested INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    hyperparameters TEXT NOT NULL DEFAULT '{}', worker_pid INTEGER);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT, key TEXT,
    UNIQUE (job_id, key));
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, step INTEGER NOT NULL, created_at INTEGER NOT NULL,
    metrics TEXT NOT NULL, UNIQUE (job_id, step));
"""

# Columns added since the first schema: (name, SQL type and default); added on open when missing.
ADDED_COLUMNS = (("metadata", "TEXT"), ("pause_requested", "INTEGER NOT NULL DEFAULT 0"),
                 ("result_files", "TEXT NOT NULL DEFAULT '[]'"), ("estimated_finish", "INTEGER"))

# The hosted API's job states, in their order (`paused`: stopped with a checkpoint until resumed).
VALIDATING, QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, PAUSED = (
    "validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused")
FINAL = (SUCCEEDED, FAILED, CANCELLED)


def home() -> Path:
    """finesmith's home folder: `$FINESMITH_HOME`, else `~/.finesmith`."""
    return Path(os.environ.get("FINESMITH_HOME") or Path.home() / ".finesmith")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Store:
    """The service's database and folders under `root` (created on first use)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or home())
        self.files_dir, self.jobs_dir = self.root / "files", self.root / "jobs"
        for folder in (self.root, self.files_dir, self.jobs_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = self.root / "service.db"
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, kind in ADDED_COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        finally:
            db.close()
        self.make_private()

    def make_private(self) -> None:
        """Folders 0700, files 0600: the home holds training data and the state of every job."""
        for folder in (self.root, self.files_dir, self.jobs_dir, *self.jobs_dir.iterdir()):
            if folder.is_dir() and not folder.is_symlink():
                folder.chmod(0o700)
        for path in (*self.root.glob("service.db*"), *self.files_dir.iterdir()):
            if path.is_file() and not path.is_symlink():
                path.chmod(0o600)

    @contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction: `BEGIN IMMEDIATE` for writes (they queue for the write lock),
        plain `BEGIN` for reads (under WAL they read a snapshot and never wait)."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # files
    def upload_path(self) -> Path:
        """A new private file in `files/` for an upload being received (then `add_file` it, or delete it)."""
        path = self.files_dir / f".upload-{secrets.token_hex(8)}.jsonl"
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return path

    def add_file(self, filename: str, purpose: str, source: Path, lines: int, kind: str,
                 suffix: str = ".jsonl") -> dict[str, Any]:
        """Keep the file at `source` (moved into `files/`, so on the same file system) as a new file."""
        file_id = new_id("file")
        path = self.files_dir / f"{file_id}{suffix}"
        os.replace(source, path)
        path.chmod(0o600)
        row = {"id": file_id, "filename": filename, "purpose": purpose, "bytes": path.stat().st_size,
               "created_at": int(time.time()), "path": str(path), "lines": lines, "kind": kind}
        with self._db(write=True) as db:
            db.execute("INSERT INTO files VALUES (:id, :filename, :purpose, :bytes, :created_at, :path, :lines, :kind)",
                       row)
        return row

    def file(self, file_id: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return dict(row) if row else None

    def files(self, purpose: str | None = None) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM files WHERE (? IS NULL OR purpose = ?) ORDER BY created_at DESC, id",
                              (purpose, purpose)).fetchall()
        return [dict(r) for r in rows]

    def delete_file(self, file_id: str) -> bool:
        found = self.file(file_id)
        if not found:
            return False
        with self._db(write=True) as db:
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        Path(found["path"]).unlink(missing_ok=True)  # a file this service wrote
        return True

    # jobs
    def add_job(self, job: dict[str, Any]) -> dict[str, Any]:
        with self._db(write=True) as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            row = {**job, "seq": seq, "status": VALIDATING, "created_at": int(time.time()),
                   "method": json.dumps(job["method"]), "hyperparameters": json.dumps(job.get("hyperparameters", {})),
                   "metadata": json.dumps(job["metadata"]) if job.get("metadata") is not None else None}
            db.execute("INSERT INTO jobs (id, seq, model, training_file, validation_file, suffix, seed, method, "
                       "status, created_at, output, hyperparameters, metadata) VALUES (:id, :seq, :model, "
                       ":training_file, :validation_file, :suffix, :seed, :method, :status, :created_at, :output, "
                       ":hyperparameters, :metadata)", row)
        return self.job(job["id"])

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, after: str | None = None, limit: int = 20,
             metadata: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; `after` is a job id (the page starts below it); `metadata`: only jobs
        whose metadata has every one of these key/value pairs. Returns (jobs, has_more)."""
        where, args = "seq < ?", []
        for key, value in (metadata or {}).items():
            where += " AND json_extract(metadata, ?) = ?"
            args += ['$."' + key.replace('"', '""') + '"', value]
        with self._db() as db:
            below = db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone() if after else None
            rows = db.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY seq DESC LIMIT ?",
                              (below[0] if below else 1 << 62, *args, limit + 1)).fetchall()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def jobs_in(self, *statuses: str) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(statuses))}) ORDER BY seq",
                              statuses).fetchall()
        return [_job(r) for r in rows]

    def update_job(self, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        if "error" in fields and fields["error"] is not None and not isinstance(fields["error"], str):
            fields["error"] = json.dumps(fields["error"])
        if fields.get("status") in FINAL:
            fields.setdefault("finished_at", int(time.time()))
        with self._db(write=True) as db:
            db.execute(f"UPDATE jobs SET {', '.join(f'{k} = :{k}' for k in fields)} WHERE id = :job_id",
                       {**fields, "job_id": job_id})

    def request_cancel(self, job_id: str) -> None:
        with self._db(write=True) as db:
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))

    def request_pause(self, job_id: str, pause: bool = True) -> None:
        with self._db(write=True) as db:
            db.execute("UPDATE jobs SET pause_requested = ? WHERE id = ?", (int(pause), job_id))

    def add_result_file(self, job_id: str, file_id: str) -> None:
        with self._db(write=True) as db:
            row = db.execute("SELECT result_files FROM jobs WHERE id = ?", (job_id,)).fetchone()
            found = json.loads(row[0] or "[]") if row else []
            if file_id not in found:
                db.execute("UPDATE jobs SET result_files = ? WHERE id = ?", (json.dumps(found + [file_id]), job_id))

    # events and checkpoints
    def add_event(self, job_id: str, message: str, level: str = "info", kind: str = "message",
                  data: dict[str, Any] | None = None, key: str | None = None) -> None:
        """Record an event; one with a `key` already recorded for this job is not added again."""
        with self._db(write=True) as db:
            db.execute("INSERT OR IGNORE INTO events (id, job_id, created_at, level, message, type, data, key) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (new_id("ftevent"), job_id, int(time.time()), level, message, kind,
                        json.dumps(data) if data is not None else None, key))

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, as the hosted API lists them."""
        with self._db() as db:
            below = db.execute("SELECT seq FROM events WHERE id = ?", (after,)).fetchone() if after else None
            rows = db.execute("SELECT * FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                              (job_id, below[0] if below else 1 << 62, limit + 1)).fetchall()
        out = [{**dict(r), "data": json.loads(r["data"]) if r["data"] else None} for r in rows[:limit]]
        return out, len(rows) > limit

    def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, Any]) -> None:
        with self._db(write=True) as db:
            db.execute("INSERT OR IGNORE INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                       (new_id("ftckpt"), job_id, step, int(time.time()), json.dumps(metrics)))

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY step DESC", (job_id,)).fetchall()
        return [{**dict(r), "metrics": json.loads(r["metrics"])} for r in rows]


def lock_home(root: Path) -> IO[str]:
    """Hold `root/server.lock` for this process's life (close the returned file to let go).

    Two servers on one home would each launch the same queued job. The lock is an flock on
    an open file: the kernel drops it when the process ends, however it ends.

    Raises:
        FinesmithError: another process holds it (its pid, when it wrote one, is named).
    """
    root = Path(root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle = open(os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600), "r+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = handle.read().strip()
        handle.close()
        who = f"another finesmith server (pid {pid})" if pid.isdigit() else "another finesmith server"
        raise FinesmithError(f"{who} already serves the fine-tuning jobs of {root}; two would train the same jobs "
                             "twice: stop it, or set FINESMITH_HOME to another folder, or serve the models only "
                             "with --no-jobs") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _job(row: sqlite3.Row) -> dict[str, Any]:
    job = dict(row)
    job["method"] = json.loads(job["method"])
    job["hyperparameters"] = json.loads(job["hyperparameters"] or "{}")
    job["metadata"] = json.loads(job["metadata"]) if job.get("metadata") else None
    job["result_files"] = json.loads(job.get("result_files") or "[]")
    if job["error"]:
        job["error"] = json.loads(job["error"])
    return job
