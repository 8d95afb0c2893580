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
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from finesmith.serve.store import RUNNING, Store

EXIT_PREEMPTED = 75  # as `finesmith train`: stopped with a checkpoint
EXIT_GRADER = 3  # a reinforcement job's grader failed a grading (the job fails, naming the grader)
DEFAULT_LR_MULTIPLIER = 1.0
DEFAULT_EPOCHS = 3
GRADER_TIMEOUT_ENV = "FINESMITH_GRADER_TIMEOUT_S"  # python graders' wall-time limit in jobs (default: hosted 120 s)
DEFAULT_GROUP_SIZE = 4  # answers per prompt at compute_multiplier 1
RL_MAX_NEW_TOKENS = 256  # longest sampled answer in a reinforcement job
COMPARE_LIMIT = 200  # validation examples the compare report evaluates (each approach answers each one)
COMPARE_SHOTS = (3,)  # the few-shot base the fine-tune is compared with (and zero-shot)


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
    extension = job["method"].get("finesmith") or {}
    if extension.get("method") in ("lora", "full"):
        config["method"] = extension["method"]
    if extension.get("max_steps"):
        config["max_steps"] = extension["max_steps"]
    if multiplier != "auto" or config["method"] != "lora":
        config["lr"] = DEFAULT_LR[config["method"]] * (DEFAULT_LR_MULTIPLIER if multiplier == "auto" else multiplier)
    if job["method"]["type"] == "dpo":
        config["objective"] = "dpo"
        if params.get("beta", "auto") != "auto":
            config["preference"] = {"beta": params["beta"]}
    if job["method"]["type"] == "reinforcement":
        reinforcement_config(config, job)
    return config


def reinforcement_config(config: dict[str, Any], job: dict[str, Any]) -> None:
    """A reinforcement job as finesmith GRPO with its grader as the reward.

    `compute_multiplier` scales the answers sampled per prompt (the group: 4 at 1, at least 2),
    `eval_interval` → `eval_every` (steps between held-out reward measurements on the
    validation file; `eval_samples` is 1: one greedy answer per validation prompt),
    `reasoning_effort` → `thinking`, `batch_size` → prompts per step.
    """
    params = job["hyperparameters"]
    multiplier = params.get("compute_multiplier", "auto")
    group = DEFAULT_GROUP_SIZE if multiplier == "auto" else max(2, round(DEFAULT_GROUP_SIZE * multiplier))
    timeout = float(os.environ.get(GRADER_TIMEOUT_ENV) or 120)
    config.update({"objective": "grpo", "reward": [job["method"]["grader"]], "max_length": 1024,
                   "grpo": {"group_size": group, "max_new_tokens": RL_MAX_NEW_TOKENS, "reward_timeout": timeout,
                            "grader_errors": "fail"}})
    if os.environ.get("FINESMITH_RL_MAX_NEW_TOKENS"):  # tests: short answers on a tiny model
        config["grpo"]["max_new_tokens"] = int(os.environ["FINESMITH_RL_MAX_NEW_TOKENS"])
    extension = job["method"].get("finesmith") or {}
    for key in ("temperature", "top_p", "max_new_tokens"):  # finesmith's own sampling settings
        if key in extension:
            config["grpo"][key] = extension[key]
    if params.get("eval_interval", "auto") != "auto" and config.get("eval_data"):
        config["eval_every"] = params["eval_interval"]
    effort = params.get("reasoning_effort", "auto")
    if effort not in ("auto", "default"):
        from finesmith.serve.jobs import REASONING_EFFORTS

        config["thinking"] = REASONING_EFFORTS[effort]


def choose_method(job: dict[str, Any], config: dict[str, Any], store: Store) -> None:
    """`method.<type>.finesmith.method: auto`: ask the advisor (this machine, the model, the data)
    and train with its choice, LoRA or full (other approaches it may name train as LoRA: a job
    must train); the choice and the advisor's rule are recorded in the job and its events."""
    from finesmith.config import DEFAULT_LR

    extension = dict(job["method"].get("finesmith") or {})
    if extension.get("method") != "auto":
        return
    try:
        from finesmith.advise.datastats import measure_dataset
        from finesmith.advise.hardware import detect_hardware
        from finesmith.advise.model_shape import read_model_shape
        from finesmith.advise.rules import Plan, recommend
        from finesmith.model.load import load_tokenizer

        stats = measure_dataset(load_tokenizer(config["model"]), config["data"], config.get("max_length", 1024))
        rec = recommend(Plan(detect_hardware(), read_model_shape(config["model"]), stats))
        chosen = rec.method if rec.method in ("lora", "full") else "lora"
        why = f"the advisor recommends {rec.approach} ({rec.rule})"
    except Exception as exc:  # noqa: BLE001 - e.g. prompt files it cannot size: LoRA, said so
        from finesmith.serve.jobs import public_message

        text = public_message(" ".join(str(exc).split())[:300], store)
        chosen, why = "lora", f"the advisor could not size this job ({type(exc).__name__}: {text}); LoRA is the default"
    config["method"] = chosen
    multiplier = job["hyperparameters"].get("learning_rate_multiplier", "auto")
    config["lr"] = DEFAULT_LR[chosen] * (DEFAULT_LR_MULTIPLIER if multiplier == "auto" else multiplier)
    extension.update({"chosen": chosen, "reason": why})
    store.update_job(job["id"], method=json.dumps({**job["method"], "finesmith": extension}))
    store.add_event(job["id"], f"Method auto: training with {chosen}; {why}", key="method-auto")


