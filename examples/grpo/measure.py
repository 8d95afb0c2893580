"""Measure a model on the GRPO demo's held-out problems: greedy answers, the share that are
exactly `Answer: N` with the right N (`accuracy`), and the share in that format at all.

    python examples/grpo/measure.py MODEL_OR_RUN --label NAME --output result.json
    python examples/grpo/measure.py --table a.json b.json ...
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from rewards import LINE, correct  # noqa: E402


def measure(model: str, label: str) -> dict:
    from finesmith.evaluate.generate import generate
    from finesmith.evaluate.stats import wilson_interval
    from finesmith.model.methods import load_for_inference

    rows = [json.loads(line) for line in (HERE / "data" / "heldout.jsonl").read_text().splitlines()]
    net, tokenizer = load_for_inference(model, None, "cpu")
    prompts = [[row["messages"][0]] for row in rows]
    answers = generate(net, tokenizer, prompts, max_new_tokens=12)
    right = sum(correct(a, row["answer"]) for a, row in zip(answers, rows))
    shaped = sum(LINE.fullmatch(a.strip()) is not None for a in answers)
    low, high = wilson_interval(int(right), len(rows))
    return {"model": model, "label": label, "n": len(rows), "accuracy": right / len(rows),
            "accuracy_ci": [low, high], "format_rate": shaped / len(rows),
            "answers": [{"question": r["messages"][0]["content"], "answer": a, "expected": r["answer"]}
                        for r, a in zip(rows, answers)]}


def table(paths: list[str]) -> str:
    lines = ["| model | accuracy (95% CI) | `Answer: N` format |", "|---|---|---|"]
    for path in paths:
        r = json.loads(Path(path).read_text())
        lo, hi = r["accuracy_ci"]
        lines.append(f"| {r['label']} | {r['accuracy']:.1%} ({round(r['accuracy'] * r['n'])}/{r['n']}; "
                     f"[{lo:.1%}, {hi:.1%}]) | {r['format_rate']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--label", default="")
    parser.add_argument("--output")
    parser.add_argument("--table", nargs="+")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    result = measure(args.model, args.label or args.model)
    Path(args.output).write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"{result['label']}: accuracy {result['accuracy']:.1%}, format {result['format_rate']:.1%}")


if __name__ == "__main__":
    main()
