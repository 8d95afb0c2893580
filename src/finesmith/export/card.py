"""The model card (`README.md`) written into every export: where the model came from."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from finesmith import __version__
from finesmith.export.merge import RunInfo


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def final_metrics(run: Path) -> dict[str, Any]:
    """The last training-loss record and the last eval loss in `metrics.jsonl` (if any)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    last: dict[str, Any] = {}
    eval_loss = None
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        if "loss" in record:
            last = record
        if "eval_loss" in record:
            eval_loss = record["eval_loss"]
    return last | ({"eval_loss": eval_loss} if eval_loss is not None else {})


def data_files(run: Path) -> list[tuple[str, str, str]]:
    """`(role, file, sha256 or a note)` for the training and eval data named in config.yaml.

    A folder of documents is listed file by file; a hub dataset id cannot be hashed.
    """
    cfg_path = run / "config.yaml"
    config = (yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}) if cfg_path.is_file() else {}
    rows = []
    for role in ("data", "eval_data"):
        spec = config.get(role)
        name = spec.get("path") if isinstance(spec, dict) else spec
        if not name:
            continue
        path = Path(name)
        if path.is_dir():
            rows += [(role, str(f), sha256_file(f)) for f in sorted(path.rglob("*")) if f.is_file()]
        else:
            rows.append((role, name, sha256_file(path) if path.is_file() else "not a local file at export time"))
    return rows


def model_card(info: RunInfo, fmt: str, files: list[str], checks: list[Any] | None = None,
               today: dt.date | None = None) -> str:
    """Markdown text of the model card.

    Args:
        info: the exported run.
        fmt: export format (`hf`, `adapter`, `gguf`).
        files: the main files of the export, listed for the reader.
        checks: verification results to include, if `--verify` ran.
        today: the date to print (defaults to today, UTC).

    Returns:
        The card text.
    """
    config = yaml.safe_load((info.folder / "config.yaml").read_text(encoding="utf-8")) \
        if (info.folder / "config.yaml").is_file() else {}
    date = (today or dt.datetime.now(dt.timezone.utc).date()).isoformat()
    lines = [f"# {info.folder.name}", "",
             f"Fine-tuned with finesmith {__version__}; exported as `{fmt}` on {date}.", "",
             "| | |", "|---|---|",
             f"| base model | `{info.base_model or 'unknown'}` |",
             f"| method | {info.method} |"]
    if info.method in ("lora", "qlora") and config.get("lora"):
        lora = config["lora"]
        lines.append(f"| LoRA | r={lora.get('r')}, alpha={lora.get('alpha')}, targets={lora.get('target_modules')} |")
    for key in ("epochs", "max_steps", "lr", "batch_size", "grad_accum", "max_length", "seed"):
        if config.get(key) is not None:
            lines.append(f"| {key} | {config[key]} |")
    lines += ["", "## Data", "", "| role | file | sha256 |", "|---|---|---|"]
    lines += [f"| {role} | `{name}` | `{digest}` |" for role, name, digest in data_files(info.folder)]
    metrics = final_metrics(info.folder)
    lines += ["", "## Final metrics (metrics.jsonl)", ""]
    lines += [f"- {key}: {value}" for key, value in metrics.items()] or ["- none recorded"]
    lines += ["", "## Files", ""] + [f"- `{name}`" for name in files]
    if checks:
        lines += ["", "## Verification", ""] + [f"- {check.line()}" for check in checks]
    return "\n".join(lines) + "\n"
