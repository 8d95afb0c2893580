"""Many fine-tunes on one base: LoRA runs and checkpoints served unmerged from one loaded model.

A LoRA adapter is a few MiB; merging it (`load_engine`) copies the whole base for every
fine-tune. Instead, every served name whose model is "this base + a LoRA adapter" is a view
(`AdapterView`) of one `SharedBase` engine: one base model, one generation worker, and the
adapters attached to it by PEFT under short ids (`a0`, `a1`, ...; served names may contain
dots, which module names may not). A batch mixes requests for different adapters, and the base
itself (`__base__`): each row is routed to its adapter by peft's `adapter_names` through the
prefill and every decode step (`finesmith.serve.batch`). Each view keeps its own tokenizer,
so a run's saved chat template and stop tokens still apply to its requests (views whose
tokenizer files are byte-identical share one tokenizer object). Loading and dropping
adapters hands the freed heap back to the system (`malloc_trim`), so resident memory tracks
the adapters actually loaded.

Two specs share a base when they load the same model: the same base files (the fingerprint
of `finesmith.model.load.model_fingerprint`, taken now, of the run record's base spec) resized
to the same vocabulary (the record's `vocab_size`; a run that added tokens has its own). The
base named on its own (`finesmith serve BASE RUN...`) is the same model with no adapter.

Adapters load on the first request that needs them, in the worker between batches (so a
forward pass never sees the module tree change), and beyond `max_adapters` the least recently
used one is dropped (it loads again when asked for). One batch holds at most `max_adapters`
distinct adapters; requests for more wait for the next batch.

What gets its own engine (merged, as before): full-weight runs, exported or `.gguf` models,
QLoRA runs (their base is the dequantised 4-bit one), and adapters that peft cannot mix in a
batch: DoRA, IA3, prompt and prefix tuning, LoRA variants on layers without a mixed-batch
forward, and LoRA runs that trained modules in full (`lora.modules_to_save`, e.g. embeddings
for added tokens: peft 0.21's mixed-batch forward of those copies fails with tied
embeddings). `max_adapters=0` turns sharing off altogether.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finesmith.errors import FinesmithError
from finesmith.serve.engine import DEFAULT_QUEUE_SIZE, ChatEngine, Generation

DEFAULT_MAX_ADAPTERS = 8
BASE = "__base__"  # peft's name for "no adapter" in `adapter_names`


@dataclass(frozen=True)
class SharedSpec:
    """How a served spec maps onto a shared base.

    Attributes:
        key: the identity of the loaded base (fingerprint, vocabulary size).
        base: the spec to load the base from.
        vocab: the vocabulary the base is resized to, as in training.
        tokenizer: where this name's tokenizer (and chat template) comes from.
        adapter: the LoRA adapter folder; None for the base itself.
    """

    key: tuple[str, int]
    base: str
    vocab: int
    tokenizer: str
    adapter: str | None = None


def shared_spec(spec: str) -> SharedSpec | None:
    """The shared-base form of `spec` (a LoRA run, a LoRA checkpoint or a plain base model), or
    None when it must load as its own engine."""
    from finesmith.model.methods import checkpoint_run
    from finesmith.run import has_record, load_run

    path = Path(spec)
    try:
        if path.is_dir() and checkpoint_run(path) is not None:
            run_folder = checkpoint_run(path)
        elif path.is_dir() and has_record(path):
            run_folder = path
        elif path.is_dir() and (path / "adapter_config.json").is_file():
            return None  # a bare adapter folder: load_engine says what to do
        else:
            if path.suffix.lower() == ".gguf":
                return None
            return _base_spec(spec)
        run = load_run(run_folder)
        if run.record.kind != "run" or not run.record.adapter or run.record.method_name != "lora":
            return None
        if not mixable(path):
            return None
        vocab = int(run.record.tokenizer.get("vocab_size") or 0)
        if not vocab:
            return None
        fingerprint, size = _base_identity(run.base_spec)
        return SharedSpec((fingerprint, max(size, vocab)), run.base_spec, max(size, vocab), str(run_folder), str(path))
    except (FinesmithError, OSError, ValueError):
        return None  # load_engine reports what is wrong with it


def mixable(folder: Path) -> bool:
    """Whether the adapter in `folder` is a LoRA that peft can mix with others in one batch."""
    config_file = folder / "adapter_config.json"
    weights = ("adapter_model.safetensors", "adapter_model.bin")
    if not config_file.is_file() or not any((folder / name).is_file() for name in weights):
        return False  # load_engine says what is missing
    config = json.loads(config_file.read_text(encoding="utf-8"))
    # Modules trained as full copies (`modules_to_save`, e.g. the embeddings for added tokens) are
    # left out: peft 0.21's mixed-batch forward of such a copy fails when the embeddings are tied.
    return (config.get("peft_type") == "LORA" and not config.get("use_dora") and not config.get("layer_replication")
            and not config.get("alora_invocation_tokens") and not config.get("use_qalora")
            and not config.get("modules_to_save") and not config.get("trainable_token_indices"))


def _base_spec(spec: str) -> SharedSpec | None:
    from finesmith.model.load import load_chat_tokenizer, resolve_model_path

    _, gguf = resolve_model_path(spec)
    if gguf:
        return None
    tokenizer, _ = load_chat_tokenizer(spec)
    fingerprint, size = _base_identity(spec)
    vocab = max(size, len(tokenizer))
    return SharedSpec((fingerprint, vocab), spec, vocab, spec)


def _base_identity(spec: str) -> tuple[str, int]:
    """The base's file fingerprint and the vocabulary size its config declares (0 if unknown)."""
    from finesmith.model.load import model_fingerprint, resolve_model_path

    fingerprint = model_fingerprint(spec)
    config_file = Path(resolve_model_path(spec)[0]) / "config.json"
    size = 0
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        size = int(config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 0)
    return fingerprint, size


