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

from finesmith.evaluate.stats import paired_difference, verdict, wilson_interval
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
        row = {"preference accuracy": _with_ci(m["accuracy"], m.get("accuracy_ci")), "log-prob margin": f"{m['mean_logp_margin']:.2f}",
               "chosen log-prob": f"{m['chosen_logp']:.2f}", "rejected log-prob": f"{m['rejected_logp']:.2f}"}
        if "reward_accuracy" in m:
            row["reward accuracy"] = f"{m['reward_accuracy']:.1%}"
            row["reward margin"] = f"{m['mean_reward_margin']:.3f}"
        return row
    if result.task == "generation":
        m = result.metrics["generate"]
        return {"exact match": _with_ci(m["exact_match"], m.get("exact_match_ci")),
                "token F1": _with_ci(m["token_f1"], m.get("token_f1_ci"), "{:.3f}"),
                "ROUGE-L": f"{m['rouge_l']:.3f}", "chrF": f"{m['chrf']:.1f}"}
    row = {}
    for scoring, m in result.metrics.items():
        row[f"accuracy ({SCORING_NAMES[scoring]})"] = _with_ci(m["accuracy"], m.get("accuracy_ci"))
        row[f"macro-F1 ({SCORING_NAMES[scoring]})"] = _with_ci(m["macro_f1"], m.get("macro_f1_ci"), "{:.3f}")
        if "calibration" in m:
            row["calibration error (ECE)"] = f"{m['calibration']['ece']:.3f}"
    return row


def _with_ci(value: float, ci: Sequence[float] | None, form: str = "{:.1%}") -> str:
    """`72.5% [65.1%, 79.0%]`: a value and its 95% interval, when there is one."""
    text = form.format(value)
    return text if not ci else f"{text} [{form.format(ci[0])}, {form.format(ci[1])}]"


def headline_interval(result: EvalResult) -> tuple[float, float] | None:
    """The 95% Wilson interval of an entry's headline accuracy (None without one)."""
    correct = result.correctness()
    return None if correct is None else wilson_interval(sum(correct), len(correct))


def paired_rows(entries: Sequence[tuple[str, EvalResult]], tuned_names: Sequence[str]
                ) -> tuple[list[str], list[str], list[list[str]]]:
    """The headline verdicts and the table of paired comparisons on the same examples.

    Each fine-tuned entry (named in `tuned_names`) is compared with the best prompting entry
    (highest headline accuracy among the others), with every other prompting entry, and with
    each other fine-tuned entry. Returns (headline sentences, header, rows).
    """
    scored = [(name, r, r.correctness()) for name, r in entries]
    scored = [(name, r, c) for name, r, c in scored if c is not None]
    prompting = [(name, r, c) for name, r, c in scored if name not in tuned_names]
    tuned = [(name, r, c) for name, r, c in scored if name in tuned_names]
    pairs: list[tuple[tuple, tuple]] = []
    best = max(prompting, key=lambda e: e[1].accuracy) if prompting else None
    for entry in tuned:
        pairs += [(entry, other) for other in ([best] if best else []) + [p for p in prompting if p is not best]]
    pairs += [(a, b) for i, a in enumerate(tuned) for b in tuned[i + 1:]]
    if not tuned and len(prompting) > 1:
        pairs += [(best, other) for other in prompting if other is not best]
    headlines, rows = [], []
    header = ["A", "B", "A − B (points)", "95% CI (points)", "only A right", "only B right", "McNemar p", "verdict"]
    for (name_a, _, a), (name_b, _, b) in pairs:
        if len(a) != len(b):
            continue
        paired = paired_difference(a, b)
        words = verdict(name_a, name_b, paired)
        if best is not None and name_b == best[0] and (not tuned or name_a in tuned_names):
            headlines.append(words)
        low, high = paired["ci"]
        p = paired["p_value"]
        rows.append([name_a, name_b, f"{paired['difference'] * 100:+.1f}", f"[{low * 100:+.1f}, {high * 100:+.1f}]",
                     str(paired["only_a"]), str(paired["only_b"]), "< 0.001" if p < 0.001 else f"{p:.3f}",
                     "A better" if p < 0.05 and paired["difference"] > 0 else
                     "B better" if p < 0.05 and paired["difference"] < 0 else "cannot tell"])
    return headlines, header, rows


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


