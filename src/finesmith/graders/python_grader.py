"""`python` graders: user source defining `grade(sample, item) -> float`, run in a sandbox.

Each grading runs the source in a separate process: `sys.executable -I` (no PYTHONPATH, no user
site, the script's folder not on sys.path), a fresh empty temporary working directory (also
HOME and TMPDIR), an environment of a few fixed variables only, its own session (so the whole
process group is killed at the end), and in the child, before the user's code runs:

- resource limits: address space (`memory_mb`, RLIMIT_AS), CPU time (RLIMIT_CPU: the wall limit
  on two cores, + 1 s), size of any file written (`file_mb`, RLIMIT_FSIZE), no core dumps;
- no network: the child moves into a new, empty network namespace (`unshare(CLONE_NEWNET)`,
  or a new user + network namespace where that is allowed unprivileged). Either way, socket
  creation, connect, bind and name lookups are refused inside Python (an audit hook and
  `socket` functions that raise); where no namespace could be made, starting other programs
  (subprocess, os.system, os.exec*, os.posix_spawn, os.fork) is refused as well, since a
  program started outside Python would not meet the in-Python block;
- where it can (root, or unprivileged user namespaces), the child also makes a new PID and
  mount namespace and runs the grader as its process 1 with its own /proc: the grader sees and
  can signal no other process, and anything it starts is killed when it ends (daemons too);
- run as root, the child gives up every capability (bounding set emptied, no_new_privs), so it
  cannot leave the namespaces, mount, trace, or override file permissions. It keeps root's
  uid, though (files root owns stay readable to it): run the server as a dedicated user when
  graders come from people you do not trust;
- `print` output goes to stderr, which is kept (its tail) for error messages, never parsed.

The parent waits at most `timeout_s` (wall time) and then kills the process group. A grader
that loops forever, allocates without bound, opens a socket, raises, exits, crashes or
returns something that is not a finite number fails that grading only: reward 0, an error
flag (`unresponsive_reward_error` for a timeout, `python_grader_runtime_error` with one line
of details otherwise, `python_grader_server_error` when the sandbox itself failed).

The hosted service's limits are the defaults: 2 minutes, 2 GB of memory, source under 256 kB.
Starting the sandbox costs about 50 ms a grading (one Python start-up); `prestart=N` keeps N
sandboxes started in advance (each waits, limits set and network gone, for its one payload;
each still serves one grading only), which leaves about 10 ms.
`image_tag` is accepted and ignored: the grader runs with this server's Python and packages.
"""

from __future__ import annotations

import ast
import atexit
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from finesmith.graders.result import GraderError, GradingFailure

MAX_SOURCE_BYTES = 256 * 1024


@dataclass(frozen=True)
class PythonLimits:
    """The sandbox's limits for one grading."""

    timeout_s: float = 120.0  # wall time, start to answer (the hosted limit: 2 minutes)
    memory_mb: int = 2048  # address space (the hosted limit: 2 GB)
    file_mb: int = 1024  # the largest file the grader may write (the hosted disk: 1 GB)
    stderr_tail: int = 2000  # characters of stderr kept for error details
    network_namespace: bool = True  # try a new network namespace (False: the in-Python block alone, as where none can be made)
    prestart: int = 0  # sandboxes kept started in advance for these limits (saves the start, ~45 ms, per grading)


DEFAULT_LIMITS = PythonLimits()


def validate(grader: dict[str, Any], param: str) -> dict[str, Any]:
    source = grader.get("source")
    if not isinstance(source, str) or not source.strip():
        raise GraderError(f"{param}.source", "must be the Python source of a module defining grade(sample, item)")
    if len(source.encode("utf-8", "replace")) > MAX_SOURCE_BYTES:
        raise GraderError(f"{param}.source", f"is {len(source.encode('utf-8', 'replace'))} bytes; python graders "
                          f"must be under {MAX_SOURCE_BYTES // 1024} kB")
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise GraderError(f"{param}.source", f"is not valid Python: {exc.msg} (line {exc.lineno})") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise GraderError(f"{param}.source", f"cannot be parsed: {type(exc).__name__}") from None
    grade = next((node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.name == "grade"), None)
    if grade is None:
        raise GraderError(f"{param}.source", "must define a top-level function grade(sample, item) -> float")
    if isinstance(grade, ast.AsyncFunctionDef):
        raise GraderError(f"{param}.source", "grade must be a plain function (def), not async def")
    positional = len(grade.args.posonlyargs) + len(grade.args.args)
    if positional < 2 and grade.args.vararg is None:
        raise GraderError(f"{param}.source", "grade must take two arguments: grade(sample, item)")
    image_tag = grader.get("image_tag")
    if image_tag is not None and not isinstance(image_tag, str):
        raise GraderError(f"{param}.image_tag", f"must be a string, not {type(image_tag).__name__}")
    out = {"type": "python", "name": grader["name"], "source": source}
    if image_tag is not None:
        out["image_tag"] = image_tag
    return out


