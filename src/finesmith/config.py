"""Run configuration: dataclasses, YAML files, `key=value` overrides, helpful errors.

A YAML file, `key=value` overrides and CLI flags all resolve into one `TrainConfig`.
Unknown keys are errors that name the key and the closest valid one, because a typo
that silently becomes a default is the most expensive kind of bug in a training run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finesmith.errors import FinesmithError

METHODS = ("full", "lora")
TRUNCATION_POLICIES = ("truncate", "drop")


@dataclass
class LoraSettings:
    """LoRA adapter settings (used when `method: lora`)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


@dataclass
class TrainConfig:
    """Everything a training run needs. Every key can be set in YAML or as `key=value`."""

    model: str = ""  # built-in alias, local folder, .gguf file or hub id
    data: str = ""  # training JSONL (chat, Alpaca or prompt/completion)
    output: str = ""  # run folder: metrics.jsonl, weights, tokenizer, config.yaml
    eval_data: str | None = None  # held-out JSONL: eval loss during training, accuracy after
    method: str = "lora"  # full | lora
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    lr: float | None = None  # None: 2e-4 for lora, 2e-5 for full
    batch_size: int = 8  # examples per micro-batch (packed into one padding-free row)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 1024  # tokens per example
    truncation: str = "truncate"  # truncate | drop: what to do with longer examples
    seed: int = 42
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 5  # optimizer steps between metric lines
    eval_every: int = 0  # optimizer steps between eval-loss measurements (0: only at the end)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def resolved_lr(self) -> float:
        """The learning rate in effect: the user's, or the method's well-tried default."""
        if self.lr is not None:
            return self.lr
        return 2e-4 if self.method == "lora" else 2e-5

    def validate(self) -> "TrainConfig":
        """Check values a type check cannot; return self for chaining."""
        for key in ("model", "data", "output"):
            if not getattr(self, key):
                raise FinesmithError(f"config: `{key}` is required; set it with --{key} or `{key}: ...` in the YAML file")
        _choice("method", self.method, METHODS)
        _choice("truncation", self.truncation, TRUNCATION_POLICIES)
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "max_length": self.max_length, "log_every": self.log_every,
                    "lora.r": self.lora.r}
        for key, value in positive.items():
            if value < 1:
                raise FinesmithError(f"config: `{key}` must be at least 1, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise FinesmithError(f"config: `max_steps` must be at least 1, got {self.max_steps}")
        if self.epochs <= 0:
            raise FinesmithError(f"config: `epochs` must be positive, got {self.epochs}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise FinesmithError(f"config: `lr` must be between 0 and 1, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise FinesmithError(f"config: `warmup_ratio` must be in [0, 1), got {self.warmup_ratio}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FinesmithError(f"config: `{key}` must be one of {', '.join(choices)}; got '{value}'")


def load_config(path: str | None = None, overrides: list[str] | None = None,
                flags: dict[str, Any] | None = None) -> TrainConfig:
    """Resolve a YAML file, then `key=value` overrides, then CLI flags into a TrainConfig.

    Args:
        path: YAML file or None.
        overrides: strings like `lora.r=8` or `lr=1e-4` (values parsed as YAML scalars).
        flags: already-typed values from CLI flags; None values are ignored.
    Returns:
        A validated TrainConfig.
    """
    raw: dict[str, Any] = {}
    if path:
        raw = read_yaml(path)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FinesmithError(f"override '{item}' is not key=value; write e.g. lr=1e-4 or lora.r=8")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(raw, key, value)
    return from_dict(TrainConfig, raw, where="config").validate()


def read_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FinesmithError(f"config file not found: {path}; check the path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise FinesmithError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise FinesmithError(f"{path}: the config must be a mapping of keys to values")
    return data


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FinesmithError(f"config: `{part}` is not a section, so `{key}` cannot be set")
    node[parts[-1]] = value


def from_dict(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise FinesmithError(f"config: `{where}` must be a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{where}.{key}" if where != "config" else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else f"; valid keys here: {', '.join(names)}"
            raise FinesmithError(f"config: unknown key `{full}`{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, where=key)
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise FinesmithError(f"config: `{key}` needs a value")
    for option in options:
        if option is type(None):
            continue
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if option is bool and isinstance(value, bool):
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise FinesmithError(f"config: `{key}` must be {wanted}, got {value!r}")


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