def reward_rows(runs: Sequence[tuple[str, Path]]) -> tuple[list[str], list[list[str]]] | None:
    """Before/after rows for runs that logged a held-out reward (`objective: grpo`): the mean
    reward of greedy answers on the eval prompts at step 0 and at the last eval, per function."""
    header: list[str] = ["run", "step", "reward before", "reward after", "change"]
    rows, extra = [], []
    for name, folder in runs:
        path = Path(folder) / "metrics.jsonl"
        if not path.is_file():
            continue
        evals = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if '"eval_reward"' in line]
        if not evals:
            continue
        first, last = evals[0], evals[-1]
        parts = [k for k in last if k.startswith("eval_reward_")]
        extra += [k for k in parts if k not in extra]
        rows.append((name, first, last, parts))
    if not rows:
        return None
    header += [f"{k[len('eval_reward_'):]} after" for k in extra]
    out = []
    for name, first, last, _ in rows:
        change = last["eval_reward"] - first["eval_reward"]
        out.append([name, f"{first['step']} → {last['step']}", f"{first['eval_reward']:.3f}",
                    f"{last['eval_reward']:.3f}", f"{change:+.3f}"] + [f"{last.get(k, float('nan')):.3f}" for k in extra])
    return header, out


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
    intervals = [headline_interval(r) for _, r in entries if r.accuracy is not None]
    errors = [[max(0.0, v - ci[0]) if ci else 0.0 for v, ci in zip(values, intervals)],
              [max(0.0, ci[1] - v) if ci else 0.0 for v, ci in zip(values, intervals)]]
    ax.barh(range(len(values)), values, xerr=errors, capsize=4, color=[f"C{i}" for i in range(len(values))])
    ax.set_yticks(range(len(values)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (headline), with 95% Wilson interval")
    for i, value in enumerate(values):
        if value + errors[1][i] > 0.85:  # no room right of the bar: write inside it, left of the interval
            ax.text(value - errors[0][i] - 0.01, i, f"{value:.1%}", va="center", ha="right", color="white")
        else:
            ax.text(value + errors[1][i] + 0.01, i, f"{value:.1%}", va="center")
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


STATS_NOTE = ("Intervals are 95%: Wilson score intervals for accuracies and exact match, percentile bootstrap "
              "(2,000 resamples) for F1. Paired comparisons use the same examples: the difference with Newcombe's "
              "paired interval and McNemar's exact test on the examples only one of the two got right; "
              "\"beats\" means p < 0.05. Calibration error (ECE) compares the label log-likelihood's confidence "
              "with its accuracy over 10 bins (0 = perfectly calibrated).")


def write_report(entries: Sequence[tuple[str, EvalResult]], runs: Sequence[tuple[str, Path]], output: Path,
                 title: str, notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write `report.md` (with PNG files beside it) and a self-contained `report.html`.

    The verdict comes first (each fine-tuned run against the best prompting result, as a
    paired test on the same examples), then the results table with 95% intervals, the charts,
    the paired comparisons, and the per-class tables folded below.

    Args:
        entries: (approach name, result) pairs, all on the same held-out file.
        runs: (name, run folder) of the fine-tuned entries (the other entries are prompting
            approaches); each run's `metrics.jsonl` gives the loss curves.
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
    headlines, paired_header, paired = paired_rows(entries, [name for name, _ in runs])
    sections: list[Section] = [("Results", *results_rows(entries), False)]
    late: list[Section] = []
    if paired:
        late.append(("Paired comparisons (same examples)", paired_header, paired, False))
    rewards = reward_rows(runs)
    if rewards:
        sections.append(("Held-out reward (reinforcement fine-tuning, measured in training)", *rewards, False))
    if any("tool_calls" in r.metrics for _, r in entries):
        late.append(("Tool calls", *tool_call_rows(entries), False))
    for name, result in entries:
        if result.task == "classification":
            late.append((f"Per-class metrics · {name}", *per_class_rows(result), True))
    if any(r.predictions for _, r in entries):
        late.append(("Sample outputs", *sample_rows(entries), True))
    notes = list(notes) + shot_notes(entries)
    markdown, page = output / "report.md", output / "report.html"
    markdown.write_text(render_markdown(title, notes, headlines, sections + late, images), encoding="utf-8")
    page.write_text(render_html(title, notes, headlines, sections + late, images), encoding="utf-8")
    return markdown, page


def shot_notes(entries: Sequence[tuple[str, EvalResult]]) -> list[str]:
    """One line per k-shot entry saying which shots it showed, in which order."""
    lines = []
    for name, result in entries:
        info = result.shot_info
        if not info:
            continue
        if info.get("fixed"):
            order = ", ".join(info.get("order", []))
            lines.append(f"{name}: the same {result.shots} {info['strategy']} shots before every query, "
                         f"in this order: {order}")
        else:
            lines.append(f"{name}: {info['strategy']} shots chosen per query")
    return lines


Section = tuple[str, list[str], list[list[str]], bool]  # heading, header, rows, folded
IMAGE_CAPTIONS = {"accuracy.png": "Accuracy", "loss_curves.png": "Training and eval loss"}


def render_markdown(title: str, notes: Sequence[str], headlines: Sequence[str], sections: Sequence[Section],
                    images: dict[str, bytes]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", ""]
    if headlines:
        lines += ["## Verdict", "", *[f"**{h}**" if i == 0 else h for i, h in enumerate(headlines)], ""]
    lines += [*[f"- {note}" for note in notes], ""]
    for heading, header, rows, folded in sections[:1]:
        lines += _markdown_table(heading, header, rows, cell, folded)
    for name in images:
        lines += [f"## {IMAGE_CAPTIONS[name]}", "", f"![{IMAGE_CAPTIONS[name]}]({name})", ""]
    for heading, header, rows, folded in sections[1:]:
        lines += _markdown_table(heading, header, rows, cell, folded)
    lines += ["## How to read the numbers", "", STATS_NOTE, ""]
    return "\n".join(lines)


def _markdown_table(heading: str, header: list[str], rows: list[list[str]], cell: Any, folded: bool = False
                    ) -> list[str]:
    table = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header),
             *["| " + " | ".join(map(cell, row)) + " |" for row in rows], ""]
    if folded:
        return [f"<details><summary>{heading}</summary>", "", *table, "</details>", ""]
    return [f"## {heading}", "", *table]


def render_html(title: str, notes: Sequence[str], headlines: Sequence[str], sections: Sequence[Section],
                images: dict[str, bytes]) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left;vertical-align:top}th{background:#f3f3f3}"
             ".verdict{font-size:1.15em;background:#f5f9ff;border-left:4px solid #3572b0;padding:.6em 1em}"
             "details{margin:.6em 0}summary{cursor:pointer;font-weight:600}</style></head><body>",
             f"<h1>{esc(title)}</h1>"]
    if headlines:
        parts.append("<div class='verdict'>" + "".join(
            f"<p>{'<b>' if i == 0 else ''}{esc(h)}{'</b>' if i == 0 else ''}</p>" for i, h in enumerate(headlines))
            + "</div>")
    parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")

    def table(heading: str, header: list[str], rows: list[list[str]], folded: bool) -> str:
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
        grid = f"<table><tr>{head}</tr>{body}</table>"
        return f"<details><summary>{esc(heading)}</summary>{grid}</details>" if folded else f"<h2>{esc(heading)}</h2>{grid}"

    parts += [table(*section) for section in sections[:1]]
    for name, png in images.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{IMAGE_CAPTIONS[name]}</h2><img alt='{IMAGE_CAPTIONS[name]}' src='data:image/png;base64,{data}'>")
    parts += [table(*section) for section in sections[1:]]
    parts.append(f"<h2>How to read the numbers</h2><p>{esc(STATS_NOTE)}</p>")
    return "\n".join(parts + ["</body></html>"])
