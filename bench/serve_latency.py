"""Single-request latency of `finesmith serve`: this checkout against another source tree, in one run.

    python bench/serve_latency.py --before /path/to/other/checkout [--requests 40] [--tokens 8]

Starts two real `finesmith serve smollm2-135m-instruct` processes with their default
settings (loopback, no key, the jobs API on), one from this checkout's `src/` and one from
the other's, each with its own `FINESMITH_HOME`. Only one request is in flight at any time,
sent alternately to the two servers so that both see the same machine load; each request
is a greedy chat completion of `--tokens` new tokens for a short question (the answers of
the two servers are compared: greedy, so they must be equal), and a `GET /health`.
Writes bench/results/serve_latency.json with the median and 90th percentile of each and the
after/before ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from serving import start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "serve_latency.json"
MODEL = "smollm2-135m-instruct"


def git_head(tree: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "src"], capture_output=True,
                               text=True).stdout.strip()
        return out.stdout.strip() + (" +changes" if dirty else "")
    except OSError:
        return "unknown"


def chat(port: int, question: str, tokens: int) -> tuple[float, str]:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": question}],
                       "max_tokens": tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    began = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - began, answer["choices"][0]["message"]["content"]


def health(port: int) -> float:
    began = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
        response.read()
    return time.perf_counter() - began


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median_ms": round(1000 * statistics.median(ordered), 2),
            "p90_ms": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 2), "n": len(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="the other checkout (its src/ is served)")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()
    trees = {"after": ROOT, "before": Path(args.before).resolve()}
    servers = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, tree in trees.items():
                home = Path(tmp) / name
                home.mkdir()
                servers[name] = start_server(tree, home, MODEL, {"OMP_NUM_THREADS": "1"})
            chats = {name: [] for name in trees}
            checks = {name: [] for name in trees}
            mismatches = 0
            for i in range(args.requests + 3):
                question = f"Name one thing that is blue. (question {i})"
                answers = {}
                order = list(trees) if i % 2 == 0 else list(trees)[::-1]
                for name in order:
                    seconds, answers[name] = chat(servers[name][1], question, args.tokens)
                    check = health(servers[name][1])
                    if i >= 3:  # the first requests warm up
                        chats[name].append(seconds)
                        checks[name].append(check)
                mismatches += answers["after"] != answers["before"]
        finally:
            for proc, _ in servers.values():
                stop_server(proc)
    result = {
        "command": "python bench/serve_latency.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "device": f"cpu, {os.cpu_count()} cores ({platform.machine()})",
        "model": MODEL, "tokens": args.tokens, "requests": args.requests,
        "sources": {name: git_head(tree) for name, tree in trees.items()},
        "load_average_1min": round(os.getloadavg()[0], 2),
        "chat": {name: summary(values) for name, values in chats.items()},
        "health": {name: summary(values) for name, values in checks.items()},
        "answers_differing": mismatches,
    }
    result["chat_median_ratio_after_over_before"] = round(
        result["chat"]["after"]["median_ms"] / result["chat"]["before"]["median_ms"], 3)
    result["health_median_ratio_after_over_before"] = round(
        result["health"]["after"]["median_ms"] / result["health"]["before"]["median_ms"], 3)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
