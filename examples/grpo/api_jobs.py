"""The GRPO demo as jobs through the OpenAI-compatible API, with hosted-style graders.

`run_all.sh` trains SFT then GRPO with `finesmith train examples/grpo/sft_grpo.yaml`. This
script does the same with the official `openai` client against `finesmith serve`, as a user
of the hosted fine-tuning service would:

1. uploads the demo's 60 SFT rows and its 240 GRPO prompts (converted to the hosted
   reinforcement shape: `messages` ending in the user turn, `answer` a field graders read as
   `item.answer`) and the 80 held-out prompts (the validation file: held-out reward at step 0
   and at the end);
2. a `supervised` job on the base model: 1 epoch, batch 8, lr 1e-4 (as the CLI's SFT stage:
   `learning_rate_multiplier` = 1e-4 / finesmith's default LoRA lr), LoRA;
3. a `reinforcement` job on the SFT model with a `multi` grader: a
   `python` grader equal to `rewards.py:correct` and a `python` grader for the bare format
   (the CLI's `regex:Order: \\d+`; `string_check` has no regex operation), combined as
   `correct + 0.25 * format` (the CLI's weights 1 and 0.25); batch 4 prompts ×
   `compute_multiplier` 1 (4 answers per prompt), 30 steps, and the CLI demo's sampling
   (temperature 0.7, top-p 0.9, at most 16 new tokens), both through finesmith's own job
   settings (`method.reinforcement.finesmith`). The job's `model` is the supervised job's
   `ft:` model: it trains on top of the SFT run (`--rl-on merged` instead merges the SFT run
   with `finesmith export --format hf`, restarts the server serving that folder too, and
   fine-tunes it, as the CLI's staged config does between stages);
4. prints each job's events as they come (the reward per step);
5. measures the base, the SFT `ft:` model and the final `ft:` model on the 80 held-out
   prompts through `/v1/chat/completions` (greedy: temperature 0, 32 tokens, as
   `examples/preference/measure.py`) and scores them with `measure.py`'s own functions;
6. writes `examples/grpo/api_results.json`.

    python examples/grpo/api_jobs.py                    # starts `finesmith serve` itself (home: runs/grpo_api/home)
    python examples/grpo/api_jobs.py --base-url http://127.0.0.1:8000/v1 --api-key KEY   # a running server

The hosted API has no sampling settings for reinforcement jobs (they sample at 1.0 and 1.0,
where this small model's answers rarely score: see the README), so the script sets the CLI
demo's through `method.reinforcement.finesmith`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BASE = "smollm2-135m-instruct"
CLI_SFT_LR = 1e-4  # sft_grpo.yaml's lr, both stages

spec = importlib.util.spec_from_file_location("preference_measure", HERE.parent / "preference" / "measure.py")
measure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(measure)

CORRECT = '''import re

def grade(sample, item):
    """rewards.py:correct: 1.0 when the whole answer is one line `Order: <number>` with the message's number."""
    found = re.fullmatch(r"Order: (\\d+)", sample["output_text"].strip())
    return float(found is not None and found.group(1) == str(item["answer"]))
'''
FORMAT = '''import re

def grade(sample, item):
    """The CLI's `regex:Order: \\\\d+`: the whole stripped answer matches."""
    return float(re.fullmatch(r"Order: \\d+", sample["output_text"].strip()) is not None)
