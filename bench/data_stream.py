"""Peak memory and time of `finesmith data check` on a large synthetic JSONL.

Writes a synthetic chat JSONL of about `--gb` gigabytes to /tmp, runs
`finesmith data check` on it in a subprocess (with a tiny locally built model, so only the
data path is measured), and records the child's peak RSS and wall time to
bench/results/data_stream.json. Streaming means peak RSS should stay flat as the file grows.

Usage: .venv/bin/python bench/data_stream.py [--gb 2.0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("ticket invoice refund account password login error billing upgrade cancel delivery order "
         "payment card shipping address update request support urgent broken missing slow crash").split()


def write_synthetic(path: Path, target_bytes: int, seed: int = 0) -> int:
    """Write chat examples until the file reaches `target_bytes`; return the line count."""
    rng = random.Random(seed)
    lines = 0
    with path.open("w", encoding="utf-8") as handle:
        while handle.tell() < target_bytes:
            chunk = []
            for _ in range(1000):
                user = " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))
                answer = " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))
                chunk.append(json.dumps({"messages": [{"role": "system", "content": "Triage the ticket."},
                                                      {"role": "user", "content": user},
                                                      {"role": "assistant", "content": answer}]}))
            handle.write("\n".join(chunk) + "\n")
            lines += len(chunk)
    return lines


def tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_model

    return folder if (folder / "config.json").is_file() else make_tiny_model(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "data_stream.json"))
    args = parser.parse_args()
    data = Path("/tmp/finesmith_data_stream.jsonl")
    lines = write_synthetic(data, int(args.gb * 1e9))
    model = tiny_model(Path("/tmp/finesmith_data_stream_model"))
    command = [str(Path(sys.executable).parent / "finesmith"), "data", "check", str(data), "--model", str(model),
               "--max-length", "1024"]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux reports KiB
    result = {"file_bytes": data.stat().st_size, "examples": lines, "exit_code": proc.returncode,
              "seconds": round(seconds, 1), "examples_per_second": round(lines / seconds),
              "peak_rss_mib": round(peak_kib / 1024, 1), "tokenizer": "tests/assets/tokenizer-chatml (600-token BPE)",
              "report_tail": proc.stdout.strip().splitlines()[-3:], "cpu_count": os.cpu_count()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    data.unlink()


if __name__ == "__main__":
    main()
