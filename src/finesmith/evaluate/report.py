"""Showing results: a rich table in the terminal, and a Markdown + self-contained HTML report.

The report compares several approaches evaluated on the same held-out file (e.g. the base
model zero-shot and k-shot, and fine-tuned runs): a results table, per-class metrics,
tool-call metrics (when the references call tools), training/eval loss curves read from
each run's `metrics.jsonl`, and sample answers side by side. The HTML embeds its images
as base64 PNG so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from finesmith.evaluate.tasks import EvalResult
from finesmith.evaluate.toolcalls import format_calls

SCORING_NAMES = {"generate": "generated", "loglik": "label log-lik."}
TOOL_CALL_COLUMNS = (("name_accuracy", "tool name acc."), ("arguments_parse_rate", "tool args parse"),
                     ("exact_match", "tool exact match"), ("argument_accuracy", "tool argument acc."))


def headline_metrics(result: EvalResult) -> dict[str, str]:
    """The numbers one row of a results table shows, formatted, keyed by column name."""
    if result.task == "perplexity":
        ppl = result.metrics["perplexity"]
        return {"perplexity": f"{ppl['perplexity']:.3f}", "tokens": f"{ppl['tokens']:,}"}
    if result.task == "tool_call":
        return tool_call_headline(result)
    if result.task == "preference":
        m = result.metrics["preference"]
        row = {"preference accuracy": f"{m['accuracy']:.1%}", "log-prob margin": f"{m['mean_logp_margin']:.2f}",
               "chosen log-prob": f"{m['chosen_logp']:.2f}", "rejected log-prob": f"{m['rejected_logp']:.2f}"}
        if "reward_accuracy" in m:
            row["reward accuracy"] = f"{m['reward_accuracy']:.1%}"
            row["reward margin"] = f"{m['mean_reward_margin']:.3f}"
        return row
    if result.task == "generation":
        m = result.metrics["generate"]
        return {"exact match": f"{m['exact_match']:.1%}", "token F1": f"{m['token_f1']:.3f}",
                "ROUGE-L": f"{m['rouge_l']:.3f}", "chrF": f"{m['chrf']:.1f}"}
    row = {}
    for scoring, m in result.metrics.items():
        row[f"accuracy ({SCORING_NAMES[scoring]})"] = f"{m['accuracy']:.1%}"
        row[f"macro-F1 ({SCORING_NAMES[scoring]})"] = f"{m['macro_f1']:.3f}"
    return row


def tool_call_headline(result: EvalResult) -> dict[str, str]:
    """Tool-call columns, plus exact match and token F1 of the text references when there are any."""
    calls = result.metrics["tool_calls"]
    row = {column: _share(calls[key]) for key, column in TOOL_CALL_COLUMNS}
    text = result.metrics.get("generate")
    if text:
        row["exact match (text)"] = f"{text['exact_match']:.1%}"
        row["token F1 (text)"] = f"{text['token_f1']:.3f}"
    return row


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def tool_call_rows(entries: Sequence[tuple[str, EvalResult]]) -> tuple[list[str], list[list[str]]]:
    """One row per approach with every tool-call metric (approaches without tool calls left out)."""
    header = ["approach", "calls scored", "answers with a call"] + [column for _, column in TOOL_CALL_COLUMNS]
    rows = [[name, str(r.metrics["tool_calls"]["n"]), _share(r.metrics["tool_calls"]["call_rate"])] +
            [_share(r.metrics["tool_calls"][key]) for key, _ in TOOL_CALL_COLUMNS]
            for name, r in entries if "tool_calls" in r.metrics]
    return header, rows


def results_rows(entries: Sequence[tuple[str, EvalResult]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (columns: the union of every entry's metrics)."""
    columns: list[str] = []
    for _, result in entries:
        columns.extend(c for c in headline_metrics(result) if c not in columns)
    header = ["approach", "task", "n", "shots"] + columns
    rows = []
    for name, result in entries:
        metrics = headline_metrics(result)
        rows.append([name, result.task, str(result.n), str(result.shots)] + [metrics.get(c, "–") for c in columns])
    return header, rows