'''
GRADER = {"type": "multi", "name": "order", "calculate_output": "correct + 0.25 * format",
          "graders": {"correct": {"type": "python", "name": "correct", "source": CORRECT},
                      "format": {"type": "python", "name": "format", "source": FORMAT}}}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hosted_prompts(rows: list[dict]) -> list[dict]:
    """Chat rows ending in the reference answer → the hosted reinforcement shape (the answer dropped)."""
    out = []
    for row in rows:
        messages = row["messages"]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        out.append({"messages": messages, "answer": row["answer"]})
    return out


def data_files(work: Path) -> dict[str, Path]:
    """The demo's files (make_data.py writes them when they are missing) and their hosted-shape versions."""
    data = HERE / "data"
    if not all((data / f"{n}.jsonl").is_file() for n in ("sft", "prompts", "heldout")):
        subprocess.run([sys.executable, str(HERE / "make_data.py")], check=True)
    work.mkdir(parents=True, exist_ok=True)
    return {"sft": data / "sft.jsonl",
            "prompts": write_jsonl(work / "rl_prompts.jsonl", hosted_prompts(read_jsonl(data / "prompts.jsonl"))),
            "heldout": write_jsonl(work / "rl_heldout.jsonl", hosted_prompts(read_jsonl(data / "heldout.jsonl")))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, models: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "FINESMITH_HOME": str(home)}
    finesmith = Path(sys.executable).parent / "finesmith"
    server = subprocess.Popen([str(finesmith), "serve", *models, "--port", str(port)], env=env,
                              stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"finesmith serve exited with {server.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return server, url + "/v1"
        except OSError:
            time.sleep(1)
    server.terminate()
    raise SystemExit(f"finesmith serve did not answer /health in 300 s; see {log}")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(90)
    except subprocess.TimeoutExpired:
        server.kill()


def wait(client: OpenAI, job_id: str, timeout: float) -> object:
    """Poll the job until it ends, printing its events oldest first as they arrive."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        events = client.fine_tuning.jobs.list_events(job_id, limit=1000).data
        for event in reversed(events):
            if event.id not in seen:
                seen.add(event.id)
                print(f"  [{job_id[-8:]}] {event.message}", flush=True)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise SystemExit(f"{job_id} did not finish in {timeout:.0f} s")
        time.sleep(2)


def metric_events(client: OpenAI, job_id: str) -> list[dict]:
    events = client.fine_tuning.jobs.list_events(job_id, limit=1000).data
    return [e.data for e in reversed(events) if e.type == "metrics" and e.data]


def answers(client: OpenAI, model: str, heldout: list[dict], workers: int, max_tokens: int) -> list[str]:
    def one(row: dict) -> str:
        reply = client.chat.completions.create(model=model, messages=row["messages"], temperature=0,
                                               max_tokens=max_tokens)
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, heldout))


def measure_model(client: OpenAI, model: str, label: str, heldout: list[dict], workers: int) -> dict:
    started = time.perf_counter()
    outputs = answers(client, model, heldout, workers, max_tokens=32)
    report = {"label": label, "model": model, **measure.score(outputs, heldout),
              "generate_seconds": round(time.perf_counter() - started, 1), "max_new_tokens": 32}
    print(f"{label}: property {report['property_rate']:.1%}, correct {report['correct_rate']:.1%}, number anywhere "
          f"{report['mentions_rate']:.1%} on {report['n']} held-out prompts ({report['generate_seconds']:.0f}s)",
          flush=True)
    return report


def run_seconds(home: Path | None, job_id: str) -> float | None:
    """The training loop's seconds from the job's run record (what the CLI table shows), when the home is here."""
    record = home / "jobs" / job_id / "run" / "run.json" if home else None
    try:
        return round(json.loads(record.read_text(encoding="utf-8"))["result"]["seconds"], 1)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> None:
    from finesmith.config import DEFAULT_LR

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running server's /v1 URL (default: start `finesmith serve` here)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or "none")
    parser.add_argument("--home", type=Path, default=ROOT / "runs" / "grpo_api" / "home",
                        help="FINESMITH_HOME of the server this script starts (must not be another server's)")
    parser.add_argument("--model", default=BASE)
    parser.add_argument("--max-steps", type=int, default=30, help="GRPO steps (the CLI demo: 30)")
    parser.add_argument("--heldout-limit", type=int, help="measure on the first N held-out prompts only (smoke)")
    parser.add_argument("--rl-max-new-tokens", type=int, default=16,
                        help="longest sampled answer of the reinforcement job (the CLI demo's 16)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent chat requests while measuring")
    parser.add_argument("--output", type=Path, default=HERE / "api_results.json")
    parser.add_argument("--rl-on", choices=("ft", "merged"), default="ft",
                        help="the reinforcement job's model: the SFT job's ft: model (default), or the SFT run "
                             "merged by `finesmith export` and served (what the CLI's staged config does)")
    parser.add_argument("--label", default="", help="a note stored in the results (e.g. 'smoke')")
    args = parser.parse_args(argv)

    started_at = dt.datetime.now(dt.timezone.utc)
    work = ROOT / "runs" / "grpo_api"
    files = data_files(work)
    heldout = read_jsonl(HERE / "data" / "heldout.jsonl")[:args.heldout_limit]
    server, home = None, None
    if args.base_url:
        base_url = args.base_url
    else:
        home = args.home.resolve()
        server, base_url = start_server(home, [args.model], work / "server.log")
        print(f"finesmith serve {args.model} at {base_url} (FINESMITH_HOME={home}, log {work / 'server.log'})",
              flush=True)
    client = OpenAI(base_url=base_url, api_key=args.api_key, timeout=600)
    try:
        upload = {name: client.files.create(file=open(path, "rb"), purpose="fine-tune").id
                  for name, path in files.items()}
        print(f"uploaded: {upload}", flush=True)

        multiplier = CLI_SFT_LR / DEFAULT_LR["lora"]
        sft = client.fine_tuning.jobs.create(
            model=args.model, training_file=upload["sft"], suffix="grpo-sft", seed=42,
            method={"type": "supervised", "supervised": {
                "hyperparameters": {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": multiplier},
                "finesmith": {"method": "lora"}}})
        print(f"supervised job {sft.id} (lr multiplier {multiplier:g} × {DEFAULT_LR['lora']:g})", flush=True)
        sft = wait(client, sft.id, 3600)
        if sft.status != "succeeded":
            raise SystemExit(f"supervised job {sft.id} {sft.status}: {sft.error}")

        rl_model = sft.fine_tuned_model
        if args.rl_on == "merged":
            # As the CLI's staged config does, the SFT run is merged into a plain model folder, which the server
            # then serves (a restart on the same home: files, jobs and `ft:` models stay) and fine-tunes.
            if server is None:
                raise SystemExit("--rl-on merged needs the server this script starts (drop --base-url, or --rl-on ft)")
            merged = work / "grpo-sft-merged"
            stop_server(server)
            subprocess.run([str(Path(sys.executable).parent / "finesmith"), "export", str(home / "jobs" / sft.id / "run"),
                            "--format", "hf", "--output", str(merged), "--overwrite"], check=True)
            server, base_url = start_server(home, [args.model, str(merged)], work / "server.log")
            client = OpenAI(base_url=base_url, api_key=args.api_key, timeout=600)
            rl_model = next(m.id for m in client.models.list().data if m.id == merged.name)
            print(f"restarted the server on the same home, serving {args.model} and {rl_model} "
                  f"(the SFT job's run merged by `finesmith export --format hf`)", flush=True)
        grader_check = client.fine_tuning.alpha.graders.validate(grader=GRADER)
        print(f"grader validated: {grader_check.grader.type if grader_check.grader else grader_check}", flush=True)
        rl = client.fine_tuning.jobs.create(
            model=rl_model, training_file=upload["prompts"], validation_file=upload["heldout"],
            suffix="grpo", seed=42,
            method={"type": "reinforcement", "reinforcement": {
                "grader": GRADER,
                "hyperparameters": {"n_epochs": 1, "batch_size": 4, "compute_multiplier": 1,
                                    "learning_rate_multiplier": multiplier, "eval_interval": args.max_steps,
                                    "eval_samples": 1},
                "finesmith": {"method": "lora", "max_steps": args.max_steps, "temperature": 0.7, "top_p": 0.9,
                              "max_new_tokens": args.rl_max_new_tokens}}})
        print(f"reinforcement job {rl.id} on {rl_model}", flush=True)
        rl = wait(client, rl.id, 7200)
        if rl.status != "succeeded":
            raise SystemExit(f"reinforcement job {rl.id} {rl.status}: {rl.error}")

        rows = [measure_model(client, args.model, "base (no training)", heldout, args.workers),
                measure_model(client, sft.fine_tuned_model, "SFT job (60 rows, 1 epoch, lr 1e-4)", heldout,
                              args.workers),
                measure_model(client, rl.fine_tuned_model,
                              f"SFT job, then reinforcement job ({args.max_steps} steps × 4 prompts × 4 samples)",
                              heldout, args.workers)]
        seconds = {"sft": run_seconds(home, sft.id), "reinforcement": run_seconds(home, rl.id)}
        wall = {"sft": (sft.finished_at or 0) - (sft.created_at or 0), "reinforcement": (rl.finished_at or 0) - (
            rl.created_at or 0)}
        for row, key in zip(rows, (None, "sft", "reinforcement")):
            row["training_seconds"] = [] if key is None else [seconds["sft"]] + (
                [seconds["reinforcement"]] if key == "reinforcement" else [])
        metrics = metric_events(client, rl.id)
        result = {
            "command": "python examples/grpo/api_jobs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "note": args.label or None,
            "date": started_at.isoformat(timespec="seconds"),
            "device": f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.processor() or platform.platform()})",
            "server": "started by this script" if server else base_url,
            "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": args.rl_max_new_tokens},
            "reinforcement_model": rl_model, "rl_on": args.rl_on,
            "jobs": {"sft": {"id": sft.id, "fine_tuned_model": sft.fine_tuned_model,
                             "hyperparameters": sft.hyperparameters.model_dump() if sft.hyperparameters else None,
                             "training_seconds": seconds["sft"], "job_seconds": wall["sft"]},
                     "reinforcement": {"id": rl.id, "fine_tuned_model": rl.fine_tuned_model,
                                       "hyperparameters": rl.hyperparameters.model_dump() if rl.hyperparameters
                                       else None, "grader": GRADER,
                                       "training_seconds": seconds["reinforcement"], "job_seconds": wall["reinforcement"]}},
            "reinforcement_metrics": metrics,
            "measured_through": "POST /v1/chat/completions, temperature 0, max_tokens 32, scored by "
                                "examples/preference/measure.py's score()",
            "rows": rows,
        }
        args.output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print("\n| model | property rate | format and right number | right number anywhere | training time |\n"
              "|---|---|---|---|---|")
        for row in rows:
            time_text = " + ".join(f"{x:.0f} s" for x in row["training_seconds"] if x is not None) or "—"
            print(f"| {row['label']} | {row['property_rate']:.1%} ({round(row['property_rate'] * row['n'])}/{row['n']}) "
                  f"| {row['correct_rate']:.1%} | {row['mentions_rate']:.1%} | {time_text} |")
        print(f"wrote {args.output}")
    finally:
        if server is not None:
            stop_server(server)


if __name__ == "__main__":
    main()
