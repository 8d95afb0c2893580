"""Terminal views of data: the `data check` report, trained-token masks, `data scan` counts."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from finesmith.data.formats import AnyExample, Example, PreferenceExample, TextExample
from finesmith.data.pii import ScanReport
from finesmith.data.tokenize import text_tokens, tokens_and_mask
from finesmith.data.validate import CheckReport

TRAINED_STYLE = "bold black on green"
CONTEXT_STYLE = "dim"
SHOWN_PROBLEMS = 50


def print_check_report(console: Console, report: CheckReport) -> None:
    """Counts, the length distribution, then every problem with `file:line`, then the verdict."""
    table = Table(title=f"data check · {report.path}", show_header=False)
    kinds = ", ".join(f"{n:,} {KIND_NAMES.get(k, k)}" for k, n in report.kinds.items()) or "none"
    table.add_row("examples", f"{report.examples:,} ({kinds})")
    table.add_row("turns", f"{report.turns:,}")
    table.add_row("tokens", f"{report.tokens:,} (with the chat template)")
    lengths = report.length_summary()
    if lengths:
        label = "tokens per example" + (" (prompt + chosen)" if report.rejected_lengths else "")
        table.add_row(label, " · ".join(f"{k} {v:,}" for k, v in lengths.items()))
    if report.rejected_lengths:
        table.add_row("tokens (prompt + rejected)",
                      " · ".join(f"{k} {v:,}" for k, v in report.length_summary("rejected").items()))
    table.add_row(f"over max_length {report.max_length}", f"{report.over_length:,} (truncation: {report.truncation})")
    table.add_row("exact duplicates", f"{report.duplicates:,}")
    table.add_row("in eval data too", f"{report.overlap:,}")
    console.print(table)
    for label, items, style in (("error", report.errors, "red"), ("warning", report.warnings, "yellow")):
        for item in items[:SHOWN_PROBLEMS]:
            # soft_wrap: one problem per line, whole, so the output can be grepped by file:line
            console.print(Text(f"{label}: ", style=style) + Text(item), soft_wrap=True)
        if len(items) > SHOWN_PROBLEMS:
            console.print(f"... and {len(items) - SHOWN_PROBLEMS} more {label}s")
    verdict = ("[green]trainable[/green]" if report.ok else
               f"[red]not trainable: {len(report.errors)} errors[/red]")
    console.print(f"{verdict} · {len(report.warnings)} warnings")


KIND_NAMES = {"Example": "conversations", "TextExample": "text documents", "PreferenceExample": "preference pairs",
              "FeedbackExample": "feedback rows"}


def masked_text(tokenizer: Any, example: AnyExample) -> Text:
    """The example as training sees it, trained tokens highlighted, the rest dimmed."""
    if isinstance(example, TextExample):
        ids, mask = text_tokens(tokenizer, example.text)
    else:
        messages = (list(example.messages) if isinstance(example, Example) else
                    list(example.prompt) + [{"role": "assistant", "content": getattr(
                        example, "chosen", getattr(example, "completion", ""))}])
        ids, mask = tokens_and_mask(tokenizer, messages, example.tools if isinstance(example, Example) else None)
    text = Text()
    for token, trained in zip(ids, mask):
        text.append(tokenizer.decode([token]), style=TRAINED_STYLE if trained else CONTEXT_STYLE)
    return text


def print_masked_examples(console: Console, tokenizer: Any, examples: list[AnyExample]) -> None:
    """Render examples with their supervised tokens highlighted, so the mask can be checked by eye."""
    console.print(Text("trained tokens", style=TRAINED_STYLE) + Text(" · ") + Text("context (not trained)", style=CONTEXT_STYLE))
    for example in examples:
        note = " (chosen answer shown)" if isinstance(example, PreferenceExample) else ""
        console.rule(f"{example.source}{note}")
        console.print(masked_text(tokenizer, example))


def print_scan_report(console: Console, path: str, report: ScanReport, shown: int = 20) -> None:
    """Counts by kind and the `file:line` of each finding; never the values."""
    if not report.findings:
        console.print(f"{path}: no sensitive data found in {report.lines_scanned:,} lines")
        return
    counts = ", ".join(f"{kind} {n}" for kind, n in report.counts().items())
    console.print(f"{path}: {len(report.findings)} findings in {report.lines_scanned:,} lines ({counts})")
    for finding in report.findings[:shown]:
        console.print(f"  {finding.path}:{finding.line}  {finding.kind}", soft_wrap=True)
    if len(report.findings) > shown:
        console.print(f"  ... and {len(report.findings) - shown} more")


def data_check(path: str, tokenizer: Any, max_length: int, fmt: str = "auto", fields: dict[str, str] | None = None,
               truncation: str = "truncate", eval_path: str | None = None, show: int = 0,
               console: Console | None = None) -> CheckReport:
    """`finesmith data check`: validate with a progress bar, print the report, show N masks.

    The caller loads the tokenizer (`finesmith.model.load.load_chat_tokenizer`), so the
    data layer never loads a model.

    Args:
        path: training data; tokenizer: the model's tokenizer, with its chat template.
        max_length, fmt, fields, truncation: as in training.
        eval_path: held-out data to validate and test for overlap.
        show: how many valid examples to render with their trained tokens highlighted.
        console: where to print (stdout by default).
    Returns:
        The CheckReport (`ok` decides the exit code).
    """
    from pathlib import Path

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from finesmith.data.formats import parse_records
    from finesmith.data.validate import check_data

    console = console or Console(highlight=False)
    sizes = [Path(p).stat().st_size for p in (path, eval_path) if p and Path(p).is_file()]
    with Progress(TextColumn("checking"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("check", total=sum(sizes) or None)
        report = check_data(path, tokenizer, max_length, fmt, fields, truncation, eval_path,
                            on_progress=lambda record: progress.advance(task, record.nbytes))
    print_check_report(console, report)
    if show:
        examples = []
        for _, example, _ in parse_records(path, fmt, fields):
            if example is not None:
                examples.append(example)
            if len(examples) == show:
                break
        print_masked_examples(console, tokenizer, examples)
    return report
