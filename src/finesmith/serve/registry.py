"""The models one server serves: base models named on the command line, each fine-tuned
model a job has produced, under its `ft:` name, and each of a job's checkpoints under
`ft:...:ckpt-step-N`, as `GET /v1/fine_tuning/jobs/{id}/checkpoints` names them. A model is
loaded on its first request (in a thread, so the event loop goes on). A checkpoint that
training has since rotated away drops out of the list.

LoRA runs and checkpoints of one base, and that base itself, share one loaded model and one
generation worker (`finesmith.serve.adapters`): each name is a view that routes its requests
to its adapter, adapters load on first use and at most `max_adapters` stay loaded (least
recently used dropped). Every other model (full-weight runs, exported models, `.gguf` files,
adapters that cannot be mixed in a batch) loads as its own engine with its own worker.
"""

from __future__ import annotations

import threading
from pathlib import Path

from finesmith.serve.adapters import DEFAULT_MAX_ADAPTERS, SharedBase, load_shared_base, shared_spec
from finesmith.serve.engine import DEFAULT_QUEUE_SIZE, ChatEngine, load_engine, served_name


class ModelRegistry:
    """Name → model spec, and the engines loaded so far (`max_adapters` 0: no shared bases, every
    fine-tune merged into its own model)."""

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE, precision: str = "auto",
                 max_adapters: int = DEFAULT_MAX_ADAPTERS) -> None:
        self.queue_size, self.precision, self.max_adapters = queue_size, precision, max_adapters
        self.bases: dict[tuple[str, int], SharedBase] = {}  # one per loaded base that adapters share
        self.specs: dict[str, str] = {}
        self.owners: dict[str, str] = {}
        self.engines: dict[str, ChatEngine] = {}
        self.checkpoints: set[str] = set()  # names whose spec is a checkpoint folder (it may be rotated away)
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def add(self, spec: str, name: str | None = None, owner: str = "finesmith") -> str:
        name = name or served_name(spec)
        with self._lock:
            self.specs[name], self.owners[name] = spec, owner
        return name

    def add_checkpoints(self, run: str | Path, name: str) -> list[str]:
        """Serve the run's checkpoints present now as `{name}:ckpt-step-N`; the names added."""
        from finesmith.train.checkpoint import list_checkpoints

        added = []
        for step, folder in list_checkpoints(Path(run)):
            added.append(self.add(str(folder), checkpoint_name(name, step), owner="user"))
            with self._lock:
                self.checkpoints.add(added[-1])
        return added

    def _present(self, name: str) -> bool:
        return name not in self.checkpoints or Path(self.specs[name]).is_dir()

    def add_engine(self, engine: ChatEngine, spec: str | None = None) -> str:
        """Serve an engine that is already loaded (the single-model server, tests)."""
        with self._lock:
            self.specs[engine.name], self.owners[engine.name] = spec or engine.name, "finesmith"
            self.engines[engine.name] = engine
        return engine.name

    def names(self) -> list[str]:
        with self._lock:
            return [name for name in self.specs if self._present(name)]

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self.specs and self._present(name)

    def spec(self, name: str) -> str:
        with self._lock:
            return self.specs[name]

    def engine(self, name: str) -> ChatEngine:
        """The loaded engine of `name`, loading it now if needed (blocking: call from a thread)."""
        with self._lock:
            if name in self.engines:
                return self.engines[name]
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:  # one load per model, however many requests ask at once
            with self._lock:
                if name in self.engines:
                    return self.engines[name]
            engine = self._load(name, self.spec(name))
            with self._lock:
                self.engines[name] = engine
            return engine

    def _load(self, name: str, spec: str) -> ChatEngine:
        shared = shared_spec(spec) if self.max_adapters > 0 else None
        if shared is None:
            engine = load_engine(spec, queue_size=self.queue_size, precision=self.precision)
            engine.name = name
            return engine
        with self._lock:
            loading = self._loading.setdefault(f"base:{shared.key}", threading.Lock())
        with loading:  # one load per base, whichever of its fine-tunes asks first
            with self._lock:
                base = self.bases.get(shared.key)
            if base is None:
                base = load_shared_base(shared, served_name(shared.base), self.queue_size, self.precision,
                                        self.max_adapters)
                with self._lock:
                    self.bases[shared.key] = base
        return base.view(name, base.tokenizer_of(shared.tokenizer), shared.adapter)

    def loaded(self) -> list[ChatEngine]:
        """The engines that own a model and a worker (a shared base once, however many names it serves)."""
        with self._lock:
            engines = [getattr(e, "core", e) for e in self.engines.values()]
        return list({id(e): e for e in engines}.values())

    def close(self) -> None:
        for engine in self.loaded():
            engine.close()

    def join(self, timeout: float) -> None:
        for engine in self.loaded():
            engine.join(timeout)


def checkpoint_name(fine_tuned: str, step: int) -> str:
    """The hosted API's name of a job's checkpoint model."""
    return f"{fine_tuned}:ckpt-step-{step}"
