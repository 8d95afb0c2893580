"""Measure the share of held-out answers in the strict `Order: <number>` format.

For a model (built-in alias, model folder) or a finesmith run folder, generate greedy
answers for the held-out prompts of `make_data.py` and write a JSON report:

- `property_rate`: share of answers that are exactly one line `Order: <digits>` (the
  property the preference pairs teach; `has_property`);
- `correct_rate`: share in that format with the message's order number (both sides of
  every pair hold the right number, so this shows whether a model still reads the message
  or, over-optimised, has learned to stop early and cut the number short);
- `mentions_rate`: share of answers holding the right number anywhere, in any format (what
  the model found in the message, however it wrote it);
- `styles`: how the answers that break the format break it, and every answer.

    python examples/preference/measure.py smollm2-135m-instruct --output base.json
    python examples/preference/measure.py runs/preference/sft_dpo --output sft_dpo.json
    python examples/preference/measure.py --table base.json sft.json ...   # a Markdown table

`--table` also reads the training time from each run's `run.json` when the report's model
is a run folder.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

FORMAT = re.compile(r"Order: (\d+)")


def has_property(answer: str) -> bool:
    """True when the whole answer is one line `Order: <digits>` (surrounding whitespace ignored)."""
    return FORMAT.fullmatch(answer.strip()) is not None


def answer_value(answer: str) -> str | None:
    """The digits of an answer that has the property, else None."""
    found = FORMAT.fullmatch(answer.strip())
    return found.group(1) if found else None


def violation(answer: str) -> str:
    """A coarse name for how an answer breaks the format ("ok" when it does not)."""
    text = answer.strip()
    if has_property(text):
        return "ok"
    if "\n" in text:
        return "multi_line"
    if "**" in text:
        return "bold"
    if re.fullmatch(r"Order: \d+\D.*", text):
        return "extra_after_number"
    if re.fullmatch(r"#?\d+", text):
        return "bare_number"
    if text.startswith("Order:"):
        return "not_digits_after_label"
    if re.match(r"(?i)order (number|id|no\.?)\s*:", text):
        return "other_label"
    if len(text.split()) > 12:
        return "long_reply"
    return "other"


def load_heldout(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def measure(model_spec: str, heldout: list[dict], max_new_tokens: int, batch_size: int) -> dict:
    """Greedy answers for the held-out prompts and their property and correctness rates."""
    from finesmith.core.device import pick_device
    from finesmith.evaluate.generate import generate
    from finesmith.model.methods import load_for_inference

    model, tokenizer = load_for_inference(model_spec, device=str(pick_device()))
    started = time.perf_counter()
    answers = generate(model, tokenizer, [row["messages"] for row in heldout],
                       max_new_tokens=max_new_tokens, batch_size=batch_size)
    return {"model": model_spec, **score(answers, heldout), "generate_seconds": round(time.perf_counter() - started, 1),
            "max_new_tokens": max_new_tokens}


def score(answers: list[str], heldout: list[dict]) -> dict:
    """The rates, the violation counts and every answer, for answers in held-out order."""
    n = len(heldout)
    ok = [has_property(a) for a in answers]
    correct = [answer_value(a) == row["answer"] for a, row in zip(answers, heldout)]
    mentions = [re.search(rf"(?<!\d){row['answer']}(?!\d)", a) is not None for a, row in zip(answers, heldout)]
    return {"n": n, "property_rate": round(sum(ok) / n, 4), "correct_rate": round(sum(correct) / n, 4),
            "mentions_rate": round(sum(mentions) / n, 4),
            "styles": dict(Counter(violation(a) for a in answers).most_common()),
            "answers": [{"question": row["messages"][-1]["content"], "expected": row["answer"], "output": a,
                         "property": p} for row, a, p in zip(heldout, answers, ok)]}


def training_seconds(model_spec: str) -> list[float]:
    """Training-loop seconds of each run from the built-in model to `model_spec`, oldest first.

    A run whose base model is an export of another run (a staged run's merged stage) counts
    that run too, so SFT-then-DPO reads as both stages. Empty for a model that is no run.
    """
    record = Path(model_spec) / "run.json"
    if not record.is_file():
        return []
    run = json.loads(record.read_text(encoding="utf-8"))
    seconds = (run.get("result") or {}).get("seconds")
    base = Path((run.get("base_model") or {}).get("spec") or "") / "export.json"
    earlier = training_seconds(json.loads(base.read_text(encoding="utf-8"))["run"]) if base.is_file() else []
    return earlier + ([round(seconds)] if isinstance(seconds, (int, float)) else [])


def table(reports: list[Path]) -> str:
    lines = ["| model | property rate | format and right number | right number anywhere | training time |",
             "|---|---|---|---|---|"]
    for path in reports:
        report = json.loads(path.read_text(encoding="utf-8"))
        seconds = training_seconds(report["model"])
        time_text = " + ".join(f"{x} s" for x in seconds) if seconds else "—"
        lines.append(f"| {report.get('label') or report['model']} | {report['property_rate']:.1%} "
                     f"({round(report['property_rate'] * report['n'])}/{report['n']}) | {report['correct_rate']:.1%} | "
                     f"{report['mentions_rate']:.1%} | "
                     f"{time_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="built-in alias, model folder or run folder")
    parser.add_argument("--heldout", type=Path, default=Path(__file__).parent / "data" / "heldout.jsonl")
    parser.add_argument("--output", type=Path, help="JSON report to write")
    parser.add_argument("--label", help="name for the table (default: the model)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="enough for the format and for seeing that an answer goes on past it")
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--table", nargs="+", type=Path, metavar="REPORT", help="print a Markdown table of reports")
    parser.add_argument("--rescore", type=Path, metavar="REPORT",
                        help="score a report's saved answers again (after a change to the checker); no model needed")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    if args.rescore:
        report = json.loads(args.rescore.read_text(encoding="utf-8"))
        report.update(score([a["output"] for a in report["answers"]], load_heldout(args.heldout)))
        args.output = args.output or args.rescore
    elif not args.model or not args.output:
        parser.error("give a model and --output (or --table REPORT ..., or --rescore REPORT)")
    else:
        report = measure(args.model, load_heldout(args.heldout), args.max_new_tokens, args.batch_size)
        report["label"] = args.label
    args.label = report.get("label")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{args.label or report['model']}: property {report['property_rate']:.1%}, correct {report['correct_rate']:.1%}, "
          f"number anywhere {report['mentions_rate']:.1%} "
          f"on {report['n']} held-out prompts ({report['generate_seconds']:.0f}s generating) · {args.output}")
    print("  " + ", ".join(f"{k} {v}" for k, v in report["styles"].items()))


if __name__ == "__main__":
    main()
