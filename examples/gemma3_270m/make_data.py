"""Write the Gemma 3 270M example's task: rewrite a date written in words as `YYYY-MM-DD`.

Dates come in the ways people write them ("the 5th of March, 2021", "Fri, Mar 5 2021",
"5 March 2021", ...) inside a short sentence. A base model does not answer in the exact
ISO form zero-shot; a few hundred examples teach it the month numbers and the zero padding.
The rows are synthetic (seeded), so the data is reproducible and free of personal data.

    python examples/gemma3_270m/make_data.py OUT_FOLDER   # writes train.jsonl and heldout.jsonl
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sys
from pathlib import Path

INSTRUCTION = "Write the date in this sentence as YYYY-MM-DD."
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SENTENCES = ["The meeting was moved to {date}.", "She was born on {date}.", "Invoice due {date}.",
             "We shipped the order on {date}.", "The lease ends {date}.", "Flight booked for {date}.",
             "Results are published on {date}.", "He retired on {date}.", "Deadline: {date}.",
             "The concert is on {date}."]


def ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def spell(date: dt.date, style: int) -> str:
    """One of seven everyday spellings of `date`."""
    month, short, weekday = MONTHS[date.month - 1], MONTHS[date.month - 1][:3], date.strftime("%A")
    return [f"{month} {date.day}, {date.year}",
            f"{date.day} {month} {date.year}",
            f"the {ordinal(date.day)} of {month}, {date.year}",
            f"{short} {date.day} {date.year}",
            f"{weekday}, {month} {ordinal(date.day)}, {date.year}",
            f"{date.day} {short}. {date.year}",
            f"{weekday[:3]}, {short} {date.day} {date.year}"][style]


def example(rng: random.Random) -> dict:
    date = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(365 * 100))
    sentence = rng.choice(SENTENCES).format(date=spell(date, rng.randrange(7)))
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n{sentence}"},
                         {"role": "assistant", "content": date.isoformat()}]}


def main(out: Path, train: int = 240, heldout: int = 100, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = [example(rng) for _ in range(train + heldout)]
    seen, unique = set(), []
    for row in rows:  # a held-out sentence never appears in training
        key = row["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            unique.append(row)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", unique[:train]), ("heldout.jsonl", unique[train:train + heldout])):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        print(f"wrote {out / name} ({len(part)} rows)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gemma3_270m/data"))
