"""Peak memory and wall time of few-shot evaluation as the held-out set grows.

    .venv/bin/python bench/eval_memory.py                      # eval --shots 10 on 100 and 400 rows
    .venv/bin/python bench/eval_memory.py --rows 100 --tag before   # one size, recorded under a tag
    .venv/bin/python bench/eval_memory.py --compare            # also: a short LoRA run, then compare k=10 on 400 rows
    # measure a fixed snapshot (others may edit the checkout meanwhile), e.g. the last commit:
    mkdir -p /tmp/snap && git archive HEAD src | tar -x -C /tmp/snap
    PYTHONPATH=/tmp/snap/src .venv/bin/python bench/eval_memory.py --src /tmp/snap/src \\
        --src-label $(git rev-parse --short HEAD)

Writes a synthetic banking-intent set (`bench/banking_intents.py`: 10 intents listed in the
system prompt, answers of 5–8 tokens, so greedy answers need decoding and 10 shots make a
prefix of about 650 tokens), then runs `finesmith eval --shots 10` on the built-in
SmolLM2-135M-Instruct for each `--rows`, each in its own process with stdout to a file (not a
terminal). The peak is the measured process's `VmHWM` from /proc, read every 50 ms while it
runs (a high-water mark: the last reading is its peak but for the last 50 ms), the time its
wall clock. Beside each measurement: the advisor's estimate of the same work
(`finesmith.advise.memory.estimate_eval_memory` for the engine's plan).

With `--compare`, trains a short LoRA run on the same training file and runs
`finesmith compare RUN --shots 10` on 400 rows, recording its peak, wall time and the
progress lines its log shows.

Results go to bench/results/eval_memory.json (`--tag` adds a section rather than replacing
the file's other sections).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from banking_intents import write  # noqa: E402

MODEL = "smollm2-135m-instruct"
RESULTS = ROOT / "bench" / "results" / "eval_memory.json"
SOURCE: str | None = None  # --src: a source tree to measure instead of the installed package


def finesmith(*args: str) -> list[str]:
    """The `finesmith` command line (as `python -m finesmith`, which `--src` can redirect)."""
    return [sys.executable, "-m", "finesmith", *args]


def vm_hwm(pid: int) -> int | None:
    """The process's peak resident set in bytes (`VmHWM`), or None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measured(command: list[str], log: Path, timeout: float = 3600) -> dict:
    """Run `command` with stdout and stderr to `log`; its peak RSS (VmHWM), seconds and exit code."""
    load = os.getloadavg()[0]  # other work on the machine slows a CPU run, and the time says nothing of it
    started = time.perf_counter()
    with log.open("w") as out:
        env = {**os.environ, "COLUMNS": "120", **({"PYTHONPATH": SOURCE} if SOURCE else {})}
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, vm_hwm(proc.pid) or 0)
            if time.perf_counter() - started > timeout:
                proc.kill()
            time.sleep(0.05)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}); see {log}")
    return {"command": " ".join(command), "peak_rss_mib": round(peak / 2**20, 1), "seconds": round(seconds, 1),
            "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}


def measuring_this_process_source() -> bool:
    """Whether the measured source is the one this process imports (the estimate uses its engine)."""
    import finesmith

    return SOURCE is None or Path(finesmith.__file__).resolve().is_relative_to(Path(SOURCE))


def predicted(data: Path, train: Path, rows: int, shots: int) -> dict:
    """The advisor's estimate of the same evaluation: the engine's plan for these prompts (lengths,
    batch, pool) sized by `finesmith.advise.memory.estimate_eval_memory`."""
    from finesmith.advise.memory import estimate_eval_memory
    from finesmith.evaluate.budget import model_shape
    from finesmith.evaluate.engine import PromptEngine
    from finesmith.evaluate.generate import engine_jobs
    from finesmith.evaluate.tasks import EvalOptions, build_prompts, label_set
    from finesmith.model.methods import load_for_inference
    from finesmith.pipeline import load_examples

    model, tokenizer = load_for_inference(MODEL)
    examples, pool = load_examples(str(data))[:rows], load_examples(str(train))
    options = EvalOptions(shots=shots)
    prompts = build_prompts(tokenizer, examples, pool, options, "classification")
    jobs, _ = engine_jobs(tokenizer, prompts.messages, label_set([ex.answer for ex in examples])[1],
                          [None] * len(examples), prompts.groups)
    engine = PromptEngine(model, tokenizer.pad_token_id, [], options.batch_size)
    engine.plan_work(jobs, options.max_new_tokens)
    estimate = estimate_eval_memory(model_shape(model), engine.plan)
    return {"plan": {k: v for k, v in vars(engine.plan).items() if k != "device"},
            "predicted_peak_mib": round(estimate.peak / 2**20, 1),
            "components_mib": {k: round(v / 2**20, 1) for k, v in estimate.components.items()}}


def eval_rows(data: Path, train: Path, rows: int, shots: int, extra: list[str], logs: Path) -> dict:
    command = finesmith("eval", "--model", MODEL, "--data", str(data), "--shots-from", str(train),
                        "--shots", str(shots), "--limit", str(rows), "--output", str(logs / f"eval_{rows}.json"),
                        *extra)
    log = logs / f"eval_{rows}.log"
    result = measured(command, log)
    tail = [line for line in log.read_text().splitlines() if line.startswith("accuracy")]
    print(f"{rows} rows: peak {result['peak_rss_mib']} MiB, {result['seconds']} s", flush=True)
    estimate = predicted(data, train, rows, shots) if measuring_this_process_source() and not extra else {}
    return {"rows": rows, **result, "accuracy_line": tail[-1] if tail else None, **estimate}


def compare_run(data: Path, train: Path, rows: int, shots: int, extra: list[str], logs: Path, steps: int) -> dict:
    """A short LoRA run (`steps` steps of 4 examples), then `compare RUN --shots k` on `rows` rows
    (its log to a file)."""
    run = logs / "lora_run"
    train_cmd = finesmith("train", "--model", MODEL, "--data", str(train), "--method", "lora",
                          "--max-steps", str(steps), "--batch-size", "4", "--output", str(run), "--overwrite")
    trained = measured(train_cmd, logs / "train.log")
    log = logs / "compare.log"
    command = finesmith("compare", str(run), "--base", MODEL, "--data", str(data), "--shots-from",
                        str(train), "--shots", str(shots), "--limit", str(rows), "--output", str(logs / "report"),
                        *extra)
    result = measured(command, log)
    lines = log.read_text().splitlines()
    progress = [line for line in lines if " rows/s" in line]
    print(f"compare {rows} rows: peak {result['peak_rss_mib']} MiB, {result['seconds']} s, "
          f"{len(progress)} progress lines", flush=True)
    return {"rows": rows, "train_steps": steps, "train_seconds": trained["seconds"], **result,
            "progress_lines": len(progress),
            "progress_sample": progress[:3] + progress[-2:]}


def git_head() -> str:
    """This checkout's commit, `+changes` when its sources differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "src", "bench"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return head.strip() + (" +changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100,400", help="held-out sizes, comma-separated")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--compare", action="store_true", help="also a short LoRA run and compare on 400 rows")
    parser.add_argument("--compare-only", action="store_true", help="only the compare measurement")
    parser.add_argument("--train-steps", type=int, default=6, help="LoRA steps (4 examples each) of the compared run")
    parser.add_argument("--tag", default="after", help="section of the result file to write")
    parser.add_argument("--work", default="/tmp/finesmith_eval_memory", help="folder for data, logs and the run")
    parser.add_argument("--src", help="measure this source tree (e.g. an older commit's src/ from `git archive`)")
    parser.add_argument("--src-label", help="how the result file names that source, e.g. the commit")
    parser.add_argument("extra", nargs="*", help="more `finesmith eval` flags, after --")
    args = parser.parse_args()
    global SOURCE
    SOURCE = str(Path(args.src).resolve()) if args.src else None
    sizes = [int(n) for n in args.rows.split(",") if n.strip()]
    work = Path(args.work)
    train, data = write(work / "data", 400, max(sizes + [400]))
    section: dict = {"source": args.src_label or args.src or "this checkout", "date": datetime.date.today().isoformat(),
                     "bench_checkout": git_head(), "model": MODEL,
                     "shots": args.shots,
                     "device": f"cpu, {os.cpu_count()} cores ({platform.machine()})",
                     "data": "bench/banking_intents.py: 400 training rows (shots), held-out rows from another seed"}
    if not args.compare_only:
        section["eval"] = [eval_rows(data, train, n, args.shots, args.extra, work) for n in sizes]
        if len(sizes) > 1:
            first, last = section["eval"][0], section["eval"][-1]
            section["peak_ratio"] = round(last["peak_rss_mib"] / first["peak_rss_mib"], 3)
            section["time_ratio"] = round(last["seconds"] / first["seconds"], 3)
            section["rows_ratio"] = last["rows"] / first["rows"]
    if args.compare or args.compare_only:
        section["compare"] = compare_run(data, train, 400, args.shots, args.extra, work, args.train_steps)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[args.tag] = {**results.get(args.tag, {}), **section}  # --compare-only adds to the eval numbers
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(section, indent=2))


if __name__ == "__main__":
    main()
