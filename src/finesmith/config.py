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

from finesmith.data.formats import FIELD_NAMES, FORMATS
from finesmith.errors import FinesmithError

METHODS = ("full", "lora", "qlora", "prompt_tuning", "prefix_tuning", "ia3")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
TRACKERS = ("tensorboard", "wandb", "mlflow")
PARALLELISM = ("auto", "ddp", "fsdp")
AUTO = "auto"
TRUNCATION_POLICIES = ("truncate", "drop")
TOOL_FORMATS = ("template", "hermes")  # see finesmith.data.tool_templates
THINKING = ("auto", "on", "off")  # see finesmith.data.template
ON_OFF_KEYS = ("thinking",)  # string keys whose values are on/off words
OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo", "kto", "grpo")
PREFERENCE_OBJECTIVES = ("dpo", "ipo", "orpo", "simpo", "kto")

# Default tokens per packed row. Attention in a row costs the square of its length: on a
# 2-core CPU, SmolLM2-135M trained 2x faster on 16 examples in rows of 512 than in one
# 3,099-token row.
ROW_TOKENS = 512


@dataclass
class LoraSettings:
    """LoRA adapter settings (used when `method: lora`)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # peft's default; dropout on every adapter input costs ~15% of a CPU step
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r (steadier at high rank)
    use_dora: bool = False  # weight-decomposed LoRA (magnitude + direction)
    modules_to_save: list[str] | None = None  # also train full copies, e.g. [embed_tokens, lm_head] for new tokens


@dataclass
class FullSettings:
    """Full fine-tuning settings (used when `method: full`)."""

    freeze_embeddings: bool = False  # keep input embeddings fixed (a tied LM head stays fixed too)
    freeze_layers: int = 0  # keep the first N transformer blocks fixed


@dataclass
class PromptSettings:
    """Virtual-token settings (used when `method: prompt_tuning` or `prefix_tuning`)."""

    virtual_tokens: int = 20


@dataclass
class PreferenceSettings:
    """Settings of the preference objectives (`objective: dpo|ipo|orpo|simpo|kto`)."""

    beta: float = 0.1  # dpo/ipo/kto: strength of the pull towards the reference; simpo: reward scale
    label_smoothing: float = 0.0  # dpo: assumed share of flipped labels (conservative DPO)
    gamma: float = 0.5  # simpo: target reward margin
    simpo_beta: float = 2.0  # simpo: reward scale (SimPO works with far larger values than DPO's beta)
    orpo_lambda: float = 0.1  # orpo: weight of the odds-ratio term next to the chosen side's NLL
    desirable_weight: float = 1.0  # kto: weight of desirable examples
    undesirable_weight: float = 1.0  # kto: weight of undesirable examples
    share_prompt: bool = True  # compute each pair's prompt once; both answers attend to it


@dataclass
class GRPOSettings:
    """Settings of reinforcement fine-tuning (`objective: grpo`; see finesmith.train.grpo)."""

    group_size: int = 4  # answers sampled per prompt; advantages compare them
    max_new_tokens: int = 64  # longest sampled answer
    temperature: float = 1.0
    top_p: float = 1.0
    epsilon: float = 0.2  # clip range of the probability ratio
    beta: float = 0.0  # weight of the KL term to the reference (the base with the adapter disabled)
    iterations: int = 1  # optimizer steps per batch of samples (above 1, clipping acts)
    scale_rewards: bool = True  # divide advantages by the group's reward std
    reward_timeout: float = 60.0  # seconds one reward call may take (rewards run in their own process)
    grader_errors: str = "fail"  # grader rewards: fail (stop the run, one line) | zero (score 0, as hosted RFT)


@dataclass
class DataSettings:
    """Where the training data is and how to read it. `data: file.jsonl` is short for `data: {path: file.jsonl}`."""

    path: str = ""  # .jsonl, .json, .csv, .parquet, .txt/.md, a folder of documents, or a hub dataset id
    format: str = "auto"  # auto | chat | sharegpt | alpaca | prompt_completion | text | preference
    fields: dict[str, str] = field(default_factory=dict)  # canonical field -> your column, e.g. {output: answer}


# Sections that may be written as one scalar, meaning the named key of the section.
SHORTHANDS = {"data": "path"}


@dataclass
class TrainConfig:
    """Everything a training run needs. Every key can be set in YAML or as `key=value`."""

    model: str = ""  # built-in alias, local folder, .gguf file or hub id
    data: DataSettings = field(default_factory=DataSettings)  # training data (a path, or path/format/fields)
    output: str = ""  # run folder: metrics.jsonl, weights, tokenizer, config.yaml
    eval_data: str | None = None  # held-out JSONL: eval loss during training, accuracy after
    skip_invalid: bool = False  # drop invalid examples (counted) instead of refusing to train
    max_invalid_fraction: float = 0.1  # with skip_invalid: abort when more than this share is invalid
    refuse_pii: bool = False  # refuse to train when `finesmith data scan` would find sensitive data
    tool_format: str = "template"  # template: the model's own (must render tools) | hermes: tools as text
    # reasoning models (templates with enable_thinking, e.g. Qwen3): off trains and asks without thinking,
    # on with it; auto keeps the template's default. Saved in the run's chat template, so every command agrees.
    thinking: str = "auto"  # auto | on | off
    method: str = "lora"  # full | lora | qlora | prompt_tuning | prefix_tuning | ia3
    objective: str = "sft"  # sft | dpo | ipo | orpo | simpo | kto (what the loss is; method is the model setup)
    epochs: float | str = 3.0  # or auto: from the dataset size
    max_steps: int | None = None  # overrides epochs when set
    lr: float | str | None = None  # None or auto: the method's default (see resolved_lr)
    batch_size: int | str = 8  # examples per micro-batch (packed into one padding-free row), or auto
    packing: bool = False  # micro-batch = one best-fit-decreasing bin of at most pack_tokens tokens
    pack_tokens: int | None = None  # token budget per packed micro-batch (default: max_length)
    embedding_lr_ratio: float = 1.0  # trainable embeddings / LM head learn at lr × this (e.g. 0.1 for CPT)
    row_tokens: int = ROW_TOKENS  # a micro-batch is split into padding-free rows of at most this many tokens
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 1024  # tokens per example
    truncation: str = "truncate"  # truncate | drop: what to do with longer examples
    seed: int = 42
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 5  # optimizer steps between metric lines
    eval_every: int = 0  # optimizer steps between eval-loss measurements (0: only at the end)
    sample_prompts: int = 0  # at each eval, greedy answers for the first N eval prompts -> samples.jsonl
    sample_max_new_tokens: int = 32
    early_stopping_patience: int = 0  # stop after N evals without a lower eval loss (0: never)
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept (the best by eval loss is kept as well)
    max_bad_steps: int = 5  # consecutive non-finite losses/gradients that stop the run
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    # auto: bf16 on CUDA (frozen weights stored in bf16, trained ones in fp32, bf16 autocast, fp32 loss), fp32 on CPU
    precision: str = "auto"  # auto | fp32 | bf16 (fp16 needs loss scaling and is refused)
    # packed rows: dense block mask, or variable-length attention from the sequence boundaries (SFT);
    # auto: varlen on CUDA with PyTorch's kernel, dense elsewhere
    attention: str = "auto"  # auto | dense | varlen
    compile: bool = False  # torch.compile the model body (dynamic shapes: packed lengths do not recompile)
    # several processes: ddp (replicas, gradients all-reduced) or fsdp (FSDP2 fully_shard: weights, gradients
    # and optimizer state sharded); auto: fsdp for full fine-tuning, ddp for adapters
    parallelism: str = "auto"  # auto | ddp | fsdp
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit (the 8-bit ones need CUDA + bitsandbytes)
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb, mlflow (metrics.jsonl always)
    lora: LoraSettings = field(default_factory=LoraSettings)
    full: FullSettings = field(default_factory=FullSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    preference: PreferenceSettings = field(default_factory=PreferenceSettings)
    # objective grpo: reward functions, "path/module.py:function" or exact_match | regex:PATTERN | length:MIN-MAX,
    # or grader objects of the hosted graders API ({type: string_check, ...}; see finesmith.train.rewards)
    reward: list[str | dict[str, Any]] | str | dict[str, Any] = field(default_factory=list)
    reward_weights: list[float] = field(default_factory=list)  # one per reward (default 1 each)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)

    def resolved_lr(self) -> float:
        """The learning rate in effect: the user's, or the method's well-tried default."""
        if isinstance(self.lr, float):
            return self.lr
        return DEFAULT_LR[self.method]

    def resolved_pack_tokens(self) -> int:
        return self.pack_tokens or self.max_length

    def validate(self) -> "TrainConfig":
        """Check values a type check cannot; return self for chaining."""
        for key in ("model", "data", "output"):
            if not _get(self, "data.path" if key == "data" else key):
                raise FinesmithError(f"config: `{key}` is required; set it with --{key} or `{key}: ...` in the YAML file")
        _choice("method", self.method, METHODS)
        _choice("data.format", self.data.format, FORMATS)
        for name in self.data.fields:
            _choice(f"data.fields.{name}", name, FIELD_NAMES)
        if not 0 <= self.max_invalid_fraction <= 1:
            raise FinesmithError(f"config: `max_invalid_fraction` must be in [0, 1], got {self.max_invalid_fraction}")
        _choice("truncation", self.truncation, TRUNCATION_POLICIES)
        _choice("tool_format", self.tool_format, TOOL_FORMATS)
        _choice("thinking", self.thinking, THINKING)
        _choice("objective", self.objective, OBJECTIVES)
        if self.objective == "grpo":
            g = self.grpo
            for key, ok, need in (("group_size", g.group_size >= 2, "at least 2"),
                                  ("max_new_tokens", g.max_new_tokens >= 1, "at least 1"),
                                  ("temperature", g.temperature > 0, "above 0 (sampling must vary the answers)"),
                                  ("top_p", 0 < g.top_p <= 1, "in (0, 1]"), ("epsilon", 0 < g.epsilon < 1, "in (0, 1)"),
                                  ("beta", g.beta >= 0, "at least 0"), ("iterations", g.iterations >= 1, "at least 1"),
                                  ("reward_timeout", g.reward_timeout > 0, "above 0 (seconds)")):
                if not ok:
                    raise FinesmithError(f"config: `grpo.{key}` must be {need}, got {getattr(g, key)}")
            if self.packing:
                raise FinesmithError("config: objective grpo samples answers per prompt; set packing: false")
            _choice("grpo.grader_errors", g.grader_errors, ("fail", "zero"))
        if isinstance(self.reward, dict):
            self.reward = [self.reward]  # one grader object: a list of one, as every reader expects
        if isinstance(self.reward, list) and any(isinstance(r, dict) for r in self.reward):
            from finesmith.train.rewards import check_grader

            for i, spec in enumerate(self.reward):
                if isinstance(spec, dict):
                    check_grader(spec, f"config: reward[{i}]" if len(self.reward) > 1 else "config: reward")
        if not 0 <= self.preference.label_smoothing < 0.5:
            raise FinesmithError(f"config: `preference.label_smoothing` must be in [0, 0.5), got "
                                 f"{self.preference.label_smoothing}")
        for key in ("beta", "desirable_weight", "undesirable_weight"):
            if getattr(self.preference, key) <= 0:
                raise FinesmithError(f"config: `preference.{key}` must be positive, got {getattr(self.preference, key)}")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _choice("attention", self.attention, ("auto", "dense", "varlen"))
        _choice("parallelism", self.parallelism, PARALLELISM)
        if self.precision == "fp16":
            raise FinesmithError("config: `precision: fp16` trains only with loss scaling, which finesmith does not do; "
                                 "use bf16 (GPUs since Ampere) or fp32")
        for tracker in self.report_to:
            _choice("report_to", tracker, TRACKERS)
        for key in ("epochs", "batch_size", "lr"):
            value = getattr(self, key)
            if isinstance(value, str) and value != AUTO:
                raise FinesmithError(f"config: `{key}` must be a number or auto, got '{value}'")
        positive = {"grad_accum": self.grad_accum, "max_length": self.max_length, "log_every": self.log_every,
                    "row_tokens": self.row_tokens,
                    "lora.r": self.lora.r, "keep_checkpoints": self.keep_checkpoints,
                    "max_bad_steps": self.max_bad_steps, "prompt.virtual_tokens": self.prompt.virtual_tokens}
        if isinstance(self.batch_size, int):
            positive["batch_size"] = self.batch_size
        if self.pack_tokens is not None:
            positive["pack_tokens"] = self.pack_tokens
        for key, value in positive.items():
            if value < 1:
                raise FinesmithError(f"config: `{key}` must be at least 1, got {value}")
        for key in ("save_every", "eval_every", "sample_prompts", "early_stopping_patience", "full.freeze_layers"):
            if _get(self, key) < 0:
                raise FinesmithError(f"config: `{key}` must be 0 or more, got {_get(self, key)}")
        if self.packing and self.method in PROMPT_METHODS:
            raise FinesmithError(f"config: `packing` does not work with {self.method} (virtual tokens are prepended "
                                 "to every example); set packing: false")
        if self.max_steps is not None and self.max_steps < 1:
            raise FinesmithError(f"config: `max_steps` must be at least 1, got {self.max_steps}")
        if isinstance(self.epochs, float) and self.epochs <= 0:
            raise FinesmithError(f"config: `epochs` must be positive, got {self.epochs}")
        if isinstance(self.lr, float) and not 0 < self.lr < 1:
            raise FinesmithError(f"config: `lr` must be between 0 and 1, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise FinesmithError(f"config: `warmup_ratio` must be in [0, 1), got {self.warmup_ratio}")
        if not 0 < self.embedding_lr_ratio <= 10:
            raise FinesmithError(f"config: `embedding_lr_ratio` must be in (0, 10], got {self.embedding_lr_ratio}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROMPT_METHODS = ("prompt_tuning", "prefix_tuning")
# Peak learning rates that work for each method at typical batch sizes; virtual tokens and
# IA3 vectors are few parameters and need far larger steps than weights or LoRA matrices.
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4, "ia3": 3e-3, "prompt_tuning": 3e-2, "prefix_tuning": 1e-2}


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


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
        set_dotted(raw, *parse_override(item))
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(raw, key, value)
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


def parse_override(item: str, example: str = "lora.r=8") -> tuple[str, Any]:
    """Split a `key=value` override into the dotted key and its value (parsed as a YAML scalar).

    Every command that takes overrides (a training run, a staged run) parses them here, so
    they read values the same way and refuse malformed ones with the same message.

    Args:
        item: the override as the user wrote it, e.g. `lora.r=8`; an empty value means None.
        example: a second valid override shown in the error message.
    Returns:
        `(key, value)`.
    Raises:
        FinesmithError: `item` has no `=` or no key.
    """
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise FinesmithError(f"override '{item}' is not key=value; write e.g. lr=1e-4 or {example}")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` (dotted, e.g. `lora.r`) in a raw config mapping, creating sections on the way.

    A section written as one scalar (`data: file.jsonl`) is first expanded to its mapping
    (`data: {path: file.jsonl}`), so `data.format=chat` can be added to it.

    Raises:
        FinesmithError: a part of the key names a value that is not a section.
    """
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if part in SHORTHANDS and node is raw and isinstance(node.get(part), str):
            node[part] = {SHORTHANDS[part]: node[part]}
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
        if key in SHORTHANDS and isinstance(value, str):
            value = {SHORTHANDS[key]: value}
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
        if option is float and isinstance(value, str) and _is_float(value):
            return float(value)  # YAML 1.1 reads `2e-4` (no dot) as a string
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is str and isinstance(value, str):
            return value
        if option is str and isinstance(value, bool) and key.rpartition(".")[2] in ON_OFF_KEYS:
            return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if typing.get_origin(option) is list and isinstance(value, list):
            item = (typing.get_args(option) or (str,))[0]
            if item is str and all(isinstance(v, str) for v in value):
                return value
            if str(item) == "str | dict[str, typing.Any]" and all(isinstance(v, (str, dict)) for v in value):
                return list(value)  # reward specs: names of functions, or grader objects
            if item is float and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                return [float(v) for v in value]
        if typing.get_origin(option) is dict and isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return dict(value)
        if option == dict[str, Any] and isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)  # a grader object
        if option is bool and isinstance(value, bool):
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise FinesmithError(f"config: `{key}` must be {wanted}, got {value!r}")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
