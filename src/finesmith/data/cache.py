"""On-disk cache of tokenized training data, so re-running `train` skips tokenization.

The key hashes everything the tokens depend on: the data's bytes, the tokenizer (its
full serialised vocabulary and merges), the chat template, `max_length`, the format and
field mapping, the truncation policy and the invalid-row policy (skip, and its threshold). Change any of them and
the key changes, so a stale entry is never read. Entries live under
`$FINESMITH_CACHE/data/<key>/` (default `~/.cache/finesmith/data/`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from finesmith.core.paths import cache_root
from finesmith.data.tokenize import TokenizedExample, TokenizeStats

CACHE_FORMAT = 2  # bump when tokenization itself changes meaning
CHUNK = 1 << 20


def data_cache_root() -> Path:
    """The folder holding tokenized-data entries (next to the converted models)."""
    return cache_root() / "data"


def content_hash(path: str) -> str | None:
    """SHA-256 of a file's bytes, or of every file (name and bytes) under a folder; None for hub ids."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else None
    if files is None:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(p) if p.is_dir() else "").encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's complete definition (vocabulary, merges, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id])
    return hashlib.sha256((definition + special).encode("utf-8")).hexdigest()


def data_cache_key(path: str, tokenizer: Any, max_length: int, fmt: str, fields: dict[str, str],
                   truncation: str, skip_invalid: bool, max_invalid_fraction: float) -> str | None:
    """The cache key for tokenizing `path` this way, or None when the source cannot be hashed.

    Args:
        path: the data file or folder.
        tokenizer: the tokenizer, with its chat template set.
        max_length, fmt, fields, truncation, skip_invalid, max_invalid_fraction: the settings the
            tokens (or the decision to refuse the file) depend on.
    Returns:
        A hex digest naming the cache entry.
    """
    content = content_hash(path)
    if content is None:
        return None
    parts = {"format_version": CACHE_FORMAT, "content": content, "tokenizer": tokenizer_fingerprint(tokenizer),
             "chat_template": getattr(tokenizer, "chat_template", None), "max_length": max_length,
             "format": fmt, "fields": sorted(fields.items()), "truncation": truncation, "skip_invalid": skip_invalid,
             "max_invalid_fraction": max_invalid_fraction if skip_invalid else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def save_tokenized(key: str, examples: list[TokenizedExample], stats: TokenizeStats) -> Path:
    """Write an entry atomically (a reader never sees half of one); return its folder."""
    root = data_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        lengths = np.array([len(e) for e in examples], dtype=np.int64)
        np.savez(staging / "tokens.npz",
                 ids=np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int64, count=int(lengths.sum())),
                 supervised=np.fromiter((m for e in examples for m in e.supervised), dtype=bool, count=int(lengths.sum())),
                 lengths=lengths)
        meta = {"sources": [e.source for e in examples], "stats": asdict(stats)}
        (staging / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenized(key: str) -> tuple[list[TokenizedExample], TokenizeStats] | None:
    """The cached examples and stats for `key`, or None on a miss (or an unreadable entry)."""
    folder = data_cache_root() / key
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        with np.load(folder / "tokens.npz") as arrays:
            ids, supervised, lengths = arrays["ids"].tolist(), arrays["supervised"].tolist(), arrays["lengths"]
    except (OSError, ValueError, KeyError):
        return None
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    examples = [TokenizedExample(tuple(ids[a:b]), tuple(supervised[a:b]), source)
                for a, b, source in zip(bounds[:-1], bounds[1:], meta["sources"])]
    return examples, TokenizeStats(**meta["stats"])


def load_reference(key: str, n: int) -> list[tuple[float, ...]] | None:
    """Cached reference log-probabilities of `n` groups (None on a miss or a mismatch)."""
    path = data_cache_root() / f"reference-{key}.json"
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return [tuple(v) for v in values] if isinstance(values, list) and len(values) == n else None


def save_reference(key: str, values: list[tuple[float, ...]]) -> None:
    """Store reference log-probabilities next to the tokenized data (written atomically)."""
    root = data_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-reference-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump([list(v) for v in values], handle)
    os.replace(tmp, root / f"reference-{key}.json")
