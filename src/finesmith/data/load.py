"""Reading data files into plain rows, with `file:line` on every problem.

Every reader yields `Record`s, one per example-sized unit of the file: a JSONL line, an
element of a JSON array, a CSV or Parquet row, a whole `.txt`/`.md` file, or a row of a
Hugging Face dataset. A record carries either the row or the reason it could not be read,
so `data check` can report every problem while `read_rows` stops at the first one.
Large JSONL files are streamed line by line and never held in memory at once.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finesmith.errors import FinesmithError

TEXT_SUFFIXES = (".txt", ".md")
ROW_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HUB_DATASET = re.compile(r"^[\w.-]+/[\w.-]+$")
BOM = "\ufeff"
MAX_DEPTH = 100  # real examples nest a few levels (messages, tool arguments); far deeper is an error
MAX_LINE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Record:
    """One unit of a data file: a row, or the reason it could not be read.

    `where` is `file:line` (a row number for Parquet and hub datasets; line 1 for a
    `.txt`/`.md` document). `warning` flags something harmless worth reporting; `nbytes`
    is how much of the file the record covers (for progress bars; 0 when unknown).
    """

    where: str
    row: dict[str, Any] | None = None
    problem: str | None = None
    warning: str | None = None
    nbytes: int = 0


def data_kind(path: str) -> str:
    """How `path` will be read: jsonl, json, csv, parquet, text, folder or hub.

    Raises:
        FinesmithError: the path does not exist and is not a hub dataset id, or has an
            unsupported extension.
    """
    p = Path(path)
    if p.is_dir():
        return "folder"
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            return "text"
        if suffix in ROW_SUFFIXES:
            return suffix[1:]
        raise FinesmithError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json, .csv, .parquet, .txt or .md")
    if HUB_DATASET.match(path) and not p.suffix:
        return "hub"
    raise FinesmithError(f"data file not found: {path}; check the path (.jsonl, .json, .csv, .parquet, .txt/.md or a folder)")


def iter_records(path: str) -> Iterator[Record]:
    """Yield every record of a data source, streaming where the format allows.

    Args:
        path: a file, a folder of `.txt`/`.md` files, or a Hugging Face dataset id.
    Returns:
        An iterator of `Record`s in file order.
    """
    readers = {"jsonl": _jsonl_records, "json": _json_array_records, "csv": _csv_records,
               "parquet": _parquet_records, "text": _text_file_records, "folder": _folder_records,
               "hub": _hub_records}
    return readers[data_kind(path)](path)


def read_rows(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield `(where, row)` for each row, raising on the first unreadable one."""
    for record in iter_records(path):
        if record.problem is not None:
            raise FinesmithError(f"{record.where}: {record.problem}")
        if record.row is not None:
            yield record.where, record.row


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, row)` for each non-blank line of a JSONL file, streaming.

    Raises:
        FinesmithError: the file is missing, a line is not valid JSON or not an object.
    """
    if not Path(path).is_file():
        raise FinesmithError(f"data file not found: {path}; check the path (expected a .jsonl file)")
    for where, row in read_rows(str(path)):
        yield int(where.rsplit(":", 1)[1]), row


def _jsonl_records(path: str) -> Iterator[Record]:
    offset = 0  # byte offset of the current line, so a bad byte can be located exactly
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            start, offset = offset, offset + len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Record(where, problem=f"not UTF-8 (byte offset {start + exc.start}); re-save the file as UTF-8",
                             nbytes=len(raw))
                continue
            warning = None
            if number == 1 and text.startswith(BOM):
                text = text[1:]
                warning = "file starts with a byte-order mark (BOM); it is skipped, but some tools choke on it"
            if not text.strip():
                yield Record(where, warning=warning, nbytes=len(raw))
                continue
            yield _parse_object(text, where, warning, len(raw))


def parse_json(text: str) -> tuple[Any, str | None]:
    """`(value, None)`, or `(None, problem)` for text that is not JSON finesmith can use.

    Beyond syntax errors this refuses what would make a later step fail: nesting deeper
    than `MAX_DEPTH` (Python's parser and every recursive consumer have a recursion limit),
    integers with more digits than Python converts, and lines over `MAX_LINE_BYTES`.
    """
    if len(text) > MAX_LINE_BYTES:
        return None, f"the line is {len(text) / 2**20:.0f} MiB, over the {MAX_LINE_BYTES // 2**20} MiB limit; split it"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg} at column {exc.colno}); fix or remove the line"
    except RecursionError:
        return None, f"JSON nested too deeply (over {MAX_DEPTH} levels); flatten the value"
    except ValueError as exc:  # e.g. an integer literal with more digits than Python converts
        return None, f"invalid JSON value ({str(exc).splitlines()[0][:80]}); fix or remove the line"
    if nesting_depth(value) > MAX_DEPTH:
        return None, f"JSON nested too deeply (over {MAX_DEPTH} levels); flatten the value"
    return value, None


def nesting_depth(value: Any) -> int:
    """How deeply lists and objects nest in `value` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _parse_object(text: str, where: str, warning: str | None, nbytes: int) -> Record:
    row, problem = parse_json(text)
    if problem:
        return Record(where, problem=problem, warning=warning, nbytes=nbytes)
    if not isinstance(row, dict):
        return Record(where, problem=f"expected a JSON object, got {type(row).__name__}; each line must be one example object",
                      warning=warning, nbytes=nbytes)
    return Record(where, row=row, warning=warning, nbytes=nbytes)


def _read_text(path: str) -> tuple[str | None, Record | None]:
    """The file as text, or a record describing why it is not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return None, Record(f"{path}:{line}", problem=f"not UTF-8 (byte offset {exc.start}); re-save the file as UTF-8")
    return text, None


def _bom_warning(text: str) -> str | None:
    if text.startswith(BOM):
        return "file starts with a byte-order mark (BOM); it is skipped, but some tools choke on it"
    return None


def _json_array_records(path: str) -> Iterator[Record]:
    """Elements of a top-level JSON array, each located by the line it starts on."""
    text, bad = _read_text(path)
    if bad:
        yield bad
        return
    warning = _bom_warning(text)
    text = text.lstrip(BOM)
    decoder = json.JSONDecoder()
    index = _skip_space(text, 0)
    if not text.startswith("[", index):
        yield Record(f"{path}:{text.count(chr(10), 0, index) + 1}", problem="a .json file must hold one array of example objects; use .jsonl for one object per line",
                     warning=warning)
        return
    index = _skip_space(text, index + 1)
    while index < len(text) and text[index] != "]":
        where = f"{path}:{text.count(chr(10), 0, index) + 1}"
        try:
            value, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            yield Record(f"{path}:{exc.lineno}", problem=f"invalid JSON ({exc.msg} at column {exc.colno}); the rest of the file is not read")
            return
        except (RecursionError, ValueError):
            yield Record(where, problem=f"JSON nested too deeply or a value Python cannot read (over {MAX_DEPTH} "
                                        "levels, or an integer with too many digits); the rest of the file is not read")
            return
        if nesting_depth(value) > MAX_DEPTH:
            yield Record(where, problem=f"JSON nested too deeply (over {MAX_DEPTH} levels); flatten the value")
        elif isinstance(value, dict):
            yield Record(where, row=value, warning=warning)
        else:
            yield Record(where, problem=f"expected a JSON object, got {type(value).__name__}", warning=warning)
        warning = None
        index = _skip_space(text, index)
        if index < len(text) and text[index] == ",":
            index = _skip_space(text, index + 1)


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _csv_records(path: str) -> Iterator[Record]:
    """CSV rows keyed by the header; cells holding JSON lists (e.g. `messages`) are parsed."""
    text, bad = _read_text(path)
    if bad:
        yield bad
        return
    warning = _bom_warning(text)
    reader = csv.DictReader(text.lstrip(BOM).splitlines(keepends=True))
    try:
        if reader.fieldnames is None:
            return
        ended = reader.line_num  # line the previous record ended on (the header at first)
        for row in reader:
            where = f"{path}:{ended + 1}"
            ended = reader.line_num
            if None in row:
                yield Record(where, problem="more cells than header columns; quote cells that contain commas")
                continue
            yield Record(where, row={k: _cell(v) for k, v in row.items()}, warning=warning)
            warning = None
    except csv.Error as exc:
        yield Record(f"{path}:{reader.line_num}", problem=f"malformed CSV ({exc}); the rest of the file is not read")


def _cell(value: str | None) -> Any:
    if value and value.lstrip().startswith("["):
        parsed, problem = parse_json(value)
        return value if problem else parsed
    return value


def _parquet_records(path: str) -> Iterator[Record]:
    """Parquet rows, read one record batch at a time; `where` is `file:row`."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FinesmithError("reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
        number = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield Record(f"{path}:{number}", row=row)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise FinesmithError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None


def _text_file_records(path: str) -> Iterator[Record]:
    text, bad = _read_text(path)
    if bad:
        yield bad
        return
    yield Record(f"{path}:1", row={"text": text.lstrip(BOM)})


def _folder_records(path: str) -> Iterator[Record]:
    """Every `.txt`/`.md` file under a folder, in sorted order, as one text example each."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise FinesmithError(f"{path}: no .txt or .md files in this folder; point --data at a file or a folder of documents")
    for file in files:
        yield from _text_file_records(str(file))


def _hub_records(dataset_id: str) -> Iterator[Record]:
    """Rows of the `train` split of a Hugging Face dataset (needs `datasets` and a network)."""
    try:
        import datasets
    except ImportError:
        raise FinesmithError(f"{dataset_id} is not a local path; loading a hub dataset needs the `hub` extra: pip install 'finesmith[hub]'") from None
    try:
        rows = datasets.load_dataset(dataset_id, split="train", streaming=True)
        for number, row in enumerate(rows, start=1):
            yield Record(f"{dataset_id}:{number}", row=dict(row))
    except Exception as exc:  # offline, unknown id, gated: all surface as one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise FinesmithError(f"could not load hub dataset {dataset_id} ({first}); when offline, pass a local file instead") from None