def check_job_data(config: dict[str, Any]) -> str | None:
    """The first problem `finesmith data check` finds with the job's tokenizer, or None
    (reinforcement jobs: their files read as prompts, as training reads them)."""
    from finesmith.data.validate import check_data
    from finesmith.errors import FinesmithError
    from finesmith.model.load import load_chat_tokenizer

    tokenizer, _ = load_chat_tokenizer(config["model"], notify=lambda *_: None)
    if config.get("objective") == "grpo":
        from finesmith.train.grpo import load_prompts

        try:
            for path in filter(None, (config["data"], config.get("eval_data"))):
                load_prompts(tokenizer, path, max_prompt_tokens=config.get("max_length", 1024))
        except FinesmithError as exc:
            return str(exc)
        return None
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
    if resume and path.is_file():  # the config it started with (the advisor's choice included)
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    else:
        choose_method(job, config, store)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    if not resume:
        problem = check_job_data(config)
        if problem:
            print(f"error: {problem}", file=sys.stderr, flush=True)
            return 2
    store.update_job(job_id, status=RUNNING, attempts=job["attempts"] + 1)
    store.add_event(job_id, "Fine-tuning job resumed from its last checkpoint" if resume
                    else "Fine-tuning job started", key=f"started-{job['attempts'] + 1}")
    if resume and _run_state(Path(job["output"]) / "run") == "finished":
        code = 0  # stopped after its last step (a pause or shutdown that came as it ended): nothing left to train
    else:
        code = train_job(path, resume)
    if code == 0 and job["validation_file"] and job["method"]["type"] != "reinforcement":
        compare_job(job, store, config)
    return code


def _run_state(run: Path) -> str | None:
    try:
        return json.loads((run / "run.json").read_text(encoding="utf-8")).get("state")
    except (OSError, ValueError):
        return None


def compare_job(job: dict[str, Any], store: Store, config: dict[str, Any]) -> None:
    """finesmith's verdict on the job: `finesmith compare` of the base model (zero-shot and
    few-shot from the training file) and the fine-tune on the validation file (its first
    `COMPARE_LIMIT` examples), into `jobs/JOB/compare/` (`report.html`, `verdict.txt`), which
    the service keeps as a result file. A comparison that fails is an event; the job stays done."""
    from finesmith.evaluate.compare import compare
    from finesmith.evaluate.report import paired_rows
    from finesmith.evaluate.tasks import EvalOptions

    output = Path(job["output"])
    store.add_event(job["id"], "Comparing the fine-tune with its base model on the validation file", key="compare")
    try:
        os.chdir(output)  # the report names the run `run`, not this machine's path to it
        entries = compare(config["eval_data"], config["model"], ["run"], output / "compare",
                          shots_from=config["data"], options=EvalOptions(max_new_tokens=16, batch_size=8),
                          limit=COMPARE_LIMIT, shots=COMPARE_SHOTS)
        headlines, _, _ = paired_rows(entries, ["fine-tuned · run"])
        verdict = " ".join(headlines) or "no verdict: the task has no per-example correctness to compare"
        (output / "compare" / "verdict.txt").write_text(verdict, encoding="utf-8")
    except Exception as exc:  # noqa: BLE001 - the job trained; the report is extra
        from finesmith.serve.jobs import public_message

        text = public_message(" ".join(str(exc).split())[:300], store)
        store.add_event(job["id"], f"The comparison could not be made: {type(exc).__name__}: {text}", level="warn",
                        key="compare-failed")


def train_job(path: Path, resume: bool) -> int:
    """`finesmith train CONFIG [--resume | --overwrite]`, in this process, with the CLI's exit codes
    (and `EXIT_GRADER` when a reinforcement job's grader failed a grading)."""
    from finesmith.config import load_config
    from finesmith.errors import FinesmithError
    from finesmith.pipeline import train
    from finesmith.train.loop import Preempted
    from finesmith.train.rewards import GradingFailed

    try:
        train(load_config(str(path)).validate(), overwrite=not resume, resume=resume)
    except Preempted as stopped:
        print(f"{stopped}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except GradingFailed as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_GRADER
    except FinesmithError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
