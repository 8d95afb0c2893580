"""Reward functions for reinforcement fine-tuning: plain Python, called per sampled answer.

`reward: path/to/module.py:function` (or a list of them, weighted by `reward_weights`) names
a function called as `function(prompt=..., completion=..., **fields)`, where `fields` are
the example's other fields: `reference` (the reference answer, when the row has one) and
every other column of the row. It returns a number. Built-ins:

- `exact_match`: 1.0 when the completion equals the reference (whitespace and case ignored);
- `regex:PATTERN`: 1.0 when the whole stripped completion matches PATTERN;
- `length:MIN-MAX`: 1.0 when the stripped completion has MIN to MAX characters.

A function that raises, or returns something that is not a finite number, stops the run with
one line naming the function and the example.

A reward may also be a grader object of the hosted graders API (`finesmith.graders`), written
inline: `reward: {type: string_check, name: exact, input: "{{ sample.output_text }}",
reference: "{{ item.reference }}", operation: eq}` (or in a list with other rewards). It grades
each completion as the sample and the row as the item (`item.<column>`, `item.reference`,
`item.prompt`). Python graders run in their own sandbox per call, under `grpo.reward_timeout`
seconds; a grading that fails (an error flag: timeout, memory, a socket, an exception) stops the
run with one line naming the grader, what happened and the example (`grpo.grader_errors: fail`,
the default), or scores 0 as the hosted service did (`grpo.grader_errors: zero`). Model graders
(score_model, label_model) need a judge model and are refused here.

Reward functions are user code. Those named in the config (files and built-ins alike) run in
a separate process (`RewardScorer`, `python -m finesmith.train.rewards`), not in the training
process: each call must return within `grpo.reward_timeout` seconds, or the run stops with one
line naming the function, the example and the timeout. A reward that hangs therefore cannot
hang training, and cannot keep SIGTERM from being handled: a stop that arrives while rewards
run gives them a second, then ends the reward process; the step being sampled is skipped
(logged as skipped, weights untouched) and the loop saves its checkpoint and exits 75.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from finesmith.errors import FinesmithError


@dataclass(frozen=True)
class Reward:
    """One named reward function and its weight in the total."""

    name: str
    function: Callable[..., Any]
    weight: float = 1.0
    isolated: bool = False  # named by a spec (`load_rewards`): called in the reward process, under the timeout
    base: str | None = None  # the folder a relative spec path is resolved against
    grader: dict[str, Any] | None = None  # a grader object (validated): `with_grader_settings` sets its limits

    def __call__(self, prompt: str, completion: str, fields: dict[str, Any], source: str) -> float:
        arguments = {"prompt": prompt, "completion": completion, **fields}
        accepted = _accepted(self.function)
        if accepted is not None:
            arguments = {k: v for k, v in arguments.items() if k in accepted}  # what the function takes
        try:
            value = self.function(**arguments)
        except GradingFailed as exc:
            raise GradingFailed(f"{exc} on {source}") from None
        except Exception as exc:
            raise FinesmithError(f"reward {self.name} failed on {source}: {type(exc).__name__}: {exc}; "
                                 "fix the function (it must return a number for every completion)") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FinesmithError(f"reward {self.name} returned {value!r} on {source}; it must return a finite "
                                 "number (int or float)")
        return float(value)


@functools.lru_cache(maxsize=None)
def _accepted(function: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword arguments `function` takes (None: any, it has **kwargs)."""
    params = inspect.signature(function).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params)


def exact_match(completion: str, reference: str | None = None, **_: Any) -> float:
    if reference is None:
        raise ValueError("exact_match needs a reference answer in the example")
    return float(" ".join(completion.split()).lower() == " ".join(str(reference).split()).lower())


def regex_reward(pattern: str) -> Callable[..., float]:
    compiled = re.compile(pattern, re.DOTALL)
    return lambda completion, **_: float(compiled.fullmatch(completion.strip()) is not None)


def length_reward(low: int, high: int) -> Callable[..., float]:
    return lambda completion, **_: float(low <= len(completion.strip()) <= high)


class GradingFailed(FinesmithError):
    """A grader reward's grading failed and the run's policy is to stop (`grpo.grader_errors: fail`)."""


def grader_reward(grader: dict[str, Any], weight: float = 1.0, timeout: float = 60.0,
                  on_error: str = "fail", log: Callable[[str], None] | None = None) -> Reward:
    """A Reward grading with `grader` (see the module docstring): python graders get `timeout`
    seconds a call; a failed grading raises `GradingFailed` (`on_error: fail`) or scores 0 (`zero`,
    reported to `log`)."""
    from finesmith.graders.python_grader import DEFAULT_LIMITS
    from finesmith.graders.reward import reward_from_grader

    def failed(message: str) -> None:
        prefix = f"grader {grader['name']}:"
        if message.startswith(prefix):  # name the grader's type too: "grader loop (python): ..."
            message = f"grader {grader['name']} ({grader['type']}):{message[len(prefix):]}"
        if on_error == "fail":
            raise GradingFailed(message)
        if log is not None:
            log(f"{message}; scored 0")

    limits = dataclasses.replace(DEFAULT_LIMITS, timeout_s=timeout)
    reward = reward_from_grader(grader, weight=weight, limits=limits, on_error=failed)
    return dataclasses.replace(reward, grader=reward.function.grader)


