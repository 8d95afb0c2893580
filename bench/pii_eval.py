"""Precision and recall of the PII scanner on the labelled evaluation file.

    python bench/pii_eval.py [labelled.jsonl]

A finding is a true positive when its kind and exact value match a label of the
same line (each label matches at most once). Writes bench/results/pii.json and
prints a per-kind table.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LABELS = ROOT / "tests" / "assets" / "pii_labelled.jsonl"
RESULTS = ROOT / "bench" / "results" / "pii.json"

try:
    from finesmith.data.pii import KINDS, find_sensitive
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT / "src"))
    from finesmith.data.pii import KINDS, find_sensitive


def _ratio(num: int, den: int) -> float:
    # No predictions (or no labels) means nothing was wrong (or missed).
    return num / den if den else 1.0


def _score(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": round(_ratio(tp, tp + fp), 4),
        "recall": round(_ratio(tp, tp + fn), 4),
    }


def evaluate(path: Path = DEFAULT_LABELS) -> dict:
    """Per-kind and overall precision/recall of ``find_sensitive`` on a labelled JSONL file."""
    tp, fp, fn = Counter(), Counter(), Counter()
    lines = 0
    with path.open(encoding="utf-8") as f:
        for raw in f:
            row = json.loads(raw)
            lines += 1
            text = row["text"]
            found = Counter((m.kind, text[m.start : m.end]) for m in find_sensitive(text))
            wanted = Counter((label["kind"], label["value"]) for label in row["labels"])
            for (kind, _), count in (found & wanted).items():
                tp[kind] += count
            for (kind, _), count in (found - wanted).items():
                fp[kind] += count
            for (kind, _), count in (wanted - found).items():
                fn[kind] += count
    per_kind = {kind: _score(tp[kind], fp[kind], fn[kind]) for kind in KINDS}
    overall = _score(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    return {"file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
            "lines": lines, "per_kind": per_kind, "overall": overall}


def _table(result: dict) -> str:
    rows = [f"{'kind':<12} {'tp':>4} {'fp':>4} {'fn':>4} {'precision':>9} {'recall':>7}"]
    for kind, s in [*result["per_kind"].items(), ("OVERALL", result["overall"])]:
        counts = f"{s['tp']:>4} {s['fp']:>4} {s['fn']:>4}"
        rows.append(f"{kind:<12} {counts} {s['precision']:>9.3f} {s['recall']:>7.3f}")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    path = Path(argv[0]).resolve() if argv else DEFAULT_LABELS
    result = evaluate(path)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{result['lines']} lines from {result['file']}")
    print(_table(result))
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
