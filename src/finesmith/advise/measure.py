"""Measure a few real training steps: peak resident memory and seconds per step.

Run in a fresh process (`python -m finesmith.advise.measure ...`) so that the peak RSS
belongs to this run alone. `--calibrate` in the advisor and the memory-estimator tests
both use it; the result is one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from finesmith.errors import FinesmithError

# Long enough to fill any `max_length` used in a measurement; truncation cuts it exactly.
_FILLER = " ".join(f"word{i % 97} alpha beta gamma" for i in range(2000))


@dataclass(frozen=True)
class Measurement:
    """What a short real run measured."""

    peak_rss_bytes: int  # ru_maxrss of the measuring process
    seconds_per_step: float  # median optimizer-step time after the first step
    tokens_per_step: float


def synthetic_data(path: Path, n: int) -> str:
    """Write `n` chat examples long enough that each is truncated to `max_length` tokens."""
    rows = [{"messages": [{"role": "user", "content": f"Repeat the text {i}."},
                          {"role": "assistant", "content": _FILLER}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def measure_here(model: str, method: str, max_length: int, batch_size: int, steps: int,
                 data: str | None = None) -> Measurement:
    """Train `steps` optimizer steps in this process and measure it.

    Args:
        model: model spec as `--model` takes it.
        method: a training method name (`full`, `lora`, ...).
        max_length: tokens per example (synthetic examples are cut to exactly this).
        batch_size: examples per micro-batch.
        steps: optimizer steps to run (at least 2, so one timed step follows the first).
        data: training JSONL to use instead of synthetic examples.
    Returns:
        The Measurement.
    """
    from finesmith.config import load_config
    from finesmith.core.console import console
    from finesmith.pipeline import train

    console.quiet = True  # the caller wants one JSON line, not the training log
    with tempfile.TemporaryDirectory(prefix="finesmith-measure-") as tmp:
        data = data or synthetic_data(Path(tmp) / "data.jsonl", max(16, batch_size * steps))
        config = load_config(flags={"model": model, "data": data, "output": str(Path(tmp) / "run"),
                                    "method": method, "max_length": max_length, "batch_size": batch_size,
                                    "max_steps": steps, "log_every": 1})
        outcome = train(config)
        records = [json.loads(line) for line in (outcome.output / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records if "elapsed_s" in r]
    step_times = sorted(b - a for a, b in zip(elapsed, elapsed[1:])) or [elapsed[0]]
    tokens = outcome.result.tokens_per_second * outcome.result.seconds / steps
    return Measurement(peak_rss_bytes(), step_times[len(step_times) // 2], tokens)


def peak_rss_bytes() -> int:
    """This process's own peak resident memory.

    On Linux `ru_maxrss` survives `exec`: a measuring process forked from a large parent
    (a test runner, or a CLI that has loaded a model) would report the parent's size when
    its own peak is lower. `VmHWM` belongs to the process image, so it starts afresh.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kilobytes


def measure_in_subprocess(model: str, method: str, max_length: int, batch_size: int = 1, steps: int = 3,
                          data: str | None = None, timeout: float = 600) -> Measurement:
    """`measure_here` in a fresh Python process, so the peak RSS is this run's alone."""
    cmd = [sys.executable, "-m", "finesmith.advise.measure", "--model", model, "--method", method,
           "--max-length", str(max_length), "--batch-size", str(batch_size), "--steps", str(steps)]
    if data:
        cmd += ["--data", data]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FinesmithError(f"calibration run failed ({last}); run `finesmith train ... --max-steps 3` to see why")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure peak RSS and step time of a short training run.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data")
    args = parser.parse_args(argv)
    from finesmith.core.console import quiet_libraries

    quiet_libraries()
    result = measure_here(args.model, args.method, args.max_length, args.batch_size, args.steps, args.data)
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
