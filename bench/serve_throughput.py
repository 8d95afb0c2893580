"""Serving throughput on the built-in model: 16 concurrent clients against one at a time.

    python bench/serve_throughput.py [--requests 32] [--tokens 32]

Loads SmolLM2-135M-Instruct once and serves it with `finesmith.serve.server.build_app`
(uvicorn in a thread, the real HTTP path) to the official `openai` client. In one process,
one after the other, it times:

- `one_client`: one client sending the requests one after another;
- `sixteen_clients`: 16 clients at once (a thread each), the engine batching the requests
  that wait (up to 16 generated together);
- `sixteen_clients_no_batching`: the same 16 clients with the engine limited to one
  request at a time (`max_batch=1`), the way the server worked before.

Every request is greedy, `max_tokens` new tokens, no stop string, so every row decodes the
same number of tokens; the prompts are distinct questions. The answers of the three runs
are compared (greedy: they must be equal). Writes bench/results/serve_throughput.json with
completion tokens/s and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "serve_throughput.json"
MODEL = "smollm2-135m-instruct"

try:
    import finesmith  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT / "src"))

from finesmith.serve.engine import load_engine  # noqa: E402
from finesmith.serve.server import build_app  # noqa: E402

TOPICS = ["rivers", "volcanoes", "bees", "glaciers", "comets", "tides", "owls", "deserts", "coral", "thunder",
          "bridges", "maps", "clocks", "bread", "paper", "glass"]


def questions(n: int) -> list[str]:
    return [f"In two sentences, what is interesting about {TOPICS[i % len(TOPICS)]}? (question {i})"
            for i in range(n)]


def serve(engine):
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, port


def run(port: int, prompts: list[str], clients: int, tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    def ask(prompt: str) -> tuple[str, int]:
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=tokens, temperature=0)
        return reply.choices[0].message.content, reply.usage.completion_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(ask, prompts))
    seconds = time.perf_counter() - started
    completion = sum(n for _, n in answers)
    return {"clients": clients, "requests": len(prompts), "completion_tokens": completion,
            "seconds": round(seconds, 2), "tokens_per_second": round(completion / seconds, 1),
            "answers": [a for a, _ in answers]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    engine = load_engine(MODEL, "cpu")
    engine.name = MODEL
    server, thread, port = serve(engine)
    prompts = questions(args.requests)
    run(port, prompts[:2], 1, 4)  # warm-up
    results = {"one_client": run(port, prompts, 1, args.tokens),
               "sixteen_clients": run(port, prompts, 16, args.tokens)}
    largest = engine.counts["largest_batch"]
    engine.max_batch = 1
    results["sixteen_clients_no_batching"] = run(port, prompts, 16, args.tokens)
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()
    same = (results["one_client"]["answers"] == results["sixteen_clients"]["answers"]
            == results["sixteen_clients_no_batching"]["answers"])
    for r in results.values():
        r.pop("answers")
    out = {
        "model": MODEL, "device": "cpu", "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "max_new_tokens": args.tokens, "largest_batch": largest,
        "answers_equal_across_runs": same, **results,
        "ratio_16_clients_vs_1": round(results["sixteen_clients"]["tokens_per_second"]
                                       / results["one_client"]["tokens_per_second"], 2),
        "ratio_batching_vs_one_at_a_time_16_clients": round(
            results["sixteen_clients"]["tokens_per_second"]
            / results["sixteen_clients_no_batching"]["tokens_per_second"], 2),
        "measured": time.strftime("%Y-%m-%d"),
    }
    RESULTS.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
