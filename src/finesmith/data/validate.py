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

from finesmith.data.documents import html_to_text, pdf_to_text
from finesmith.data.formats import AnyExample, Example, FeedbackExample, PreferenceExample, TextExample, parse_records
from finesmith.data.load import Record, data_kind
from finesmith.data.pii import KINDS, Finding, scan_text
from finesmith.data.tokenize import rendered_lengths, tokens_and_mask
from finesmith.data.tokenize import template_renders_tools, uses_tools
from finesmith.data.tools import calls_as_text
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
    rejected_lengths: array = field(default_factory=lambda: array("I"))  # preference pairs' rejected side
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

    def length_summary(self, side: str = "chosen") -> dict[str, int]:
        """min, p50, p95 and max of the example lengths in tokens (empty when no examples).

        For preference pairs `lengths` are prompt + chosen; `side="rejected"` summarises the other side.
        """
        lengths = self.rejected_lengths if side == "rejected" else self.lengths
        if not lengths:
            return {}
        values = np.frombuffer(lengths, dtype=np.uint32)
        return {"min": int(values.min()), "p50": int(np.percentile(values, 50)),
                "p95": int(np.percentile(values, 95)), "max": int(values.max())}

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "examples": self.examples, "kinds": dict(self.kinds),
                "turns": self.turns, "tokens": self.tokens, "lengths": self.length_summary(),
                "rejected_lengths": self.length_summary("rejected"),
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
        content: Any = [[m["role"], m["content"], calls_as_text(m.get("tool_calls") or [])] for m in example.messages]
        content.append(example.tools)
    elif isinstance(example, TextExample):
        content = example.text
    elif isinstance(example, FeedbackExample):
        content = [[[m["role"], m["content"]] for m in example.prompt], example.completion, example.desirable]
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
    unrendered: list[str] = []  # examples with tools the template cannot render
    for example in _scan(path, fmt, fields, report, report, on_progress):
        seen.add(fingerprint(example), example.source)
        if isinstance(example, Example) and uses_tools(example) and not template_renders_tools(tokenizer):
            unrendered.append(example.source)
            continue
        batch.append(example)
        if len(batch) == BATCH:
            _measure(report, tokenizer, batch)
            batch = []
    _measure(report, tokenizer, batch)
    if unrendered:
        report.errors.append(f"{unrendered[0]}: {len(unrendered)} examples use tools (first here), but the model's "
                             "chat template does not render tools, calls and results; check with --tool-format "
                             "hermes (train with tool_format: hermes) or use a model whose template supports tools")
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
    if isinstance(example, (PreferenceExample, FeedbackExample)):
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


def _measure(report: CheckReport, tokenizer: Any, batch: list[AnyExample]) -> None:
    """Token lengths of a batch; for preference pairs also the rejected side, and whether the
    prompt tokenizes the same before both answers."""
    report.lengths.extend(rendered_lengths(tokenizer, batch, report.errors))
    pairs = [ex for ex in batch if isinstance(ex, PreferenceExample)]
    if not pairs:
        return
    rejected = [PreferenceExample(ex.prompt, ex.rejected, ex.chosen, ex.source) for ex in pairs]
    report.rejected_lengths.extend(rendered_lengths(tokenizer, rejected))
    for example in pairs:
        try:
            sides = [tokens_and_mask(tokenizer, list(example.prompt) + [{"role": "assistant", "content": answer}])
                     for answer in (example.chosen, example.rejected)]
        except FinesmithError as exc:
            report.errors.append(f"{example.source}: {exc}")
            continue
        prompts = [ids[:mask.index(True)] if True in mask else ids for ids, mask in sides]
        if prompts[0] != prompts[1]:
            report.warnings.append(f"{example.source}: the prompt tokenizes differently before the chosen and the "
                                   "rejected answer (the template or tokenizer joins text across the boundary); "
                                   "each side is still scored exactly, but the prompt is not shared")


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
    if report.kinds.get("PreferenceExample") or report.kinds.get("FeedbackExample"):
        report.warnings.append(f"{report.path}: holds preference pairs or feedback rows; train them with "
                               "objective: dpo (ipo, orpo, simpo; kto for feedback rows), not sft")


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


