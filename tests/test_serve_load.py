"""The real `finesmith serve` process under a burst of 64 OpenAI clients, then SIGTERM.

Every client must get a whole answer or a 429 in bounded time, the server must still
answer afterwards, and SIGTERM must end it promptly even with a long queue in flight.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import QA, chat, write_jsonl

from finesmith.cli import main

CLIENTS = 64
QUESTIONS = [q for q, _ in QA[:4]]
BURST_LIMIT_S = 60
EXIT_LIMIT_S = 10


@pytest.fixture(scope="module")
def lora_run(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve-load")
    data = write_jsonl(root / "train.jsonl", [chat(q, a) for q, a in QA])
    out = root / "run"
    assert main(["train", "--model", tiny_model, "--data", data, "--method", "lora", "--output", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2"]) == 0
    return out


class Served:
    """One `finesmith serve` child process and its log."""

    def __init__(self, run: Path, log: Path, *flags: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{port}", log
        self.model = run.name
        with open(log, "w") as sink:
            self.proc = subprocess.Popen([sys.executable, "-m", "finesmith.cli", "serve", str(run), "--port", str(port),
                                          *flags], stdout=sink, stderr=subprocess.STDOUT,
                                         env=os.environ | {"PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited early:\n{self.log.read_text()}"
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"the server did not come up:\n{self.log.read_text()}")

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
            return json.loads(response.read())

    def client(self, timeout: float = BURST_LIMIT_S):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=timeout)

    def terminate(self) -> float:
        """SIGTERM; the seconds until the process was gone."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=EXIT_LIMIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM did not stop the server within {EXIT_LIMIT_S}s:\n{self.log.read_text()}")
        return time.monotonic() - started


@pytest.fixture(scope="module")
def servers(lora_run: Path, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("serve-logs")
    # both load at once (start-up is the slow part); models only, as one home serves one server's jobs
    started = {"small": Served(lora_run, logs / "small.log", "--queue-size", "2", "--no-jobs"),
               "default": Served(lora_run, logs / "default.log", "--no-jobs")}
    for served in started.values():
        served.wait_ready()
    yield started
    for served in started.values():
        if served.proc.poll() is None:  # a failed test left it running
            served.proc.kill()
            served.proc.wait()


def ask(client, model: str, index: int, barrier: threading.Barrier) -> tuple[str, int, str | None]:
    """One client of the burst: even ones wait for the whole answer, odd ones stream, every fourth leaves early."""
    from openai import RateLimitError

    messages = [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]
    barrier.wait()
    try:
        if index % 2 == 0:
            response = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
            assert response.choices[0].finish_reason in ("stop", "length")
            return "answered", index, response.choices[0].message.content
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                                stream=True)
        if index % 4 == 1:
            next(iter(stream))
            stream.close()
            return "left", index, None
        chunks = [c for c in stream if c.choices]
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        return "answered", index, "".join(c.choices[0].delta.content or "" for c in chunks)
    except RateLimitError as exc:
        assert exc.status_code == 429 and int(exc.response.headers["retry-after"]) >= 1
        error = exc.response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "rate_limit_exceeded"
        return "busy", index, None


def burst(served: Served) -> tuple[Counter, float]:
    client = served.client()
    barrier = threading.Barrier(CLIENTS)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        results = list(pool.map(lambda i: ask(client, served.model, i, barrier), range(CLIENTS)))
    elapsed = time.monotonic() - started
    answers = defaultdict(set)
    for outcome, index, text in results:
        if outcome == "answered":
            answers[index % len(QUESTIONS)].add(text)
    assert all(len(texts) == 1 for texts in answers.values()), answers  # greedy: one answer per question
    return Counter(outcome for outcome, _, _ in results), elapsed


def one_more(served: Served) -> None:
    started = time.monotonic()
    response = served.client(timeout=20).chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=16, temperature=0)
    assert response.choices[0].message.content and time.monotonic() - started < 10


def test_a_burst_on_a_small_queue_gets_answers_or_429s_and_sigterm_stops_it(servers) -> None:
    served = servers["small"]
    counts, elapsed = burst(served)
    print(f"\nqueue 2: {dict(counts)} in {elapsed:.1f}s")
    assert elapsed < BURST_LIMIT_S and sum(counts.values()) == CLIENTS
    assert counts["answered"] >= 1 and counts["busy"] >= 1
    one_more(served)
    took = served.terminate()
    print(f"queue 2: exited {took:.1f}s after SIGTERM")
    assert served.proc.returncode == -signal.SIGTERM  # uvicorn shuts down, then ends by the signal


def test_a_burst_on_the_default_queue_then_sigterm_with_a_long_queue_in_flight(servers) -> None:
    served = servers["default"]
    counts, elapsed = burst(served)
    print(f"\nqueue 32: {dict(counts)} in {elapsed:.1f}s")
    assert elapsed < BURST_LIMIT_S and sum(counts.values()) == CLIENTS
    assert CLIENTS - counts["busy"] >= 32  # at least the queue's worth got in
    one_more(served)

    # Sixteen long requests (about a second each here) queue up; SIGTERM must not wait for them all.
    client = served.client(timeout=30)

    def long(index: int) -> str:
        messages = [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]
        try:
            if index % 2:
                return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model=served.model, messages=messages, max_tokens=480, temperature=0, stream=True) if c.choices)
            return client.chat.completions.create(model=served.model, messages=messages, max_tokens=480,
                                                  temperature=0).choices[0].message.content
        except Exception as exc:  # 503, an in-band error event or a dropped connection: all fine here
            return type(exc).__name__

    with ThreadPoolExecutor(max_workers=16) as pool:
        pending = [pool.submit(long, i) for i in range(16)]
        deadline = time.monotonic() + 20
        while served.health()["waiting"] < 8:
            assert time.monotonic() < deadline, served.health()
            time.sleep(0.05)
        took = served.terminate()
        outcomes = [future.result(timeout=EXIT_LIMIT_S) for future in pending]
    print(f"queue 32: exited {took:.1f}s after SIGTERM with 16 long requests in flight: {Counter(outcomes)}")
    assert served.proc.returncode == -signal.SIGTERM
    assert took < EXIT_LIMIT_S