def with_grader_settings(rewards: Sequence[Reward], timeout: float, on_error: str,
                         log: Callable[[str], None] | None = None) -> list[Reward]:
    """`rewards` with every grader reward rebuilt under these settings (the others as they are)."""
    return [grader_reward(r.grader, r.weight, timeout, on_error, log) if r.grader is not None else r
            for r in rewards]


def check_grader(spec: Any, param: str) -> dict[str, Any]:
    """A reward grader object, validated; model graders are refused (no judge in training).

    Raises:
        FinesmithError: the grader is invalid (naming the field), or calls a judge model.
    """
    from finesmith.graders.grading import uses_models, validate

    grader = validate(spec, param=param)
    if uses_models(grader):
        raise FinesmithError(f"{param}: score_model and label_model graders need a judge model, which training "
                             "does not run; use string_check, text_similarity, python or multi graders")
    return grader


def load_rewards(specs: list[Any], weights: list[float] | None = None, base: Path | None = None) -> list[Reward]:
    """The reward functions `specs` name (or grader objects), with their weights (1 each by default).

    Raises:
        FinesmithError: a spec that names no file, no function, or a bad built-in; an invalid grader.
    """
    if not specs:
        raise FinesmithError("objective grpo needs a reward: set `reward: rewards.py:function` (or a built-in: "
                             "exact_match, regex:PATTERN, length:MIN-MAX)")
    weights = list(weights or [])
    if weights and len(weights) != len(specs):
        raise FinesmithError(f"config: `reward_weights` has {len(weights)} values for {len(specs)} rewards; "
                             "give one weight per reward")
    out = []
    for i, spec in enumerate(specs):
        weight = weights[i] if weights else 1.0
        if isinstance(spec, dict):
            out.append(grader_reward(check_grader(spec, f"reward[{i}]" if len(specs) > 1 else "reward"), weight))
        else:
            out.append(Reward(spec, resolve(spec, base), weight, isolated=True,
                              base=str(base) if base is not None else None))
    return out


