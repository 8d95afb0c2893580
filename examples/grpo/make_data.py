"""Write the GRPO demo's data: small arithmetic word problems with a strict answer line.

Every prompt asks for one line `Answer: <number>`; the reference answer is that line, and
the row also carries the number itself (`answer`), which the reward functions receive.

- data/sft.jsonl: 40 solved problems (a short SFT stage teaches the format);
- data/prompts.jsonl: 160 problems for GRPO (the model answers them itself);
- data/heldout.jsonl: 80 other problems, measured for every model.

Seeded, so the files are the same every time.  python examples/grpo/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
THINGS = ["apples", "books", "coins", "stamps", "marbles", "shells", "pencils", "cards", "boxes", "tickets"]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
INSTRUCTION = "Reply with one line: Answer: <number>"


def problem(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if rng.random() < 0.5:
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now? {INSTRUCTION}", a + b
    a, b = max(a, b), min(a, b)
    return f"{name} has {a} {thing} and gives away {b}. How many {thing} are left? {INSTRUCTION}", a - b


def rows(rng: random.Random, n: int, seen: set[str]) -> list[dict]:
    out = []
    while len(out) < n:
        question, answer = problem(rng)
        if question in seen:
            continue
        seen.add(question)
        out.append({"messages": [{"role": "user", "content": question},
                                 {"role": "assistant", "content": f"Answer: {answer}"}], "answer": answer})
    return out


def main() -> None:
    rng, seen = random.Random(7), set()
    folder = HERE / "data"
    folder.mkdir(exist_ok=True)
    for name, n in (("heldout", 80), ("sft", 40), ("prompts", 160)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows(rng, n, seen):
                f.write(json.dumps(row) + "\n")
    print(f"wrote {folder}/sft.jsonl (40), prompts.jsonl (160), heldout.jsonl (80)")


if __name__ == "__main__":
    main()
