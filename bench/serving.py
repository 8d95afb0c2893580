"""A real `finesmith serve` process for the benchmarks that measure the server from outside."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(tree: Path, home: Path, model: str, extra_env: dict[str, str] | None = None,
                 timeout_s: float = 300) -> tuple[subprocess.Popen, int]:
    """`finesmith serve MODEL` from `tree`'s sources with `FINESMITH_HOME=home`, once `/health` answers;
    its output goes to `home/serve.log`. Returns (process, port)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "FINESMITH_HOME": str(home), **(extra_env or {})}
    with open(home / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "finesmith", "serve", model, "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"finesmith serve from {tree} exited with {proc.returncode}; see {home / 'serve.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"finesmith serve from {tree} did not start in {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