class SharedBase(ChatEngine):
    """One base model and its worker, serving the base and any number of LoRA adapters.

    Args:
        model: the base model, in eval mode and the serving dtype.
        tokenizer: a tokenizer of the base (the pad token for batches; views bring their own).
        name: the name in status reports (the base's).
        queue_size: requests allowed to wait, all views together.
        max_adapters: adapters kept loaded at once (least recently used dropped beyond).
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, queue_size: int = DEFAULT_QUEUE_SIZE,
                 max_adapters: int = DEFAULT_MAX_ADAPTERS) -> None:
        super().__init__(model, tokenizer, name, queue_size)
        if max_adapters < 1:
            raise FinesmithError(f"a shared base needs room for at least 1 adapter, not {max_adapters}")
        self.base = model  # the plain model: the same object inside the PeftModel once adapters attach
        self.max_adapters = max_adapters
        self.folders: dict[str, str] = {}  # adapter id -> folder, every adapter ever asked for
        self.resident: OrderedDict[str, None] = OrderedDict()  # loaded adapter ids, least recently used first
        self.loads = 0  # adapter loads so far (reloads after eviction included)
        self.tokenizers: dict[str, Any] = {}  # digest of the tokenizer files -> the tokenizer the views share
        self._tokenizer_lock = threading.Lock()

    def tokenizer_of(self, source: str) -> Any:
        """The chat tokenizer of `source` (a run folder or the base), shared by views whose files are the same."""
        from finesmith.model.load import load_chat_tokenizer

        digest = tokenizer_digest(source)
        with self._tokenizer_lock:
            if digest is None or digest not in self.tokenizers:
                tokenizer = load_chat_tokenizer(source)[0]
                if digest is None:
                    return tokenizer
                self.tokenizers[digest] = tokenizer
            return self.tokenizers[digest]

    def view(self, name: str, tokenizer: Any, adapter: str | None) -> AdapterView:
        """The engine clients address as `name`: this base with the adapter in folder `adapter` (None: none)."""
        adapter_id = None
        if adapter is not None:
            with self._state:
                adapter_id = next((a for a, f in self.folders.items() if f == adapter), None)
                if adapter_id is None:
                    adapter_id = f"a{len(self.folders)}"
                    self.folders[adapter_id] = adapter
        return AdapterView(self, name, tokenizer, adapter_id)

    def _fits(self, batch: list[Generation], generation: Generation) -> bool:
        wanted = {_adapter_id(g) for g in batch + [generation]} - {None}
        return len(wanted) <= self.max_adapters

    def _adapter_for(self, generation: Generation) -> str | None:
        if not hasattr(self.model, "peft_config"):
            return None  # no adapter loaded yet: every row is the base
        return _adapter_id(generation) or BASE

    def _run(self, generations: list[Generation]) -> dict[int, tuple[str, BaseException | None]]:
        """Load the adapters this batch needs (dropping the least recently used beyond the limit), then generate."""
        failed = self._make_resident({a for a in map(_adapter_id, generations) if a is not None})
        outcome = {id(g): ("error", failed[_adapter_id(g)]) for g in generations if _adapter_id(g) in failed}
        ready = [g for g in generations if id(g) not in outcome]
        if ready:
            outcome.update(super()._run(ready))
        return outcome

    def _make_resident(self, wanted: set[str]) -> dict[str, BaseException]:
        """Worker side, between batches: attach the `wanted` adapters; those that failed to load."""
        from finesmith.model.methods import attach_adapter

        missing = [a for a in wanted if a not in self.resident]
        for adapter_id in list(self.resident):  # make room first: peak memory stays at max_adapters
            if len(self.resident) + len(missing) <= self.max_adapters:
                break
            if adapter_id not in wanted:
                with warnings.catch_warnings():  # "adapter X was active": no adapter is active here, rows name theirs
                    warnings.filterwarnings("ignore", message="Adapter .* was active")
                    self.model.delete_adapter(adapter_id)
                del self.resident[adapter_id]
        failed: dict[str, BaseException] = {}
        for adapter_id in missing:
            folder = self.folders[adapter_id]
            try:
                if not Path(folder).is_dir():
                    raise FinesmithError(f"{folder}: the adapter folder is gone (a rotated checkpoint?)")
                self.model = attach_adapter(self.model, folder, adapter_id)
                self.loads += 1
            except Exception as exc:  # a broken adapter fails its own requests only
                failed[adapter_id] = exc
                continue
            self.resident[adapter_id] = None
        for adapter_id in wanted - set(failed):
            self.resident.move_to_end(adapter_id)
        if missing:
            release_freed_memory()
        return failed


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")


def tokenizer_digest(source: str) -> str | None:
    """A hash of the tokenizer files `load_chat_tokenizer(source)` reads (None: not a local folder).
    Runs trained alike save identical files; their views then share one tokenizer object (a
    fast tokenizer of a 49k vocabulary holds some 13 MiB, more than a small LoRA adapter)."""
    from finesmith.model.load import resolve_model_path

    folder = Path(source) if Path(source).is_dir() else Path(resolve_model_path(source)[0])
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return digest.hexdigest()


def release_freed_memory() -> None:
    """Hand memory that freed tensors left in the C heap back to the system (glibc's malloc_trim):
    loading or dropping an adapter frees its file buffers and old weights, which glibc would
    otherwise keep in the process. A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _adapter_id(generation: Generation) -> str | None:
    return getattr(generation.engine, "adapter_id", None)


class AdapterView(ChatEngine):
    """A served name on a `SharedBase`: its own name, tokenizer and adapter; the base's model and worker."""

    def __init__(self, core: SharedBase, name: str, tokenizer: Any, adapter_id: str | None) -> None:
        from finesmith.core.templates import stop_token_ids

        self.core, self.name, self.tokenizer, self.adapter_id = core, name, tokenizer, adapter_id
        self.device, self.context_length = core.device, core.context_length
        self.stop_ids = stop_token_ids(tokenizer)
        self.queue_size, self.max_batch = core.queue_size, core.max_batch
        self._grammar_tokenizer: Any = None
        self._tool_tokenizer: Any = None
        self._lazy = threading.Lock()

    @property
    def model(self) -> Any:  # type: ignore[override]
        return self.core.model

    @property
    def counts(self) -> dict[str, int]:  # type: ignore[override]
        return self.core.counts

    def status(self) -> dict[str, Any]:
        return self.core.status()

    def close(self, grace: float | None = None) -> None:
        self.core.close() if grace is None else self.core.close(grace)

    def join(self, timeout: float | None = None) -> bool:
        return self.core.join(timeout)

    def _enqueue(self, generation: Generation) -> None:
        self.core._enqueue(generation)


def load_shared_base(spec: SharedSpec, name: str, queue_size: int = DEFAULT_QUEUE_SIZE, precision: str = "auto",
                     max_adapters: int = DEFAULT_MAX_ADAPTERS, device: str | None = None) -> SharedBase:
    """Load the base of `spec` as `load_for_inference` would (resized to the trained vocabulary),
    in the serving dtype, with no adapter yet."""
    import torch

    from finesmith.core.device import inference_dtype
    from finesmith.model.load import load_chat_tokenizer, load_model, resize_embeddings

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = inference_dtype(precision, device)
    tokenizer, _ = load_chat_tokenizer(spec.tokenizer)
    net = load_model(spec.base, device)
    resize_embeddings(net, spec.vocab)
    core = SharedBase(net.to(dtype).eval(), tokenizer, name, queue_size, max_adapters)
    digest = tokenizer_digest(spec.tokenizer)
    if digest is not None:
        core.tokenizers[digest] = tokenizer
    return core