# The child's first code: trusted, runs before the user's. Arguments: the limits as JSON.
# Reads {"source", "sample", "item"} as JSON on stdin; writes one JSON answer to the saved stdout.
BOOTSTRAP = r'''
import json, os, sys
limits = json.loads(sys.argv[1])
answer_fd = os.dup(1)
os.dup2(2, 1)

def answer(obj):
    data = json.dumps(obj).encode()
    while data:
        data = data[os.write(answer_fd, data):]
    os._exit(0)

netns = pidns = False
libc = None
NEWNS, NEWUSER, NEWPID, NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
if limits["netns"]:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for flags in (NEWNET | NEWPID | NEWNS, NEWUSER | NEWNET | NEWPID | NEWNS, NEWNET, NEWUSER | NEWNET):
            if libc.unshare(flags) == 0:
                netns, pidns = True, bool(flags & NEWPID)
                break
    except Exception:
        pass

import resource
def cap(kind, soft, hard=None):
    try:
        old_soft, old_hard = resource.getrlimit(kind)
        hard = soft if hard is None else hard
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(kind, (soft, hard))
    except (ValueError, OSError):
        pass
cap(resource.RLIMIT_AS, limits["memory"])
cap(resource.RLIMIT_CPU, limits["cpu"], limits["cpu"] + 1)
cap(resource.RLIMIT_FSIZE, limits["fsize"])
cap(resource.RLIMIT_CORE, 0)

if pidns:
    # the grader runs as process 1 of a new PID namespace: it cannot see or signal this machine's
    # processes, and whatever it starts ends with it (the kernel kills a namespace whose process 1 ends)
    import signal
    child = os.fork()
    if child:
        os.close(answer_fd)
        os.close(0)
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        if os.WIFSIGNALED(status):
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
            os.kill(os.getpid(), os.WTERMSIG(status))
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    try:  # a /proc of the new namespace, in a private mount namespace (nothing propagates out)
        MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x4000, 0x40000, 0x2, 0x4, 0x8
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0:
            libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    except Exception:
        pass

if os.geteuid() == 0 and libc is not None:
    # root: give up every capability (and the power to regain them), so the grader cannot undo the
    # namespaces (setns needs CAP_SYS_ADMIN), mount, trace, or override file permissions
    try:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        for number in range(64):
            libc.prctl(24, number, 0, 0, 0)  # PR_CAPBSET_DROP
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2): none
        libc.capset(header, data)
    except Exception:
        pass

import socket, _socket
NO_NET = "network access is disabled for python graders"
def refuse(*args, **kwargs):
    raise PermissionError(NO_NET)
class NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError(NO_NET)
socket.socket = NoSocket
for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
             "gethostbyaddr", "getnameinfo", "socketpair", "fromfd"):
    setattr(socket, name, refuse)
for name in ("socket", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo",
             "socketpair"):
    setattr(_socket, name, refuse)
BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
           "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto", "socket.sendmsg"}
if not netns:
    BLOCKED |= {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                "os.forkpty", "pty.spawn"}
def hook(event, args):
    if event in BLOCKED:
        if event.startswith("socket."):
            raise PermissionError(NO_NET)
        raise PermissionError(f"{event} is disabled for python graders on this server (no network namespace)")
sys.addaudithook(hook)

try:
    payload = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
except Exception as exc:
    answer({"ok": False, "kind": "server", "error": f"bad payload: {type(exc).__name__}"})

def one_line(exc):
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:500]

try:
    namespace = {"__name__": "grader", "__builtins__": __builtins__}
    exec(compile(payload["source"], "grader.py", "exec"), namespace)
    grade = namespace.get("grade")
    if not callable(grade):
        answer({"ok": False, "kind": "runtime", "error": "the source defines no function grade(sample, item)"})
    value = grade(payload["sample"], payload["item"])
except MemoryError as exc:
    del exc
    answer({"ok": False, "kind": "memory", "error": "MemoryError"})
except BaseException as exc:
    import traceback
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "grader.py"]
    where = f" (grader.py line {frames[-1].lineno})" if frames else ""
    answer({"ok": False, "kind": "runtime", "error": one_line(exc) + where})
try:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        answer({"ok": False, "kind": "runtime",
                "error": f"grade returned {type(value).__name__}, not a number (int or float)"})
    answer({"ok": True, "value": float(value), "netns": netns, "pidns": pidns})
except BaseException as exc:
    answer({"ok": False, "kind": "runtime", "error": one_line(exc)})
'''

BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "2",
            "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}


def run(source: str, sample: dict[str, Any], item: Any, limits: PythonLimits = DEFAULT_LIMITS) -> float:
    """`grade(sample, item)` of `source`, computed in the sandbox (see the module docstring).

    Raises:
        GradingFailure: the grader timed out, failed, returned a non-number, or the sandbox failed.
    """
    try:
        payload = json.dumps({"source": source, "sample": sample, "item": {} if item is None else item},
                             allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise GradingFailure("other_error", f"the sample or item cannot be passed to a python grader: {exc}") from None
    box = _take(limits)
    try:
        timed_out = box.finish(payload, limits.timeout_s)
        if timed_out:
            raise GradingFailure("unresponsive_reward_error",
                                 f"grade() did not return within {limits.timeout_s:g} s (the wall-time limit)",
                                 python_grader_runtime_error_details=f"TimeoutError: grade() did not return "
                                 f"within {limits.timeout_s:g} s")
        raw, stderr = box.read(limits.stderr_tail)
        code = box.process.returncode
    finally:
        box.close()
    return _answer(raw, code, stderr, limits)


class _Sandbox:
    """One sandbox process, started and waiting (in the bootstrap) for its one payload."""

    def __init__(self, limits: PythonLimits) -> None:
        child_limits = json.dumps({"memory": max(64, limits.memory_mb) << 20, "cpu": cpu_seconds(limits),
                                   "fsize": max(1, limits.file_mb) << 20, "netns": limits.network_namespace})
        self.home = tempfile.mkdtemp(prefix="finesmith-grader-")
        self.out, self.err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        env = {**BASE_ENV, "HOME": self.home, "TMPDIR": self.home}
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", BOOTSTRAP, child_limits], stdin=subprocess.PIPE, stdout=self.out,
                stderr=self.err, cwd=self.home, env=env, start_new_session=True, close_fds=True)
        except OSError as exc:
            self._cleanup()
            raise GradingFailure("python_grader_server_error", f"could not start the python grader: {exc}",
                                 python_grader_server_error_type="start_failed") from None

    def finish(self, payload: bytes, timeout: float) -> bool:
        """Send the payload and wait for the process to end; True when it ran out of time (then killed)."""
        try:
            self.process.communicate(payload, timeout=timeout)
            return False
        except subprocess.TimeoutExpired:
            return True
        finally:
            _kill_group(self.process)
            self.process.wait()

    def read(self, tail: int) -> tuple[bytes, str]:
        """The answer the bootstrap wrote, and the last `tail` characters of stderr."""
        self.out.seek(0)
        raw = self.out.read(1 << 20)
        self.err.seek(0, os.SEEK_END)
        self.err.seek(max(0, self.err.tell() - 4 * tail))
        return raw, self.err.read().decode("utf-8", "replace")[-tail:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        """End the process group (if still there) and remove its files."""
        if self.process.poll() is None:
            _kill_group(self.process)
            self.process.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        self.out.close()
        self.err.close()
        shutil.rmtree(self.home, ignore_errors=True)


# ---- started-in-advance sandboxes (PythonLimits.prestart) --------------------------------------

_spares: dict[PythonLimits, list[_Sandbox]] = {}
_refilling: set[PythonLimits] = set()
_spares_lock = threading.Lock()


def _take(limits: PythonLimits) -> _Sandbox:
    """A sandbox for one grading: a spare started in advance when `limits.prestart` asks for
    them (and one is ready), else a new one."""
    if limits.prestart <= 0:
        return _Sandbox(limits)
    box = None
    with _spares_lock:
        spares = _spares.setdefault(limits, [])
        while spares and box is None:
            candidate = spares.pop()
            if candidate.alive():
                box = candidate
            else:
                candidate.close()
        if limits not in _refilling:
            _refilling.add(limits)
            threading.Thread(target=_refill, args=(limits,), name="grader-sandbox-refill", daemon=True).start()
    return box if box is not None else _Sandbox(limits)


def _refill(limits: PythonLimits) -> None:
    try:
        while True:
            with _spares_lock:
                if len(_spares.get(limits, [])) >= limits.prestart:
                    return
            try:
                box = _Sandbox(limits)
            except GradingFailure:
                return
            with _spares_lock:
                _spares.setdefault(limits, []).append(box)
    finally:
        with _spares_lock:
            _refilling.discard(limits)


def close_spares() -> None:
    """End every sandbox started in advance (at exit; a later grading starts new ones)."""
    with _spares_lock:
        boxes = [box for spares in _spares.values() for box in spares]
        _spares.clear()
    for box in boxes:
        box.close()


atexit.register(close_spares)


def cpu_seconds(limits: PythonLimits) -> int:
    """The CPU-time limit: the wall limit on two cores (the hosted graders' CPU share), + 1 s."""
    return int(math.ceil(2 * limits.timeout_s)) + 1


def _answer(raw: bytes, code: int, stderr: str, limits: PythonLimits) -> float:
    try:
        reply = json.loads(raw) if raw else None
    except ValueError:
        reply = None
    if isinstance(reply, dict) and reply.get("ok") is True and isinstance(reply.get("value"), float):
        value = reply["value"]
        if not math.isfinite(value):
            raise _runtime(f"grade returned {value}, not a finite number")
        return value
    if isinstance(reply, dict) and reply.get("ok") is False:
        kind, error = reply.get("kind"), str(reply.get("error", ""))[:500]
        if kind == "memory":
            raise _runtime(f"MemoryError: the grader went over its memory limit ({limits.memory_mb} MB)")
        if kind == "server":
            raise GradingFailure("python_grader_server_error", error, python_grader_server_error_type="sandbox")
        raise _runtime(error)
    if code is not None and code < 0:
        sig = -code
        if sig == signal.SIGXCPU:
            raise GradingFailure("unresponsive_reward_error", f"the grader used more than its CPU-time limit "
                                 f"({cpu_seconds(limits)} s)",
                                 python_grader_runtime_error_details="TimeoutError: CPU-time limit")
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        detail = "MemoryError" if "MemoryError" in stderr else f"killed by {name}"
        raise _runtime(f"the grader process ended: {detail}")
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    if "MemoryError" in stderr:
        raise _runtime(f"MemoryError: the grader went over its memory limit ({limits.memory_mb} MB)")
    raise _runtime(f"the grader process exited with code {code} before grade() returned"
                   + (f": {last[:300]}" if last else ""))


def _runtime(message: str) -> GradingFailure:
    return GradingFailure("python_grader_runtime_error", message, python_grader_runtime_error_details=message)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it leads its own session): the child and anything it started."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def sandbox_report(limits: PythonLimits | None = None, calls: int = 5) -> dict[str, Any]:
    """What the sandbox enforces on this machine, measured: whether the network (and PID)
    namespaces can be made, and the median wall time of a trivial grading (the per-call cost)."""
    limits = limits or PythonLimits(timeout_s=10.0)
    probe = "import os\ndef grade(sample, item):\n    return 1.0 if os.getpid() == 1 else 0.0\n"
    times, own_pids = [], 0.0
    for _ in range(max(1, calls)):
        start = time.perf_counter()
        own_pids = run(probe, {"output_text": ""}, {}, limits)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"network_namespace": _netns_available() and limits.network_namespace,
            "pid_namespace": own_pids == 1.0, "overhead_s": times[len(times) // 2],
            "timeout_s": limits.timeout_s, "memory_mb": limits.memory_mb, "cpu_s": cpu_seconds(limits)}


def _netns_available() -> bool:
    code = ("import ctypes,sys\nlibc=ctypes.CDLL(None,use_errno=True)\n"
            "sys.exit(0 if libc.unshare(0x40000000)==0 or libc.unshare(0x50000000)==0 else 1)")
    try:
        return subprocess.run([sys.executable, "-I", "-c", code], timeout=10, env=BASE_ENV).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