def refuse_sensitive(path: str, fmt: str = "auto", fields: dict[str, str] | None = None) -> None:
    """Refuse a data source whose trained text holds sensitive data (PII, secrets).

    What is scanned is what training trains: every example `parse_records` yields, after
    `fields` renamed the columns (message contents, instruction/input/output,
    prompt/completion, text, chosen/rejected), streamed one record at a time from any source
    `iter_records` reads, hub datasets included. Columns no example uses are never trained,
    so they are not scanned; rows that do not parse are refused or dropped by training, so
    neither. A `.pdf`/`.html` file, which only corpus ingestion reads, is scanned in its
    extracted text. A source that cannot be read is refused, never passed unscanned.

    Args:
        path: the training or eval data (file, folder, hub dataset id).
        fmt, fields: the data format and column mapping, as training reads them.
    Raises:
        FinesmithError: one line with the counts by kind, the first location and how to
            clean the source (never a value); or why the source cannot be scanned.
    """
    kind = _scanned_kind(path)
    counts: Counter = Counter()
    first: Finding | None = None
    files: set[str] = set()
    for finding in _sensitive_findings(path, kind, fmt, fields):
        counts[finding.kind] += 1
        first = first or finding
        if kind == "folder":
            files.add(finding.path)
    if first is None:
        return
    found = ", ".join(f"{name} {counts[name]}" for name in KINDS if counts[name])
    if len(files) > 1:
        found += f" in {len(files)} files"
    where = first.path if kind == "document" else f"{first.path}:{first.line}"
    raise FinesmithError(f"{path}: sensitive data found ({found}; first at {where}) and refuse_pii is set; "
                         + _how_to_clean(path, kind))


DOCUMENT_SUFFIXES = (".pdf", ".html", ".htm")  # read by corpus ingestion only, not by `iter_records`


def _scanned_kind(path: str) -> str:
    """`data_kind(path)`, or `document` for a .pdf/.html file; raises for a source nothing reads."""
    try:
        return data_kind(path)
    except FinesmithError:
        if Path(path).is_file() and Path(path).suffix.lower() in DOCUMENT_SUFFIXES:
            return "document"
        raise


def _sensitive_findings(path: str, kind: str, fmt: str, fields: dict[str, str] | None) -> Iterator[Finding]:
    """The findings in the trained text of `path`, in source order."""
    if kind == "document":
        yield from scan_text(_document_text(path), path, count_lines=False)
        return
    for _, example, _ in parse_records(path, fmt, fields):
        if example is None:
            continue
        source, _, line = example.source.rpartition(":")
        for text in _trained_texts(example):
            # A .txt/.md example is the whole document, so a finding's line is counted inside it.
            yield from scan_text(text, source, int(line), count_lines=kind in ("text", "folder"))


def _trained_texts(example: AnyExample) -> Iterator[str]:
    if isinstance(example, TextExample):
        yield example.text
        return
    messages = example.messages if isinstance(example, Example) else example.prompt
    yield from (m["content"] for m in messages if isinstance(m.get("content"), str))
    for message in messages:  # tool call arguments are trained text too
        if message.get("tool_calls"):
            yield calls_as_text(message["tool_calls"])
    if isinstance(example, PreferenceExample):
        yield from (example.chosen, example.rejected)
    if isinstance(example, FeedbackExample):
        yield example.completion


def _document_text(path: str) -> str:
    """The text of a .pdf (its text layer) or .html (its visible text) file."""
    try:
        if path.lower().endswith(".pdf"):
            return pdf_to_text(Path(path))
        return html_to_text(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FinesmithError(f"{path}: not UTF-8 text, so refuse_pii cannot scan it; re-save it as UTF-8") from None
    except FinesmithError as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        raise FinesmithError(f"{path}: refuse_pii cannot scan this file: {reason}") from None


def _how_to_clean(path: str, kind: str) -> str:
    """The fix for the refusal: redact a copy where the redactor can write the format, else convert first."""
    redact = "run `finesmith data scan {} --redact OUT` and train on OUT"
    if kind in ("jsonl", "json", "csv", "text"):
        return redact.format(path)
    if kind == "folder":
        return "for each file with findings, run `finesmith data scan FILE --redact OUT` and put OUT in its place"
    if kind == "parquet":
        return "the redactor cannot write .parquet: export it to .jsonl, then " + redact.format("FILE.jsonl")
    if kind == "hub":
        return (f"the redactor cannot write a hub dataset: save it with `datasets.load_dataset('{path}', "
                f"split='train').to_json('train.jsonl')`, then " + redact.format("train.jsonl"))
    return (f"training reads no {Path(path).suffix.lower()} files: extract its text to a .txt file, then "
            + redact.format("FILE.txt"))
