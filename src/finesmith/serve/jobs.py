"""The hosted fine-tuning API, served locally: files and fine-tuning jobs.

`/v1/files` (upload with `purpose: fine-tune`, list, retrieve, delete, content) and
`/v1/fine_tuning/jobs` (create, list, retrieve, cancel, events, checkpoints) in the hosted
API's shapes, so code written for the hosted service runs against this server unchanged.

State is in SQLite (`finesmith.serve.store`). One scheduler thread in the server process
moves jobs along `validating_files → queued → running → succeeded | failed | cancelled`
and runs each job in its own worker process (`finesmith.serve.worker`), one at a time:
the HTTP process never trains. The scheduler turns the run's `metrics.jsonl` and
checkpoints into events and checkpoint objects as they appear. Cancelling a running job
sends its worker SIGTERM: the loop finishes the step and saves a checkpoint. When the
server dies, even by SIGKILL, the worker gets SIGTERM too (Linux's parent-death signal),
so it saves a checkpoint; the restarted server finds the job still `running` and resumes
it from that checkpoint (from the start when there is none).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from finesmith.serve.registry import ModelRegistry
from finesmith.serve.store import (CANCELLED, FAILED, FINAL, PAUSED, QUEUED, RUNNING, SUCCEEDED, VALIDATING,
                                   Store, new_id)

PURPOSE = "fine-tune"
RESULTS_PURPOSE = "fine-tune-results"
METHODS = ("supervised", "dpo", "reinforcement")
HYPERPARAMETERS = {"supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
                   "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta"),
                   "reinforcement": ("n_epochs", "batch_size", "learning_rate_multiplier", "compute_multiplier",
                                     "eval_interval", "eval_samples", "reasoning_effort")}
KIND_FOR_METHOD = {"supervised": ("chat", "text"), "dpo": ("preference",), "reinforcement": ("prompt", "chat")}
SECTION_KEYS = ("hyperparameters", "grader", "finesmith")  # what `method.<type>` may hold
EXTENSION_METHODS = ("lora", "full", "auto")  # `method.<type>.finesmith.method`
# → the chat template's thinking switch (finesmith's `thinking`): a switch, not a budget, so low, medium and
# high all turn thinking on; `minimal` (an extension) turns it off; `default` keeps the template's default
REASONING_EFFORTS = {"default": "auto", "minimal": "off", "low": "on", "medium": "on", "high": "on"}
STOP_WAIT_S = 60  # how long a worker may take to save its checkpoint and exit
# The hosted API's ranges; beyond them a job would run for ever or train on nonsense.
BOUNDS = {"n_epochs": (1, 50), "batch_size": (1, 256), "learning_rate_multiplier": (0, 10), "beta": (0, 10),
          "compute_multiplier": (0, 10), "eval_interval": (1, 100_000), "eval_samples": (1, 1)}
WHOLE = ("n_epochs", "batch_size", "eval_interval", "eval_samples")
MAX_METADATA = 16  # the hosted API's limits: 16 pairs, keys up to 64 characters, values up to 512
MAX_SEED = 2**31 - 1
MULTIPART_SLACK = 64 * 1024  # an upload's request may exceed its file by this much (boundaries, fields)


def api_error(status: int, message: str, param: str | None = None, code: str | None = None) -> Exception:
    from finesmith.serve.http import APIError

    return APIError(status, message, param=param, code=code)


class JobService:
    """The scheduler: one worker process at a time, state in `store`, fine-tuned models into `registry`."""

    def __init__(self, store: Store, registry: ModelRegistry, log: Any = print, poll_s: float = 0.5,
                 max_upload_bytes: int = 512 * 1024 * 1024) -> None:
        self.store, self.registry, self.log, self.poll_s = store, registry, log, poll_s
        self.max_upload_bytes = max_upload_bytes
        self.worker: subprocess.Popen | None = None
        self.current: str | None = None
        self.signalled = False
        self.offsets: dict[str, int] = {}
        self.step_metrics: dict[str, dict[int, dict[str, Any]]] = {}  # per job: step -> losses seen
        self.recorded_checkpoints: dict[str, set[int]] = {}  # per job: checkpoint steps already in the store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="finesmith-jobs", daemon=True)

    # lifecycle
    def start(self) -> None:
        for partial in self.store.files_dir.glob(".upload-*"):  # uploads cut off by the previous server's end
            partial.unlink(missing_ok=True)
        for job in self.store.jobs_in(SUCCEEDED):
            self.registry.add(str(Path(job["output"]) / "run"), job["fine_tuned_model"], owner="user")
        for job in self.store.jobs_in(RUNNING, SUCCEEDED, FAILED, CANCELLED):  # checkpoints are models too
            self.registry.add_checkpoints(Path(job["output"]) / "run", fine_tuned_name(job))
        for job in self.store.jobs_in(RUNNING):  # its worker went with the previous server
            self._wait_for_pid(job.get("worker_pid"))
            step = _resumable_step(job)
            self.store.add_event(job["id"], "The server restarted while this job ran; it resumes from its checkpoint "
                                 f"at step {step}" if step else "The server restarted while this job ran, before any "
                                 "checkpoint; it starts again from the beginning", key=f"restart-{job['attempts']}")
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling; a running worker saves a checkpoint and exits (its job resumes next start)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self.worker and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.worker.kill()

    def _wait_for_pid(self, pid: int | None) -> None:
        deadline = time.monotonic() + STOP_WAIT_S
        while pid and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.2)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the scheduler must outlive one bad job
                self.log(f"jobs: {type(exc).__name__}: {exc}")
            self._stop.wait(self.poll_s)

    # one round
    def tick(self) -> None:
        if self.worker is not None:
            job = self.store.job(self.current)
            self.follow(job)
            if (job["cancel_requested"] or job["pause_requested"]) and not self.signalled:
                self.worker.send_signal(signal.SIGTERM)  # the loop saves a checkpoint and exits 75
                self.signalled = True
            code = self.worker.poll()
            if code is None:
                return
            self.follow(job, final=True)
            self.worker = None
            self._finished(self.store.job(job["id"]), code)
            return
        for job in self.store.jobs_in(VALIDATING):
            self._validate(job)
        waiting = self.store.jobs_in(RUNNING) + self.store.jobs_in(QUEUED)
        if waiting and not self._stop.is_set():
            self._launch(waiting[0])

    def _validate(self, job: dict[str, Any]) -> None:
        kind = job["method"]["type"]
        self.store.add_event(job["id"], f"Validating training file: {job['training_file']}"
                             + (f" and validation file: {job['validation_file']}" if job["validation_file"] else ""),
                             key="validating")
        for param in ("training_file", "validation_file"):
            if not job[param]:
                continue
            found = self.store.file(job[param])
            if found is None:
                return self._fail(job, f"{param} {job[param]} no longer exists (it was deleted)", "invalid_file", param)
            if found["kind"] not in KIND_FOR_METHOD[kind]:
                return self._fail(job, f"{param} {job[param]} holds {found['kind']} examples; a {kind} job needs "
                                  f"{' or '.join(KIND_FOR_METHOD[kind])} examples", "invalid_file", param)
        self.store.update_job(job["id"], status=QUEUED)
        self.store.add_event(job["id"], "Files validated, moving job to queued state", key="queued")

    def _launch(self, job: dict[str, Any]) -> None:
        job = self.store.job(job["id"])
        if job["status"] not in (QUEUED, RUNNING):  # paused or cancelled since the queue was read
            return None
        if job["model"] not in self.registry:
            return self._fail(job, f"the model '{job['model']}' is not served by this server any more; restart it "
                              f"with `finesmith serve {job['model']}`", "model_not_found", "model")
        resume = _resumable_step(job) is not None
        output = Path(job["output"])
        env = {**os.environ, "FINESMITH_HOME": str(self.store.root)}
        try:
            output.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(os.open(output / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
                from finesmith.serve.worker import die_with_parent

                self.worker = subprocess.Popen(
                    [sys.executable, "-m", "finesmith.serve.worker", job["id"], self.registry.spec(job["model"]),
                     *(["--resume"] if resume else [])], stdout=log, stderr=subprocess.STDOUT, env=env,
                    preexec_fn=die_with_parent, start_new_session=True)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:  # the queue must move on without it
            self.worker = None
            return self._fail(job, f"the training process could not be started ({type(exc).__name__}: {exc})",
                              "worker_start_failed", None)
        self.current, self.signalled = job["id"], False
        self.offsets.pop(job["id"], None)
        self.store.update_job(job["id"], worker_pid=self.worker.pid)

    def _finished(self, job: dict[str, Any], code: int) -> None:
        run = Path(job["output"]) / "run"
        self.current = None
        if code == 0:
            name = fine_tuned_name(job)
            self.registry.add(str(run), name, owner="user")
            record = _record(run)
            tokens = int((record.get("data", {}).get("train", {}).get("tokens") or 0)
                         * (record.get("config", {}).get("epochs") or 1))
            # the events first: a client that sees the final status finds every event with it
            self.store.add_event(job["id"], f"New fine-tuned model created: {name}", key="model")
            self.store.add_event(job["id"], "The job has successfully completed", key="succeeded")
            self._result_file(job)
            self._compare(job)
            self.store.update_job(job["id"], status=SUCCEEDED, fine_tuned_model=name, trained_tokens=tokens,
                                  hyperparameters=json.dumps(resolved_hyperparameters(job, record)))
        elif job["cancel_requested"]:  # stopped with a checkpoint (75), or while still checking its files
            step = _resumable_step(job)
            self.store.add_event(job["id"], "Fine-tuning job cancelled" + (f" (checkpoint at step {step} kept)"
                                                                          if step else ""), key="cancelled")
            self.store.update_job(job["id"], status=CANCELLED)
        elif job["pause_requested"] and code in (75, -signal.SIGTERM):  # paused (with a checkpoint once it has one)
            step = _resumable_step(job)
            self.store.update_job(job["id"], status=PAUSED)
            self.store.add_event(job["id"], "Fine-tuning job paused" + (f" with a checkpoint at step {step}"
                                                                       if step else ""),
                                 key=f"paused-{job['attempts']}")
        elif code == 75:  # stopped because this server is stopping: resumed when it starts again
            self.store.add_event(job["id"], "Paused with a checkpoint: the server is stopping",
                                 key=f"paused-{job['attempts']}")
        else:
            message = _last_error(Path(job["output"]) / "worker.log") or f"the training process exited with {code}"
            from finesmith.serve.worker import EXIT_GRADER

            code_param = {2: ("invalid_training_file", "training_file"),
                          EXIT_GRADER: ("grader_failed", "method.reinforcement.grader")}
            self._fail(job, message, *code_param.get(code, ("training_failed", None)))
            self._result_file(self.store.job(job["id"]))

    def _fail(self, job: dict[str, Any], message: str, code: str, param: str | None) -> None:
        message = self.public(message)
        self.store.add_event(job["id"], f"Fine-tuning job failed: {message}", level="error", key="failed")
        self.store.update_job(job["id"], status=FAILED, error={"code": code, "message": message, "param": param})

    def public(self, message: str) -> str:
        return public_message(message, self.store)

    def follow(self, job: dict[str, Any], final: bool = False) -> None:
        """New metric lines and checkpoints of the job's run, as events and checkpoint objects.

        A checkpoint is recorded once its step's losses have been read (they can reach the
        metrics file after the checkpoint folder), or when the worker has ended (`final`).

        Only what is new since the last call is read and written: the metrics file from the
        offset reached, checkpoints not recorded yet (both start again after a restart, and the
        keyed events and checkpoint rows make that harmless)."""
        run = Path(job["output"]) / "run"
        metrics = run / "metrics.jsonl"
        if not metrics.is_file():
            return
        offset = self.offsets.get(job["id"], 0)
        if metrics.stat().st_size < offset:  # rewritten on resume: read again, events are keyed by step
            offset = 0
        with open(metrics, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offsets[job["id"]] = offset + end
        latest = self.step_metrics.setdefault(job["id"], {})
        if end:
            self._metric_events(job["id"], chunk[:end].decode("utf-8", "replace"), run, latest)
        from finesmith.train.checkpoint import list_checkpoints

        recorded = self.recorded_checkpoints.setdefault(job["id"], set())
        for step, _ in list_checkpoints(run):
            if step not in recorded and (final or step in latest):
                self.store.add_checkpoint(job["id"], step, {"step": step, **latest.get(step, {})})
                self.store.add_event(job["id"], f"Checkpoint created at step {step}", key=f"ckpt-{step}")
                recorded.add(step)
                self.registry.add_checkpoints(run, fine_tuned_name(job))  # served as ft:...:ckpt-step-N

    def _metric_events(self, job_id: str, lines: str, run: Path, latest: dict[int, dict[str, Any]]) -> None:
        total = (_record(run).get("schedule") or {}).get("total_steps")
        for line in lines.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = entry.get("step")
            if "loss" in entry:
                data = {"step": step, "train_loss": entry["loss"], "total_steps": total, "learning_rate": entry.get("lr")}
                message = f"Step {step}/{total}: training loss={entry['loss']:.4f}"
                if "reward" in entry:  # reinforcement: the step's mean reward (and each reward's)
                    data.update({k: v for k, v in entry.items() if k.startswith("reward")})
                    data["train_reward_mean"] = entry["reward"]
                    message += f", reward={entry['reward']:.4f}"
                    latest.setdefault(step, {})["train_reward_mean"] = entry["reward"]
                self.store.add_event(job_id, message, kind="metrics", data=data, key=f"step-{step}")
                latest.setdefault(step, {})["train_loss"] = entry["loss"]
                self._estimate_finish(job_id, entry, total)
            if "eval_loss" in entry:
                data = {"step": step, "valid_loss": entry["eval_loss"], "total_steps": total}
                message = f"Step {step}/{total}: validation loss={entry['eval_loss']:.4f}"
                if "eval_reward" in entry:
                    data["valid_reward_mean"] = entry["eval_reward"]
                    message = f"Step {step}/{total}: validation reward={entry['eval_reward']:.4f}"
                    latest.setdefault(step, {})["valid_reward_mean"] = entry["eval_reward"]
                self.store.add_event(job_id, message, kind="metrics", data=data, key=f"eval-{step}")
                # finesmith evaluates the whole validation file each time: the valid and full_valid loss are one
                latest.setdefault(step, {}).update(valid_loss=entry["eval_loss"], full_valid_loss=entry["eval_loss"])

    def _estimate_finish(self, job_id: str, entry: dict[str, Any], total: int | None) -> None:
        """`estimated_finish`: now plus the steps left at this run's pace (its steps/s so far)."""
        step, elapsed = entry.get("step"), entry.get("elapsed_s")
        if total and step and elapsed:
            left = max(0, total - step) * elapsed / step
            self.store.update_job(job_id, estimated_finish=int(time.time() + left))

    def _result_file(self, job: dict[str, Any]) -> None:
        """The step-metrics CSV of the job's run as a `fine-tune-results` file in its `result_files`."""
        path = self.store.upload_path()
        try:
            text, rows = step_metrics_csv(Path(job["output"]) / "run" / "metrics.jsonl",
                                          job["method"]["type"] == "reinforcement")
            path.write_text(text, encoding="utf-8")
            row = self.store.add_file("step_metrics.csv", RESULTS_PURPOSE, path, rows, "results", suffix=".csv")
            self.store.add_result_file(job["id"], row["id"])
        except OSError as exc:
            self.log(f"jobs: the results of {job['id']} could not be written ({exc})")
        finally:
            path.unlink(missing_ok=True)

    def _compare(self, job: dict[str, Any]) -> None:
        """The worker's compare report (`jobs/JOB/compare`), when it made one, as a result file."""
        folder = Path(job["output"]) / "compare"
        report = folder / "report.html"
        if not report.is_file():
            return
        verdict = (folder / "verdict.txt").read_text(encoding="utf-8") if (folder / "verdict.txt").is_file() else ""
        path = self.store.upload_path()
        path.write_bytes(report.read_bytes())
        try:
            row = self.store.add_file("compare_report.html", RESULTS_PURPOSE, path, 1, "report", suffix=".html")
        finally:
            path.unlink(missing_ok=True)
        self.store.add_result_file(job["id"], row["id"])
        self.store.add_event(job["id"], f"Compare report ({row['id']}): {self.public(verdict)}", key="compare-done",
                             data={"file": row["id"], "verdict": self.public(verdict)})


