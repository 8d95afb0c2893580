"""`finesmith data check`: every problem of a data file, with `file:line`, in one pass.

The file is streamed: rows are parsed one at a time, valid examples are tokenized in
batches (one fast-tokenizer call per batch, with the model's real chat template), and only
compact per-example numbers are kept (a 4-byte length, an 8-byte fingerprint, a line
number), so a multi-gigabyte JSONL never sits in memory.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finesmith.data.formats import AnyExample, Example, PreferenceExample, TextExample, parse_records
from finesmith.data.load import Record
from finesmith.data.tokenize import rendered_lengths
from finesmith.errors import FinesmithError

MIN_EXAMPLES = 10  # fewer cannot teach a model anything reliable: an error
FEW_EXAMPLES = 50  # fewer usually under-fits or over-fits: a warning
BATCH = 512  # examples per batched tokenizer call
SHOWN_DUPLICATES = 5


@dataclass
class CheckReport:
    """What `check_data` found. `errors` make the file untrainable; `warnings` do not."""

    path: str
    max_length: int
    truncation: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)
    turns: int = 0
    lengths: array = field(default_factory=lambda: array("I"))
    duplicates: int = 0
    overlap: int = 0

    @property
    def examples(self) -> int:
        return sum(self.kinds.values())

    @property
    def tokens(self) -> int:
        return int(np.sum(np.frombuffer(self.lengths, dtype=np.uint32), dtype=np.int64)) if self.lengths else 0

    @property
    def over_length(self) -> int:
        return int((np.frombuffer(self.lengths, dtype=np.uint32) > self.max_length).sum()) if self.lengths else 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def length_summary(self) -> dict[str, int]:
        """min, p50, p95 and max of the example lengths in tokens (empty when no examples)."""
        if not self.lengths:
            return {}
        values = np.frombuffer(self.lengths, dtype=np.uint32)
        return {"min": int(values.min()), "p50": int(np.percentile(values, 50)),
                "p95": int(np.percentile(values, 95)), "max": int(values.max())}

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "examples": self.examples, "kinds": dict(self.kinds),
                "turns": self.turns, "tokens": self.tokens, "lengths": self.length_summary(),
                "over_length": self.over_length, "max_length": self.max_length, "duplicates": self.duplicates,
                "overlap": self.overlap, "errors": self.errors, "warnings": self.warnings}


class _Fingerprints:
    """8-byte content fingerprints with the location of each, in compact arrays."""

    def __init__(self) -> None:
        self.digests = array("Q")
        self.numbers = array("Q")
        self.prefixes: dict[str, int] = {}
        self.names: list[str] = []

    def add(self, digest: int, where: str) -> None:
        prefix, _, number = where.rpartition(":")
        if prefix not in self.prefixes:
            self.prefixes[prefix] = len(self.names)
            self.names.append(prefix)
        self.digests.append(digest)
        self.numbers.append(self.prefixes[prefix] << 40 | int(number))

    def where(self, index: int) -> str:
        packed = self.numbers[index]
        return f"{self.names[packed >> 40]}:{packed & ((1 << 40) - 1)}"

    def duplicate_groups(self) -> list[list[int]]:
        """Indices of examples sharing a fingerprint, grouped, each group in file order."""
        if not self.digests:
            return []
        digests = np.frombuffer(self.digests, dtype=np.uint64)
        order = np.argsort(digests, kind="stable")
        ordered = digests[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        sizes = np.diff(np.r_[starts, len(ordered)])
        return [sorted(order[s:s + n].tolist()) for s, n in zip(starts, sizes) if n > 1]


def fingerprint(example: AnyExample) -> int:
    """A 64-bit digest of an example's content (roles and texts, not its location)."""
    if isinstance(example, Example):
        content: Any = [[m["role"], m["content"]] for m in example.messages]
    elif isinstance(example, TextExample):
        content = example.text
    else:
        content = [[[m["role"], m["content"]] for m in example.prompt], example.chosen, example.rejected]
    digest = hashlib.blake2b(json.dumps(content, ensure_ascii=False).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def check_data(path: str, tokenizer: Any, max_length: int, fmt: str = "auto", fields: dict[str, str] | None = None,
               truncation: str = "truncate", eval_path: str | None = None,
               on_progress: Callable[[Record], None] | None = None) -> CheckReport:
    """Validate a training file and gather its statistics; never stops at the first problem.

    Args:
        path: the training data (any source `finesmith.data.load.iter_records` reads).
        tokenizer: the model's tokenizer, with a chat template.
        max_length: tokens per example in training.
        fmt, fields: the data format and column mapping (see `finesmith.data.formats`).
        truncation: the over-length policy training will apply (`truncate` or `drop`).
        eval_path: a held-out file to validate too and to test for overlap with training.
        on_progress: called with each record read (for a progress bar).
    Returns:
        A CheckReport; `report.ok` is False when training would refuse the file.
    """
    report = CheckReport(path, max_length, truncation)
    held_out: dict[int, str] = {}
    if eval_path:
        for example in _scan(eval_path, fmt, fields, report, None, on_progress):
            held_out.setdefault(fingerprint(example), example.source)
    seen = _Fingerprints()
    batch: list[AnyExample] = []
    for example in _scan(path, fmt, fields, report, report, on_progress):
        seen.add(fingerprint(example), example.source)
        batch.append(example)
        if len(batch) == BATCH:
            report.lengths.extend(rendered_lengths(tokenizer, batch))
            batch = []
    report.lengths.extend(rendered_lengths(tokenizer, batch))
    _report_duplicates(report, seen, held_out)
    _report_size(report)
    return report


def _scan(path: str, fmt: str, fields: dict[str, str] | None, report: CheckReport, counts: CheckReport | None,
          on_progress: Callable[[Record], None] | None) -> Iterator[AnyExample]:
    """Yield the valid examples of `path`, recording problems (and, for training data, counts)."""
    for record, example, problem in parse_records(path, fmt, fields):
        if on_progress:
            on_progress(record)
        if record.warning:
            report.warnings.append(f"{record.where}: {record.warning}")
        if problem:
            report.errors.append(problem)
        if example is None:
            continue
        if counts is not None:
            counts.kinds[type(example).__name__] += 1
            counts.turns += _turns(example)
        yield example


def _turns(example: AnyExample) -> int:
    if isinstance(example, Example):
        return len(example.messages)
    if isinstance(example, PreferenceExample):
        return len(example.prompt) + 1
    return 1


def _report_duplicates(report: CheckReport, seen: _Fingerprints, held_out: dict[int, str]) -> None:
    groups = seen.duplicate_groups()
    report.duplicates = sum(len(g) - 1 for g in groups)
    for group in groups[:SHOWN_DUPLICATES]:
        copies = ", ".join(seen.where(i) for i in group[1:4]) + (" ..." if len(group) > 4 else "")
        report.warnings.append(f"{seen.where(group[0])}: exact duplicate at {copies}; duplicates over-weight an example")
    if report.duplicates and len(groups) > SHOWN_DUPLICATES:
        report.warnings.append(f"{report.path}: {report.duplicates} duplicate examples in all")
    if not held_out:
        return
    digests = np.frombuffer(seen.digests, dtype=np.uint64) if seen.digests else np.zeros(0, np.uint64)
    hits = np.flatnonzero(np.isin(digests, np.fromiter(held_out, dtype=np.uint64)))
    report.overlap = len(hits)
    for index in hits[:SHOWN_DUPLICATES]:
        report.warnings.append(f"{seen.where(int(index))}: also in the eval data at "
                               f"{held_out[int(digests[index])]}; eval scores would be inflated")


def _report_size(report: CheckReport) -> None:
    n = report.examples
    if n < MIN_EXAMPLES:
        report.errors.append(f"{report.path}: only {n} valid examples; at least {MIN_EXAMPLES} are needed "
                             f"(50-100 well-chosen examples is a good start)")
    elif n < FEW_EXAMPLES:
        report.warnings.append(f"{report.path}: only {n} examples; {FEW_EXAMPLES} or more usually train far better")
    over = report.over_length
    if over:
        policy = ("they are cut to max_length (keeping trained tokens)" if report.truncation == "truncate"
                  else "they are dropped (truncation: drop)")
        report.warnings.append(f"{report.path}: {over} examples are longer than max_length {report.max_length}; "
                               f"{policy}; plain text is split into windows instead")
    if report.kinds.get("PreferenceExample"):
        report.warnings.append(f"{report.path}: holds preference pairs; they validate, but `finesmith train` "
                               "cannot train them yet")


def load_checked(path: str, fmt: str = "auto", fields: dict[str, str] | None = None, *, skip_invalid: bool = False,
                 max_invalid_fraction: float = 0.1, min_examples: int = MIN_EXAMPLES,
                 notify: Callable[[str], None] = print) -> list[AnyExample]:
    """Load examples for training: refuse invalid data, or drop it when asked.

    Args:
        path, fmt, fields: the data source (see `parse_records`).
        skip_invalid: drop invalid rows instead of refusing the file.
        max_invalid_fraction: with `skip_invalid`, refuse when more than this share is invalid.
        min_examples: refuse fewer valid examples than this.
        notify: receives the first few problems and the count of skipped rows.
    Returns:
        The valid examples, in file order.
    Raises:
        FinesmithError: one line naming the first problem and the fix.
    """
    examples, problems = [], []
    for _, example, problem in parse_records(path, fmt, fields):
        if problem:
            problems.append(problem)
        elif example is not None:
            examples.append(example)
    total = len(examples) + len(problems)
    if problems:
        for problem in problems[:5]:
            notify(f"  {problem}")
        if not skip_invalid:
            raise FinesmithError(f"{path}: {len(problems)} invalid of {total} examples (first: {problems[0]}); fix them "
                                 f"(`finesmith data check {path}` lists all) or pass --skip-invalid")
        if len(problems) > max_invalid_fraction * total:
            raise FinesmithError(f"{path}: {len(problems)} of {total} examples are invalid, more than "
                                 f"max_invalid_fraction {max_invalid_fraction:g}; fix the data (`finesmith data check {path}`)")
        notify(f"skipped {len(problems)} invalid of {total} examples (--skip-invalid)")
    if len(examples) < min_examples:
        raise FinesmithError(f"{path}: only {len(examples)} valid examples; at least {min_examples} are needed")
    return examples


def refuse_sensitive(path: str) -> None:
    """Raise when a data file contains sensitive data (counts and first location, never values)."""
    from finesmith.data.pii import scan_file

    if Path(path).is_dir() or not Path(path).exists():
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else []
    else:
        files = [Path(path)]
    for file in files:
        report = scan_file(file)
        if report.findings:
            counts = ", ".join(f"{kind} {n}" for kind, n in report.counts().items())
            first = report.findings[0]
            raise FinesmithError(f"{file}: sensitive data found ({counts}; first at {first.path}:{first.line}) and "
                                 f"refuse_pii is set; run `finesmith data scan {file} --redact OUT` and train on OUT")
