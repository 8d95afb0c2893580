"""Progress of an evaluation pass: a bar on a terminal, plain lines in a log.

A bar redraws one line in place, which a log file cannot show (rich prints nothing at all
when stdout is not a terminal). So when the console is not a terminal, a pass prints plain
lines instead: one as it starts, then one each time another ~10% of its rows is done, with the
rows done, rows per second and the time elapsed, so `finesmith compare ... > log.txt` shows it moving. Passes of
fewer than `PLAIN_MIN_ROWS` rows (the training loop's sample answers) only draw on a terminal.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from finesmith.core.console import console

PLAIN_MIN_ROWS = 10
PLAIN_STEPS = 10  # lines per pass in a log: one per ~10% of its rows


class EvalProgress:
    """Counts the rows of one pass; use as a context manager and call `advance(n)`.

    Args:
        description: what the pass does, e.g. "answering + scoring".
        total: rows in the pass.
    """

    def __init__(self, description: str, total: int) -> None:
        self.description, self.total, self.done = description, total, 0
        self._bar: Progress | None = None
        self._task = None
        self._started = time.perf_counter()
        self._next_line: float = 0

    def __enter__(self) -> "EvalProgress":
        self._started = time.perf_counter()
        if console.is_terminal:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total)
        elif self.total >= PLAIN_MIN_ROWS:
            console.print(f"  {self.description}: {self.total} rows", markup=False, soft_wrap=True)
        self._next_line = self._line_after(0)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, error, trace)

    def advance(self, rows: int) -> None:
        """`rows` more rows are done."""
        self.done += rows
        if self._bar is not None:
            self._bar.advance(self._task, rows)
        elif self.total >= PLAIN_MIN_ROWS and self.done >= self._next_line:
            console.print(self.line(), markup=False, soft_wrap=True)
            self._next_line = self._line_after(self.done)

    def line(self) -> str:
        """`answering + scoring: 40/400 rows (10%) · 2.1 rows/s · 19 s elapsed`."""
        elapsed = time.perf_counter() - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        share = 100 * self.done / max(1, self.total)
        return (f"  {self.description}: {self.done}/{self.total} rows ({share:.0f}%) · {rate:.2f} rows/s · "
                f"{elapsed:.0f} s elapsed")

    def _line_after(self, done: int) -> float:
        """Rows done at which the next plain line is due: the next ~10% mark, the last row, then never."""
        if done >= self.total:
            return float("inf")
        step = max(1, -(-self.total // PLAIN_STEPS))
        return min((done // step + 1) * step, self.total)


def eval_progress(description: str, total: int) -> EvalProgress:
    """Progress of one evaluation pass over `total` rows (see `EvalProgress`)."""
    return EvalProgress(description, total)