def public_message(message: str, store: Store) -> str:
    """`message` as clients may see it: an uploaded file's path becomes its id, other paths of
    this machine go (relative to the home, or their last part)."""
    import re

    from finesmith.serve.http import strip_paths

    message = re.sub(re.escape(str(store.files_dir)) + r"/(file-[0-9a-f]+)\.jsonl", r"\1", message)
    return strip_paths(message, store.root)


RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


def step_metrics_csv(metrics: Path, reinforcement: bool = False) -> tuple[str, int]:
    """(CSV text, rows) of a run's metrics per step, in the hosted results file's columns.

    The accuracies stay empty: finesmith's loop does not measure token accuracy during
    training (an empty cell, never an invented number). Reinforcement jobs add the mean
    training and held-out rewards (`train_reward_mean`, `valid_reward_mean`).
    """
    import csv
    import io

    columns = RESULT_COLUMNS + (("train_reward_mean", "valid_reward_mean") if reinforcement else ())
    steps: dict[int, dict[str, Any]] = {}
    try:
        lines = metrics.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = entry.get("step")
        if not isinstance(step, int):
            continue
        row = steps.setdefault(step, {"step": step})
        for source, target in (("loss", "train_loss"), ("eval_loss", "valid_loss"), ("reward", "train_reward_mean"),
                               ("eval_reward", "valid_reward_mean")):
            if source in entry and target in columns:
                row[target] = entry[source]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for step in sorted(steps):
        writer.writerow(steps[step])
    return out.getvalue(), len(steps)


