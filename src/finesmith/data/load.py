"""Reading data files into plain rows, with `file:line` on every problem."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finesmith.errors import FinesmithError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, row)` for each non-blank line of a JSONL file, streaming.

    Raises:
        FinesmithError: the file is missing, a line is not valid JSON or not an object.
    """
    p = Path(path)
    if not p.is_file():
        raise FinesmithError(f"data file not found: {path}; check the path (expected a .jsonl file)")
    with p.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FinesmithError(f"{where}: not UTF-8 (byte {exc.start}); re-save the file as UTF-8") from None
            if number == 1 and text.startswith("\ufeff"):
                text = text[1:]  # a byte-order mark is harmless here; `data check` reports it
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise FinesmithError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); fix or remove the line") from None
            if not isinstance(row, dict):
                raise FinesmithError(f"{where}: expected a JSON object, got {type(row).__name__}; each line must be one example object")
            yield number, row