def per_class_rows(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    """Per-label precision/recall/F1 of each scoring of a classification result."""
    header, rows = ["label", "support"], {}
    for scoring, m in result.metrics.items():
        header += [f"P ({SCORING_NAMES[scoring]})", f"R ({SCORING_NAMES[scoring]})", f"F1 ({SCORING_NAMES[scoring]})"]
        for label, c in m["per_class"].items():
            rows.setdefault(label, [label, str(c["support"])]).extend(
                [f"{c['precision']:.2f}", f"{c['recall']:.2f}", f"{c['f1']:.2f}"])
    return header, list(rows.values())


def print_result(console: Console, result: EvalResult, title: str) -> None:
    """Print the headline metrics (and per-class metrics for classification) as rich tables."""
    header, rows = results_rows([(title, result)])
    table = Table(title=title)
    for column in header[1:]:
        table.add_column(column, justify="right")
    table.add_row(*rows[0][1:])
    console.print(table)
    if result.task == "classification":
        header, rows = per_class_rows(result)
        per_class = Table(title="per class")
        for column in header:
            per_class.add_column(column, justify="left" if column == "label" else "right")
        for row in rows:
            per_class.add_row(*row)
        console.print(per_class)


def read_metrics(run: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train loss points, eval loss points) from a run's `metrics.jsonl` (empty if absent)."""
    path = run / "metrics.jsonl"
    train, held_out = [], []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "loss" in record:
                train.append((record["step"], record["loss"]))
            if "eval_loss" in record:
                held_out.append((record["step"], record["eval_loss"]))
    return train, held_out


def loss_curves_png(runs: Sequence[tuple[str, Path]]) -> bytes | None:
    """A PNG of training (solid) and eval (dashed) loss per run; None when no run logged any."""
    curves = [(name, *read_metrics(run)) for name, run in runs]
    if not any(train or held for _, train, held in curves):
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also keeps tests and servers headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for index, (name, train, held) in enumerate(curves):
        colour = f"C{index}"
        if train:
            ax.plot(*zip(*train), color=colour, marker=".", label=f"{name} · train")
        if held:
            ax.plot(*zip(*held), color=colour, linestyle="--", marker="o", label=f"{name} · eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def accuracy_png(entries: Sequence[tuple[str, EvalResult]]) -> bytes | None:
    """A bar chart of each approach's headline accuracy; None when no entry has one."""
    scored = [(name, r.accuracy) for name, r in entries if r.accuracy is not None]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.5 * len(scored)), dpi=100)
    names, values = zip(*scored)
    ax.barh(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
    ax.set_yticks(range(len(values)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (headline)")
    for i, value in enumerate(values):
        ax.text(min(value + 0.01, 0.9), i, f"{value:.1%}", va="center")
    return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def sample_rows(entries: Sequence[tuple[str, EvalResult]], n: int = 8) -> tuple[list[str], list[list[str]]]:
    """The first n held-out examples with every approach's answer (✓/✗ marks correctness)."""
    first = entries[0][1].predictions
    header = ["prompt", "reference"] + [name for name, _ in entries]
    rows = []
    for i, record in enumerate(first[:n]):
        row = [_clip(record.get("prompt", ""), 120), record.get("reference", "")]
        for _, result in entries:
            p = result.predictions[i] if i < len(result.predictions) else {}
            answer = p.get("prediction", p.get("loglik_prediction", ""))
            width = 60
            if "reference_tool_calls" in p and p.get("predicted_tool_calls"):
                answer, width = format_calls(p["predicted_tool_calls"]), 100  # the call, not its wrapping
            correct = p.get("correct", p.get("loglik_correct"))
            mark = "" if correct is None else (" ✓" if correct else " ✗")
            row.append(_clip(answer, width) + mark)
        rows.append(row)
    return header, rows


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def write_report(entries: Sequence[tuple[str, EvalResult]], runs: Sequence[tuple[str, Path]], output: Path,
                 title: str, notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write `report.md` (with PNG files beside it) and a self-contained `report.html`.

    Args:
        entries: (approach name, result) pairs, all on the same held-out file.
        runs: (name, run folder) pairs whose `metrics.jsonl` gives the loss curves.
        output: folder to write into (created if needed).
        title: the report's heading.
        notes: extra lines shown under the heading (data file, model, timings...).

    Returns:
        Paths of the Markdown and HTML files.
    """
    output.mkdir(parents=True, exist_ok=True)
    images = {"accuracy.png": accuracy_png(entries), "loss_curves.png": loss_curves_png(runs)}
    images = {name: png for name, png in images.items() if png is not None}
    for name, png in images.items():
        (output / name).write_bytes(png)
    sections = [("Results", *results_rows(entries))]
    for name, result in entries:
        if result.task == "classification":
            sections.append((f"Per-class metrics · {name}", *per_class_rows(result)))
    if any("tool_calls" in r.metrics for _, r in entries):
        sections.append(("Tool calls", *tool_call_rows(entries)))
    if any(r.predictions for _, r in entries):
        sections.append(("Sample outputs", *sample_rows(entries)))
    markdown, page = output / "report.md", output / "report.html"
    markdown.write_text(render_markdown(title, notes, sections, images), encoding="utf-8")
    page.write_text(render_html(title, notes, sections, images), encoding="utf-8")
    return markdown, page


Section = tuple[str, list[str], list[list[str]]]
IMAGE_CAPTIONS = {"accuracy.png": "Accuracy", "loss_curves.png": "Training and eval loss"}


def render_markdown(title: str, notes: Sequence[str], sections: Sequence[Section], images: dict[str, bytes]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", "", *[f"- {note}" for note in notes], ""]
    for heading, header, rows in sections[:1]:
        lines += _markdown_table(heading, header, rows, cell)
    for name in images:
        lines += [f"## {IMAGE_CAPTIONS[name]}", "", f"![{IMAGE_CAPTIONS[name]}]({name})", ""]
    for heading, header, rows in sections[1:]:
        lines += _markdown_table(heading, header, rows, cell)
    return "\n".join(lines)


def _markdown_table(heading: str, header: list[str], rows: list[list[str]], cell: Any) -> list[str]:
    return [f"## {heading}", "", "| " + " | ".join(map(cell, header)) + " |",
            "|" + "---|" * len(header), *["| " + " | ".join(map(cell, row)) + " |" for row in rows], ""]


def render_html(title: str, notes: Sequence[str], sections: Sequence[Section], images: dict[str, bytes]) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left;vertical-align:top}th{background:#f3f3f3}</style></head><body>",
             f"<h1>{esc(title)}</h1>", "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"]

    def table(heading: str, header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<h2>{esc(heading)}</h2><table><tr>{head}</tr>{body}</table>"

    parts += [table(*section) for section in sections[:1]]
    for name, png in images.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{IMAGE_CAPTIONS[name]}</h2><img alt='{IMAGE_CAPTIONS[name]}' src='data:image/png;base64,{data}'>")
    parts += [table(*section) for section in sections[1:]]
    return "\n".join(parts + ["</body></html>"])