def fine_tuned_name(job: dict[str, Any]) -> str:
    """`ft:BASE:SUFFIX:ID`, the hosted API's naming (the suffix defaults to `finesmith`). A job on
    a fine-tuned model names the original base, as the hosted API does (`ft:BASE:...`, not `ft:ft:...`)."""
    base = job["model"].split(":")[1] if job["model"].startswith("ft:") else job["model"]
    return f"ft:{base}:{job['suffix'] or 'finesmith'}:{job['id'].split('-')[-1][:8]}"


def resolved_hyperparameters(job: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The job's hyperparameters with `auto` replaced by what training used."""
    from finesmith.config import DEFAULT_LR

    config = record.get("config", {})
    out = {"n_epochs": config.get("epochs"), "batch_size": config.get("batch_size"),
           "learning_rate_multiplier": round((record.get("schedule", {}).get("lr") or DEFAULT_LR["lora"])
                                             / DEFAULT_LR["lora"], 6)}
    if job["method"]["type"] == "dpo":
        out["beta"] = (config.get("preference") or {}).get("beta")
    if job["method"]["type"] == "reinforcement":  # what the others map to, as the job asked for them
        from finesmith.serve.worker import DEFAULT_GROUP_SIZE

        group = (config.get("grpo") or {}).get("group_size")
        asked = job["hyperparameters"]
        out["compute_multiplier"] = asked.get("compute_multiplier", "auto") if group is None else \
            asked.get("compute_multiplier") if asked.get("compute_multiplier", "auto") != "auto" else \
            group / DEFAULT_GROUP_SIZE
        out["eval_interval"] = config.get("eval_every") or asked.get("eval_interval", "auto")
        out["eval_samples"] = 1
        out["reasoning_effort"] = asked.get("reasoning_effort", "default")
    return out


def _record(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _resumable_step(job: dict[str, Any]) -> int | None:
    from finesmith.train.checkpoint import list_checkpoints, resumable

    found = [step for step, path in list_checkpoints(Path(job["output"]) / "run") if resumable(path)]
    return found[-1] if found else None


def _last_error(log: Path) -> str | None:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    return errors[-1][:500] if errors else None


# ---- the HTTP side ----------------------------------------------------------------------------

def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "expires_at": None, "status_details": None}


def job_object(job: dict[str, Any]) -> dict[str, Any]:
    method = job["method"]
    kind = method["type"]
    params = {k: job["hyperparameters"].get(k, "auto") for k in HYPERPARAMETERS[kind]}
    if kind == "reinforcement" and params["reasoning_effort"] == "auto":
        params["reasoning_effort"] = "default"  # the hosted API's word for the model's own default
    section: dict[str, Any] = {"hyperparameters": params}
    if kind == "reinforcement":
        section["grader"] = method.get("grader")
    section["finesmith"] = method.get("finesmith") or {"method": "lora"}
    legacy = {k: v for k, v in params.items() if k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    return {"object": "fine_tuning.job", "id": job["id"], "model": job["model"], "created_at": job["created_at"],
            "finished_at": job["finished_at"], "fine_tuned_model": job["fine_tuned_model"],
            "organization_id": "org-local", "result_files": job.get("result_files") or [], "status": job["status"],
            "validation_file": job["validation_file"], "training_file": job["training_file"],
            "hyperparameters": legacy, "trained_tokens": job["trained_tokens"],
            "error": job["error"], "seed": job["seed"], "user_provided_suffix": job["suffix"],
            "estimated_finish": job.get("estimated_finish") if job["status"] == RUNNING else None,
            "integrations": [], "metadata": job.get("metadata"), "method": {"type": kind, kind: section}}


def validate_upload(path: Path, filename: str) -> tuple[int, str]:
    """(lines, kind) of an uploaded JSONL file on disk, with the row checks of `finesmith data check`;
    the first problem is a 400 naming `filename:line`."""
    from collections import Counter

    from finesmith.data.formats import FeedbackExample, PreferenceExample, TextExample
    from finesmith.train.grpo import parse_prompt_records

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise api_error(400, f"{filename}: not UTF-8 text; upload a JSONL file", "file", "invalid_file") from None
    kinds: Counter = Counter()
    lines = 0
    for _, example, problem in parse_prompt_records(str(path)):  # rows ending in a user turn are prompts
        if problem:
            raise api_error(400, problem.replace(str(path), filename), "file", "invalid_file")
        if example is not None:
            lines += 1
            kinds["preference" if isinstance(example, (PreferenceExample, FeedbackExample)) else
                  "text" if isinstance(example, TextExample) else
                  "prompt" if example.messages[-1].get("role") == "user" else "chat"] += 1
    if not lines:
        raise api_error(400, f"{filename}: no examples; each line must be one JSON example", "file", "invalid_file")
    if len(kinds) > 1:
        raise api_error(400, f"{filename}: mixes {' and '.join(kinds)} examples; one file holds one kind",
                        "file", "invalid_file")
    return lines, next(iter(kinds))


async def receive_upload(request: Request, limit: int) -> tuple[str, Any, Any]:
    """(purpose, file, form) of a multipart upload, the file spooled to disk as it arrives
    (starlette keeps at most 1 MB of it in memory); more than `limit` bytes of file is a 413
    as soon as they have arrived, whatever the request declared."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    from finesmith.serve.http import too_large

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise too_large("the file", limit, "file")
    received = 0

    async def capped() -> Any:
        nonlocal received
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + MULTIPART_SLACK:
                raise too_large("the file", limit, "file")
            yield chunk

    try:
        form = await MultiPartParser(request.headers, capped(), max_files=1, max_fields=8).parse()
    except MultiPartException as exc:
        raise api_error(400, f"send the file as multipart/form-data with fields `file` and `purpose` ({exc.message})",
                        "file") from None
    upload = form.get("file")
    if upload is not None and not isinstance(upload, str) and (upload.size or 0) > limit:
        await form.close()
        raise too_large("the file", limit, "file")
    return form.get("purpose"), upload, form


def add_routes(app: FastAPI, service: JobService) -> None:
    """Files and fine-tuning jobs endpoints on `app`.

    Every database and file-system call runs off the event loop (`def` routes run in
    FastAPI's thread pool; the async ones hand their work to a thread), so a slow disk or a
    held database lock delays only the requests that need them, never `/health` or inference.
    """
    import shutil

    from finesmith.serve.dashboard import REPORT_HEADERS
    from finesmith.serve.http import json_body

    store, registry = service.store, service.registry

    def find_file(file_id: str) -> dict[str, Any]:
        found = store.file(file_id)
        if found is None:
            raise api_error(404, f"No such File object: {file_id}", "id", "file_not_found")
        return found

    def find_job(job_id: str) -> dict[str, Any]:
        found = store.job(job_id)
        if found is None:
            raise api_error(404, f"No such fine-tuning job: {job_id}", "fine_tuning_job_id", "job_not_found")
        return found

    def keep_upload(upload: Any, filename: str) -> dict[str, Any]:
        path = store.upload_path()
        try:
            upload.file.seek(0)
            with open(path, "wb") as out:
                shutil.copyfileobj(upload.file, out, 1 << 20)
            lines, kind = validate_upload(path, filename)
            return file_object(store.add_file(filename, PURPOSE, path, lines, kind))
        finally:
            path.unlink(missing_ok=True)  # moved into place when kept

    @app.post("/v1/files")
    async def upload(request: Request) -> dict[str, Any]:
        purpose, upload, form = await receive_upload(request, service.max_upload_bytes)
        try:
            if purpose != PURPOSE:
                raise api_error(400, f"purpose must be '{PURPOSE}' (this server stores fine-tuning data only), "
                                     f"got {purpose!r}", "purpose")
            if upload is None or isinstance(upload, str):
                raise api_error(400, "the `file` field is missing", "file")
            return await asyncio.to_thread(keep_upload, upload, upload.filename or "upload.jsonl")
        finally:
            await form.close()

    @app.get("/v1/files")
    def list_files(purpose: str | None = None) -> dict[str, Any]:
        return {"object": "list", "data": [file_object(f) for f in store.files(purpose)], "has_more": False}

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str) -> dict[str, Any]:
        return file_object(find_file(file_id))

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str) -> dict[str, Any]:
        find_file(file_id)
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str) -> Response:
        from fastapi.responses import FileResponse

        found = find_file(file_id)
        media = "text/csv" if found["path"].endswith(".csv") else "text/html" if found["path"].endswith(
            ".html") else "application/jsonl"
        headers = REPORT_HEADERS if media == "text/html" else None
        return FileResponse(found["path"], media_type=media, headers=headers)

    def create(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise api_error(400, "the body must be a JSON object")
        job = parse_job(body, store, registry)
        row = store.add_job(job)
        store.add_event(row["id"], f"Created fine-tuning job: {row['id']}", key="created")
        return job_object(row)

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request) -> dict[str, Any]:
        return await asyncio.to_thread(create, await json_body(request))

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        # `metadata[key]=value` (the hosted API's filter; the official client sends it so)
        wanted = {k[len("metadata["):-1]: v for k, v in request.query_params.multi_items()
                  if k.startswith("metadata[") and k.endswith("]")}
        jobs, more = store.jobs(after, max(1, min(limit, 100)), wanted)
        return {"object": "list", "data": [job_object(j) for j in jobs], "has_more": more}

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        return job_object(find_job(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict[str, Any]:
        job = find_job(job_id)
        if job["status"] in FINAL:
            raise api_error(400, f"the job is already {job['status']}; only a job that has not finished can be cancelled",
                            "fine_tuning_job_id", "job_finished")
        store.request_cancel(job_id)
        if job["status"] in (VALIDATING, QUEUED, PAUSED) and service.current != job_id:
            store.update_job(job_id, status=CANCELLED)
            store.add_event(job_id, "Fine-tuning job cancelled", key="cancelled")
        return job_object(store.job(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(job_id: str) -> dict[str, Any]:
        job = find_job(job_id)
        if job["status"] not in (QUEUED, RUNNING):  # validating lasts a moment: its files are checked first
            raise api_error(400, f"the job is {job['status']}; only a job that is queued or running can be paused",
                            "fine_tuning_job_id", "job_not_pausable")
        store.request_pause(job_id)
        if job["status"] == QUEUED and service.current != job_id:
            store.update_job(job_id, status=PAUSED)
            store.add_event(job_id, "Fine-tuning job paused", key=f"paused-{job['attempts']}-queued")
        return job_object(store.job(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(job_id: str) -> dict[str, Any]:
        job = find_job(job_id)
        if job["status"] != PAUSED:
            raise api_error(400, f"the job is {job['status']}; only a paused job can be resumed",
                            "fine_tuning_job_id", "job_not_paused")
        store.request_pause(job_id, False)
        store.update_job(job_id, status=QUEUED)
        step = _resumable_step(job)
        store.add_event(job_id, "Fine-tuning job resumed" + (f"; it continues from its checkpoint at step {step}"
                                                             if step else ""), key=f"resumed-{job['attempts']}")
        return job_object(store.job(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(job_id: str, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        find_job(job_id)
        events, more = store.events(job_id, after, max(1, min(limit, 1000)))
        return {"object": "list", "has_more": more, "data": [
            {"object": "fine_tuning.job.event", "id": e["id"], "created_at": e["created_at"], "level": e["level"],
             "message": e["message"], "type": e["type"], "data": e["data"]} for e in events]}

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(job_id: str, after: str | None = None, limit: int = 10) -> dict[str, Any]:
        job = find_job(job_id)
        rows = store.checkpoints(job_id)
        if after:
            ids = [r["id"] for r in rows]
            rows = rows[ids.index(after) + 1:] if after in ids else rows
        page = rows[:max(1, min(limit, 100))]
        name = fine_tuned_name(job)
        return {"object": "list", "has_more": len(rows) > len(page), "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "data": [
                    {"object": "fine_tuning.job.checkpoint", "id": r["id"], "created_at": r["created_at"],
                     "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{r['step']}", "step_number": r["step"],
                     "metrics": r["metrics"], "fine_tuning_job_id": job_id} for r in page]}


def parse_job(body: dict[str, Any], store: Store, registry: ModelRegistry) -> dict[str, Any]:
    """A job row from a create request, or an API error naming the field."""
    model = body.get("model")
    if not isinstance(model, str) or model not in registry:
        raise api_error(404, f"the model '{model}' does not exist or cannot be fine-tuned here; this server serves "
                             f"{', '.join(registry.names())}", "model", "model_not_found")
    for param in ("training_file", "validation_file"):
        value = body.get(param)
        if param == "training_file" and not value:
            raise api_error(400, "training_file is required", param)
        if value and store.file(value) is None:
            raise api_error(400, f"invalid {param}: {value} (no such file; upload it to /v1/files first)", param,
                            "file_not_found")
    method = body.get("method") or {"type": "supervised"}
    kind = method.get("type") if isinstance(method, dict) else None
    if kind not in METHODS:
        raise api_error(400, f"method.type must be one of {', '.join(METHODS)}, got {kind!r}", "method.type")
    section = method.get(kind) if isinstance(method.get(kind), dict) else {}
    if method.get(kind) is not None and not isinstance(method.get(kind), dict):
        raise api_error(400, f"method.{kind} must be an object", f"method.{kind}")
    for key in section:
        if key not in SECTION_KEYS or (key == "grader" and kind != "reinforcement"):
            allowed = [k for k in SECTION_KEYS if k != "grader" or kind == "reinforcement"]
            raise api_error(400, f"method.{kind}.{key} is not supported here; method.{kind} takes "
                                 f"{', '.join(allowed)}", f"method.{kind}.{key}")
    params = {**(body.get("hyperparameters") or {}), **(method.get("hyperparameters") or {}),
              **(section.get("hyperparameters") or {})}
    for key, value in params.items():
        if key not in HYPERPARAMETERS[kind]:
            raise api_error(400, f"unknown hyperparameter '{key}' for a {kind} job; known: "
                                 f"{', '.join(HYPERPARAMETERS[kind])}", f"hyperparameters.{key}")
        if key == "reasoning_effort":
            params[key] = reasoning_effort(value, model, registry)
        elif value != "auto":
            params[key] = hyperparameter(key, value)
    stored: dict[str, Any] = {"type": kind}
    if kind == "reinforcement":
        stored["grader"] = job_grader(section.get("grader"), registry)
    if section.get("finesmith") is not None:
        stored["finesmith"] = extension(section["finesmith"], kind)
    metadata = check_metadata(body.get("metadata"))
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not 0 < len(suffix) <= 64 or ":" in suffix):
        raise api_error(400, "suffix must be 1 to 64 characters without ':'", "suffix")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED):
        raise api_error(400, f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}", "seed")
    job_id = new_id("ftjob")
    return {"id": job_id, "model": model, "training_file": body["training_file"],
            "validation_file": body.get("validation_file"), "suffix": suffix,
            "seed": seed if seed is not None else 42, "method": stored, "hyperparameters": params,
            "output": str(store.jobs_dir / job_id), "metadata": metadata}


def job_grader(grader: Any, registry: ModelRegistry) -> dict[str, Any]:
    """The reinforcement job's grader, validated, or a 400 naming the field.

    Model graders (score_model, label_model) are refused in jobs: their judge would have to be
    a model this server serves, asked by the training process while this server also serves it;
    grade with them through `/v1/fine_tuning/alpha/graders/run` instead.
    """
    from finesmith.graders.grading import uses_models, validate
    from finesmith.graders.result import GraderError

    param = "method.reinforcement.grader"
    if grader is None:
        raise api_error(400, f"{param} is required for a reinforcement job: the grader whose score is the reward",
                        param)
    try:
        checked = validate(grader, param=param)
    except GraderError as exc:
        raise api_error(400, str(exc), exc.param) from None
    if uses_models(checked):
        raise api_error(400, f"{param}: score_model and label_model graders are not supported in jobs on this "
                             "server (the judge would be a model it serves, asked during training); use "
                             "string_check, text_similarity, python or multi graders", param)
    return checked


# reinforcement jobs only: how answers are sampled, (lowest, highest, whole number)
SAMPLING_SETTINGS = {"temperature": (0.0, 2.0, False), "top_p": (0.0, 1.0, False), "max_new_tokens": (1, 4096, True)}


def extension(value: Any, kind: str) -> dict[str, Any]:
    """finesmith's own job settings, `method.<type>.finesmith`: `method` (lora | full | auto: the
    advisor chooses when the job starts), `max_steps` (stop after this many optimizer steps) and,
    for reinforcement jobs, how answers are sampled: `temperature`, `top_p`, `max_new_tokens`."""
    param = f"method.{kind}.finesmith"
    if not isinstance(value, dict):
        raise api_error(400, f"{param} must be an object, e.g. {{\"method\": \"lora\"}}", param)
    known = ("method", "max_steps", *(SAMPLING_SETTINGS if kind == "reinforcement" else ()))
    for key in value:
        if key not in known:
            raise api_error(400, f"{param}.{key} is not a finesmith setting of a {kind} job; known: "
                                 f"{', '.join(known)}", f"{param}.{key}")
    out = {"method": value.get("method", "lora")}
    if out["method"] not in EXTENSION_METHODS:
        raise api_error(400, f"{param}.method must be one of {', '.join(EXTENSION_METHODS)}, got {out['method']!r}",
                        f"{param}.method")
    steps = value.get("max_steps")
    if steps is not None:
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1_000_000:
            raise api_error(400, f"{param}.max_steps must be a whole number from 1, got {steps!r}",
                            f"{param}.max_steps")
        out["max_steps"] = steps
    for key, (low, high, whole) in SAMPLING_SETTINGS.items():
        if key not in value:
            continue
        number = value[key]
        ok = isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number)
        if not ok or not (low <= number <= high if whole else low < number <= high) or \
                (whole and not float(number).is_integer()):
            kind_text = "a whole number" if whole else "a number"
            raise api_error(400, f"{param}.{key} must be {kind_text} in {'[' if whole else '('}{low:g}, {high:g}], "
                                 f"got {number!r}", f"{param}.{key}")
        out[key] = int(number) if whole else float(number)
    return out


def reasoning_effort(value: Any, model: str, registry: ModelRegistry) -> str:
    """`reasoning_effort` (see REASONING_EFFORTS), or a 400: levels other than `default` need a
    model whose chat template has a thinking switch (`enable_thinking`)."""
    param = "hyperparameters.reasoning_effort"
    if value == "auto":
        value = "default"
    if value not in REASONING_EFFORTS:
        raise api_error(400, f"{param} must be one of {', '.join(REASONING_EFFORTS)}, got {value!r}", param)
    if value != "default":
        from finesmith.data.template import has_thinking_switch
        from finesmith.model.load import load_chat_tokenizer

        tokenizer, _ = load_chat_tokenizer(registry.spec(model), notify=lambda *_: None)
        if not has_thinking_switch(tokenizer):
            raise api_error(400, f"{param} '{value}' needs a model with a thinking switch (a chat template reading "
                                 f"enable_thinking, e.g. Qwen3); {model} has none, so leave it out or 'default'",
                            param)
    return value


def check_metadata(value: Any) -> dict[str, str] | None:
    """The job's metadata (up to 16 string pairs, as the hosted API), or a 400."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in value.items()):
        raise api_error(400, f"metadata must be an object of at most {MAX_METADATA} string values (keys up to 64 "
                             "characters, values up to 512)", "metadata")
    return dict(value)


def hyperparameter(key: str, value: Any) -> int | float:
    """A hyperparameter's value checked against `BOUNDS` (whole numbers for epochs, batch
    size and eval counts, finite and above the low end for the others), or a 400 naming it."""
    low, high = BOUNDS[key]
    whole = key in WHOLE
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if key == "eval_samples" and not (number and value == 1):
        raise api_error(400, "hyperparameters.eval_samples must be 'auto' or 1: finesmith measures the held-out "
                             "reward with one greedy answer per validation prompt (more samples of a greedy answer "
                             "would be the same answer)", "hyperparameters.eval_samples")
    if whole:
        ok = number and float(value).is_integer() and low <= value <= high
        need = f"an integer from {low} to {high}"
    else:
        ok = number and low < value <= high
        need = f"a number above {low} and at most {high}"
    if not ok:
        raise api_error(400, f"hyperparameters.{key} must be 'auto' or {need}, got {value!r}",
                        f"hyperparameters.{key}")
    return int(value) if whole else value
