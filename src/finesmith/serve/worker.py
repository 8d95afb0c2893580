"""One fine-tuning job in its own process: `python -m finesmith.serve.worker JOB_ID`.

The service starts it (never the HTTP process itself) with `FINESMITH_HOME` set. It turns
the job into an ordinary finesmith config (`jobs/JOB_ID/config.yaml`), checks the data with
the job's model tokenizer, marks the job running and trains through the same CLI a user
runs (`finesmith train`'s pipeline, in this process), so the job's folder `jobs/JOB_ID/run` is an ordinary run (record, metrics,
checkpoints). Exit status is the CLI's: 0 done, 75 stopped with a checkpoint (cancel,
shutdown), 2 a problem with the job's input, 1 anything else.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from finesmith.serve.store import RUNNING, Store

EXIT_PREEMPTED = 75  # as `finesmith train`: stopped with a checkpoint
DEFAULT_LR_MULTIPLIER = 1.0
DEFAULT_EPOCHS = 3


def job_config(job: dict[str, Any], store: Store, spec: str) -> dict[str, Any]:
    """The finesmith config of `job` (hosted hyperparameters mapped onto finesmith's keys).

    `n_epochs` → `epochs`, `batch_size` → `batch_size` (`auto` as finesmith resolves it),
    `learning_rate_multiplier` × the method's default learning rate → `lr`, `beta` →
    `preference.beta`; the method is LoRA on the served base model.
    """
    from finesmith.config import DEFAULT_LR

    params = job["hyperparameters"]
    training = store.file(job["training_file"])
    epochs = params.get("n_epochs", "auto")
    batch = params.get("batch_size", "auto")
    multiplier = params.get("learning_rate_multiplier", "auto")
    config: dict[str, Any] = {
        "model": spec, "data": training["path"], "output": str(Path(job["output"]) / "run"), "method": "lora",
        "epochs": DEFAULT_EPOCHS if epochs == "auto" else epochs, "batch_size": batch,
        "lr": DEFAULT_LR["lora"] * (DEFAULT_LR_MULTIPLIER if multiplier == "auto" else multiplier),
        "seed": job["seed"], "log_every": 1, "keep_checkpoints": 3,
        # a checkpoint about once per epoch (the hosted API keeps one per epoch), and one on any stop
        "save_every": max(1, -(-training["lines"] // (batch if isinstance(batch, int) else 8))),
    }
    if job["validation_file"]:
        config["eval_data"] = store.file(job["validation_file"])["path"]
    if job["method"]["type"] == "dpo":
        config["objective"] = "dpo"
        if params.get("beta", "auto") != "auto":
            config["preference"] = {"beta": params["beta"]}
    return config


def check_job_data(config: dict[str, Any]) -> str | None:
    """The first problem `finesmith data check` finds with the job's tokenizer, or None."""
    from finesmith.data.validate import check_data
    from finesmith.model.load import load_chat_tokenizer

    tokenizer, _ = load_chat_tokenizer(config["model"], notify=lambda *_: None)
    for path in filter(None, (config["data"], config.get("eval_data"))):
        report = check_data(path, tokenizer, 1024)
        if not report.ok:
            return report.errors[0] if report.errors[0].startswith(path) else f"{path}: {report.errors[0]}"
    return None


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the service process dies, even by SIGKILL: the training
    loop then saves a checkpoint and exits, and the restarted service resumes from it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # the job's run folder, checkpoints and logs are private, like the rest of the home
    job_id, spec, resume = (argv or sys.argv[1:])[0], (argv or sys.argv[1:])[1], "--resume" in (argv or sys.argv)
    store = Store()
    job = store.job(job_id)
    config = job_config(job, store, spec)
    path = Path(job["output"]) / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    if not resume:
        problem = check_job_data(config)
        if problem:
            print(f"error: {problem}", file=sys.stderr, flush=True)
            return 2
    store.update_job(job_id, status=RUNNING, attempts=job["attempts"] + 1)
    store.add_event(job_id, "Fine-tuning job resumed from its last checkpoint" if resume
                    else "Fine-tuning job started", key=f"started-{job['attempts'] + 1}")
    return train_job(path, resume)


def train_job(path: Path, resume: bool) -> int:
    """`finesmith train CONFIG [--resume | --overwrite]`, in this process, with the CLI's exit codes."""
    from finesmith.config import load_config
    from finesmith.errors import FinesmithError
    from finesmith.pipeline import train
    from finesmith.train.loop import Preempted

    try:
        train(load_config(str(path)).validate(), overwrite=not resume, resume=resume)
    except Preempted as stopped:
        print(f"{stopped}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except FinesmithError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
