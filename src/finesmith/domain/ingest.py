"""Turn a folder of documents into a clean, deduplicated corpus split by document.

Readers: `.txt`/`.md` (as is), `.html`/`.htm` (visible text via the stdlib parser),
`.pdf` (text layer via pypdf), `.jsonl` (one document per line, a `text` field); the HTML
and PDF readers live in `finesmith.data.documents`, shared with the sensitive-data check.
Whitespace is normalised, near-empty documents are dropped, exact duplicates are found
by hashing the normalised text and near duplicates by MinHash LSH over word shingles.
The train/eval split assigns whole documents, so no eval text was ever seen in training.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from finesmith.data.documents import html_to_text, pdf_to_text, require
from finesmith.errors import FinesmithError

CORPUS_SUFFIXES = (".txt", ".md", ".html", ".htm", ".pdf", ".jsonl")


@dataclass(frozen=True)
class Document:
    """One document of the corpus and where it came from (`file` or `file:line`)."""

    text: str
    source: str

    @property
    def words(self) -> int:
        return len(self.text.split())


@dataclass
class IngestStats:
    """What ingestion read, kept and removed."""

    files: Counter = field(default_factory=Counter)  # suffix -> files read
    documents: int = 0  # documents read (before any filtering)
    too_short: int = 0  # dropped: fewer than min_words words
    exact_duplicates: int = 0
    near_duplicates: int = 0
    kept: int = 0
    train_documents: int = 0
    eval_documents: int = 0
    words: int = 0  # words in the kept documents

    def to_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "files"}, "files": dict(self.files)}


@dataclass
class Corpus:
    """The kept documents split into train and eval, plus the counts."""

    train: list[Document]
    eval: list[Document]
    stats: IngestStats


def normalise_whitespace(text: str) -> str:
    """Collapse runs of spaces/tabs, trim lines, keep at most one blank line between paragraphs."""
    lines = [re.sub(r"[ \t\f\v\u00a0]+", " ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_documents(path: str | Path) -> tuple[list[Document], Counter]:
    """Every document under `path` (a file or a folder, searched recursively), in sorted order.

    Returns:
        The documents (whitespace-normalised, not yet filtered) and files read per suffix.
    Raises:
        FinesmithError: the path is missing, has no supported files, or a file is unreadable.
    """
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES)
    else:
        raise FinesmithError(f"corpus not found: {path}; pass a folder of documents or one file")
    if not files:
        raise FinesmithError(f"{path}: no {', '.join(CORPUS_SUFFIXES)} files in this folder")
    documents, counts = [], Counter()
    for file in files:
        suffix = file.suffix.lower()
        if suffix not in CORPUS_SUFFIXES:
            raise FinesmithError(f"{file}: unsupported corpus file type '{suffix}'; use {', '.join(CORPUS_SUFFIXES)}")
        counts[suffix] += 1
        documents.extend(Document(normalise_whitespace(text), where) for where, text in _file_texts(file))
    return documents, counts


def _file_texts(file: Path) -> list[tuple[str, str]]:
    suffix = file.suffix.lower()
    if suffix == ".pdf":
        return [(str(file), pdf_to_text(file))]
    try:
        raw = file.read_text(encoding="utf-8").lstrip("\ufeff")
    except UnicodeDecodeError:
        raise FinesmithError(f"{file}: not UTF-8 text; re-save it as UTF-8") from None
    if suffix in (".html", ".htm"):
        return [(str(file), html_to_text(raw))]
    if suffix == ".jsonl":
        return _jsonl_texts(file, raw)
    return [(str(file), raw)]


def _jsonl_texts(file: Path, raw: str) -> list[tuple[str, str]]:
    out = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FinesmithError(f"{file}:{number}: invalid JSON ({exc.msg}); fix the line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise FinesmithError(f"{file}:{number}: a corpus JSONL line needs a string `text` field")
        out.append((f"{file}:{number}", row["text"]))
    return out


def shingles(text: str, size: int = 5) -> set[str]:
    """Overlapping word `size`-grams of the lower-cased text (the whole text when shorter)."""
    words = text.lower().split()
    if len(words) <= size:
        return {" ".join(words)}
    return {" ".join(words[i:i + size]) for i in range(len(words) - size + 1)}


def deduplicate(documents: list[Document], threshold: float = 0.8, num_perm: int = 128,
                seed: int = 1) -> tuple[list[Document], int, int]:
    """Drop exact, then near duplicates (estimated Jaccard similarity of shingles >= threshold).

    The first document of each group (in input order) is kept.

    Returns:
        (kept documents, exact duplicates removed, near duplicates removed).
    """
    require("datasketch", "near-duplicate detection")
    from datasketch import MinHash, MinHashLSH

    seen, unique = set(), []
    for doc in documents:
        digest = hashlib.sha256(doc.text.lower().encode("utf-8")).hexdigest()
        if digest not in seen:
            seen.add(digest)
            unique.append(doc)
    exact = len(documents) - len(unique)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept = []
    for index, doc in enumerate(unique):
        signature = MinHash(num_perm=num_perm, seed=seed)
        signature.update_batch([s.encode("utf-8") for s in shingles(doc.text)])
        if lsh.query(signature):
            continue
        lsh.insert(str(index), signature)
        kept.append(doc)
    return kept, exact, len(unique) - len(kept)


def split_documents(documents: list[Document], eval_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Seeded split by whole document: at least one eval document when the fraction is above 0."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_fraction <= 0 else max(1, round(eval_fraction * len(documents)))
    if n_eval >= len(documents):
        raise FinesmithError(f"the corpus has {len(documents)} documents after cleaning, too few to hold out "
                             f"{eval_fraction:.0%} for evaluation; add documents or lower eval_fraction")
    held = set(order[:n_eval])
    return ([d for i, d in enumerate(documents) if i not in held], [d for i, d in enumerate(documents) if i in held])


def ingest_corpus(path: str | Path, min_words: int = 20, near_duplicate_threshold: float = 0.8,
                  eval_fraction: float = 0.1, seed: int = 42) -> Corpus:
    """Read, clean, deduplicate and split a corpus.

    Args:
        path: a folder (searched recursively) or one file.
        min_words: documents with fewer words are dropped as near-empty.
        near_duplicate_threshold: MinHash Jaccard estimate at which a document counts as a near duplicate.
        eval_fraction: share of documents held out for evaluation.
        seed: seeds the split.
    Returns:
        The Corpus with its train/eval documents and counts.
    """
    documents, files = read_documents(path)
    stats = IngestStats(files=files, documents=len(documents))
    long_enough = [d for d in documents if d.words >= min_words]
    stats.too_short = len(documents) - len(long_enough)
    if not long_enough:
        raise FinesmithError(f"{path}: every document has fewer than {min_words} words; lower min_words or add text")
    kept, stats.exact_duplicates, stats.near_duplicates = deduplicate(long_enough, near_duplicate_threshold)
    train, held_out = split_documents(kept, eval_fraction, seed)
    stats.kept, stats.train_documents, stats.eval_documents = len(kept), len(train), len(held_out)
    stats.words = sum(d.words for d in kept)
    return Corpus(train, held_out, stats)