def resolve(spec: str, base: Path | None = None) -> Callable[..., Any]:
    if spec == "exact_match":
        return exact_match
    if spec.startswith("regex:"):
        try:
            return regex_reward(spec[len("regex:"):])
        except re.error as exc:
            raise FinesmithError(f"reward {spec}: not a valid regular expression ({exc})") from None
    if spec.startswith("length:"):
        match = re.fullmatch(r"(\d+)-(\d+)", spec[len("length:"):])
        if not match or int(match.group(1)) > int(match.group(2)):
            raise FinesmithError(f"reward {spec}: write the band as length:MIN-MAX, e.g. length:10-80")
        return length_reward(int(match.group(1)), int(match.group(2)))
    path_text, _, name = spec.rpartition(":")
    if not path_text or not name:
        raise FinesmithError(f"reward {spec!r}: write it as path/to/module.py:function, or use a built-in "
                             "(exact_match, regex:PATTERN, length:MIN-MAX)")
    path = Path(path_text)
    if not path.is_absolute() and base is not None and not path.is_file():
        path = base / path
    if not path.is_file():
        raise FinesmithError(f"reward {spec}: no file {path_text}; give the path of a Python file")
    module_spec = importlib.util.spec_from_file_location(f"finesmith_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise FinesmithError(f"reward {spec}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise FinesmithError(f"reward {spec}: {path} has no function {name}")
    params = inspect.signature(function).parameters
    if "completion" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise FinesmithError(f"reward {spec}: the function must take `completion` (and may take prompt, "
                             "reference and the example's other fields, or **kwargs)")
    return function


# ---- the reward process -----------------------------------------------------------------------

STOP_GRACE_S = 1.0  # after a stop signal, how long rewards still running may take before they are abandoned
POLL_S = 0.05  # how often a wait for a reward looks at whether a stop signal came


class RewardScorer:
    """Scores completions with `rewards`: the isolated ones in a reward process, each call under
    `timeout` seconds; the others (functions handed over directly, as tests do) in this process.

    The process starts on the first call and lives as long as the scorer (or this process:
    Linux kills it when its parent dies).
    """

    def __init__(self, rewards: Sequence[Reward], timeout: float) -> None:
        self.rewards, self.timeout = list(rewards), timeout
        self.process: subprocess.Popen | None = None
        self.send: Connection | None = None
        self.receive: Connection | None = None
        self._finalizer: Any = None

    def score(self, calls: Sequence[tuple[str, str, dict[str, Any], str]]) -> list[list[float]] | None:
        """`[len(calls)][len(rewards)]` scores of `(prompt, completion, fields, source)` calls,
        or None when a stop signal (SIGTERM, SIGINT) came while rewards were still running.

        Raises:
            FinesmithError: a reward failed, returned a non-number or took longer than the timeout.
        """
        out = [[0.0] * len(self.rewards) for _ in calls]
        remote = [k for k, r in enumerate(self.rewards) if r.isolated]
        for k, reward in enumerate(self.rewards):
            if not reward.isolated:
                for i, (prompt, completion, fields, source) in enumerate(calls):
                    out[i][k] = reward(prompt, completion, fields, source)
        if not remote or not calls:
            return out
        jobs = [(i, k) for i in range(len(calls)) for k in remote]
        with _StopWatch() as stop:
            if not self._start(stop):
                return None
            self.send.send(("score", [(k, *calls[i]) for i, k in jobs]))
            for i, k in jobs:
                kind, value = self._next(stop, f"reward {self.rewards[k].name}", calls[i][3])
                if kind == "stopped":
                    return None
                if kind == "error":
                    self.close()
                    raise FinesmithError(value)
                out[i][k] = value
        return out

    def _start(self, stop: "_StopWatch") -> bool:
        """Start the reward process if it is not running; False: a stop signal came meanwhile."""
        if self.process is not None and self.process.poll() is None:
            return True
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "finesmith.train.rewards", str(child_read), str(child_write), str(os.getpid())],
                pass_fds=(child_read, child_write), stdin=subprocess.DEVNULL)
        finally:
            os.close(child_read)
            os.close(child_write)
        self.send, self.receive = Connection(parent_write, readable=False), Connection(parent_read, writable=False)
        self._finalizer = weakref.finalize(self, _end, self.process, self.send, self.receive)
        self.send.send(("load", [(r.name, r.base) if r.isolated else None for r in self.rewards]))
        # importing the user's modules gets the per-call timeout too, and at least 60 s
        kind, value = self._next(stop, "loading the reward functions", "start", max(60.0, self.timeout))
        if kind == "error":
            self.close()
            raise FinesmithError(value)
        return kind != "stopped"

    def _next(self, stop: "_StopWatch", what: str, source: str, timeout: float | None = None) -> tuple[str, Any]:
        """The reward process's next answer: ("ok", value), ("error", message) or ("stopped", None)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if stop.seen is not None and time.monotonic() > stop.seen + STOP_GRACE_S:
                self.close()  # a reward still running when the run must stop: abandon it
                return "stopped", None
            try:
                ready = self.receive.poll(POLL_S)
            except (EOFError, OSError):
                ready = True
            if ready:
                try:
                    return self.receive.recv()
                except (EOFError, OSError):
                    code = self.process.wait()
                    self.close()
                    return "error", (f"{what} on {source}: the reward process ended (exit code {code}); a reward "
                                     "function must return a number, not exit")
            if time.monotonic() > deadline:
                self.close()
                return "error", (f"{what} did not return within {timeout:g} s on {source}; reward functions run in "
                                 f"their own process and each call must finish within `grpo.reward_timeout` "
                                 f"({timeout:g} s): make it faster or raise the timeout")

    def close(self) -> None:
        """End the reward process (a later call starts a new one)."""
        if self._finalizer is not None:
            self._finalizer()
        self.process = self.send = self.receive = self._finalizer = None


def _end(process: subprocess.Popen, *connections: Connection) -> None:
    for connection in connections:
        connection.close()
    if process.poll() is None:
        process.kill()
        process.wait()


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when its parent dies (PR_SET_PDEATHSIG), so a reward process
    never outlives the run; ignore Ctrl-C, which the training process handles for both. Set
    here rather than between fork and exec (`preexec_fn` is unsafe in a process with threads)."""
    import ctypes

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


class _StopWatch:
    """While rewards run: note when SIGTERM/SIGINT arrives, and still hand it to the handler
    that was there (the training loop's, which asks for a checkpoint and a stop)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.seen: float | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopWatch":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if callable(previous):  # SIG_DFL / SIG_IGN: nothing to chain, the signal acts as it would
                    self.previous[sig] = previous
                    signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.seen is None:
            self.seen = time.monotonic()
        self.previous[signum](signum, frame)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def serve_rewards(read_fd: int, write_fd: int, parent: int) -> None:
    """The reward process: load the rewards, then answer each score request call by call."""
    _die_with_parent(parent)
    receive, send = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    os.dup2(2, 1)  # a reward's print() goes to stderr, never into the answers
    rewards: list[Reward | None] = []
    while True:
        try:
            kind, payload = receive.recv()
        except EOFError:
            return
        if kind == "load":
            try:
                rewards = [Reward(spec[0], resolve(spec[0], Path(spec[1]) if spec[1] else None))
                           if spec else None for spec in payload]
            except FinesmithError as exc:
                send.send(("error", str(exc)))
                continue
            send.send(("ok", None))
        elif kind == "score":
            for k, prompt, completion, fields, source in payload:
                try:
                    send.send(("ok", rewards[k](prompt, completion, fields, source)))
                except FinesmithError as exc:
                    send.send(("error", str(exc)))
                except BaseException as exc:  # noqa: BLE001 - e.g. SystemExit from user code
                    send.send(("error", f"reward {rewards[k].name} failed on {source}: {type(exc).__name__}: {exc}"))


if __name__ == "__main__":
    serve_rewards(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
