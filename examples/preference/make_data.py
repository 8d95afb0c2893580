"""Write a preference task whose preferred property a program can check: a strict reply format.

Every prompt is a customer message to a shop's support desk, under one system
instruction: find the order number and reply with exactly one line, `Order: <number>`.
Messages hold other numbers too (quantities, prices, dates, phone extensions), so the
value takes reading, but a small model can copy it. The preferred answer is that line
with the right number; the rejected answer holds the same right number but breaks the
format the way chat models do: a friendly support reply, a sentence, another label
(`Order number:`), `#` kept from the message, Markdown bold, quotes, the bare number, or a
second line of explanation. Because the value agrees on both sides, a pair teaches only
the format, and `measure.py` checks exactly that (`has_property`); it also reports
whether the value is right, which shows whether a model kept reading the message.

Three disjoint sets of messages are written:

- `sft.jsonl`: chat rows (system, user, assistant) with the preferred answer. Deliberately
  small (60 by default), so a short SFT run teaches the format only part of the way and a
  preference stage has something left to add.
- `pairs.jsonl`: `{"prompt": [messages], "chosen", "rejected", "style"}` (240 by default);
  `style` names the violation and is ignored by training.
- `heldout.jsonl`: `{"messages": [system, user], "answer": "<number>"}` (80 by default),
  never seen in training, for `measure.py`.

Messages come from templates with seeded randomness over small vocabularies (products,
problems, names), so the data is synthetic, free of personal information and reproducible.

    python examples/preference/make_data.py              # writes into examples/preference/data/
    python examples/preference/make_data.py --out DIR    # or into DIR
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

SYSTEM = ("Find the order number in the customer's message. Reply with exactly one line: "
          "Order: <number>. No other text.")
PRODUCTS = ["desk lamp", "coffee grinder", "rain jacket", "phone case", "yoga mat", "backpack", "kettle",
            "pair of headphones", "wall clock", "blender", "bike light", "set of towels"]
PROBLEMS = ["arrived broken", "never arrived", "is the wrong colour", "stopped working after two days",
            "came without the manual", "is missing a part", "was delivered to my neighbour", "is too small"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NAMES = ["Anna", "Tom", "Priya", "Jonas", "Leila", "Marco", "Chen", "Fatima", "Olga", "Sam", "Ines", "Kwame"]
ORDINALS = {2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth"}
# How the message refers to the order number; the answer always gives the digits alone.
REFERENCES = ["order {n}", "order #{n}", "order number {n}", "order no. {n}", "order ID {n}", "#{n}"]


@dataclass(frozen=True)
class Message:
    """One customer message and its order number (as digits)."""

    text: str
    order: str
    product: str
    problem: str


def _message(rng: random.Random) -> Message:
    order = str(rng.randint(10_000, 9_999_999))
    ref = rng.choice(REFERENCES).format(n=order)
    product, problem, name = rng.choice(PRODUCTS), rng.choice(PROBLEMS), rng.choice(NAMES)
    qty, price, day, month = rng.randint(2, 6), rng.randint(12, 240), rng.randint(1, 28), rng.choice(MONTHS)
    extension = rng.randint(100, 999)
    text = rng.choice([
        f"Hi, the {product} from {ref} {problem}. I paid ${price} on {month} {day}. Can you help? {name}",
        f"Hello, I bought {qty} items on {month} {day} and the {product} {problem}. It was {ref}. Thanks, {name}",
        f"{ref[0].upper() + ref[1:]}: my {product} {problem}. I would like a refund of ${price}.",
        f"Good morning. I am writing about {ref}, placed on {month} {day} for ${price}. The {product} {problem}.",
        f"My {product} {problem}! This is the {ORDINALS[qty]} time. Please check {ref} and call me at extension {extension}.",
        f"Dear support, {ref} had {qty} parcels. The one with the {product} {problem}. Regards, {name}",
        f"hey, {product} {problem}, ordered it {month} {day}, {ref}, total ${price}. what now?",
        f"I was charged ${price} twice for {ref}. Also the {product} {problem}. {name}",
    ])
    return Message(text, order, product, problem)


def chosen_answer(m: Message) -> str:
    return f"Order: {m.order}"


# Each violation keeps the right number, so a pair differs only in format. Names are
# written to pairs.jsonl as `style`, which lets a reader count what the data shows.
def rejected_answer(m: Message, style: str, rng: random.Random) -> str:
    n = m.order
    if style == "support_reply":
        return rng.choice([
            f"Thank you for reaching out! I'm sorry to hear that your {m.product} {m.problem}. "
            f"Your order number is {n}. We will look into it right away.",
            f"Hi! Thanks for contacting us. I found your order: {n}. Our team will get back to you within 24 hours.",
        ])
    if style == "sentence":
        return rng.choice([f"The order number is {n}.", f"The customer's order number is {n}."])
    if style == "other_label":
        return rng.choice([f"Order number: {n}", f"Order ID: {n}", f"order: {n}"])
    if style == "hash":
        return f"Order: #{n}"
    if style == "bold":
        return f"**Order:** {n}"
    if style == "quoted":
        return f'Order: "{n}"'
    if style == "bare":
        return n
    if style == "explain_after":
        return f"Order: {n}\nThe customer says the {m.product} {m.problem}."
    raise ValueError(f"unknown style {style}")


STYLES = ("support_reply", "sentence", "other_label", "hash", "bold", "quoted", "bare", "explain_after")


def unique_messages(rng: random.Random, n: int) -> list[Message]:
    """`n` messages with pairwise different texts and order numbers."""
    texts: set[str] = set()
    orders: set[str] = set()
    out = []
    while len(out) < n:
        m = _message(rng)
        if m.text not in texts and m.order not in orders:
            texts.add(m.text)
            orders.add(m.order)
            out.append(m)
    return out


def prompt_messages(m: Message) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": m.text}]


def build(seed: int = 0, n_sft: int = 60, n_pairs: int = 240, n_heldout: int = 80) -> dict[str, list[dict]]:
    """The three row lists, from disjoint messages."""
    rng = random.Random(seed)
    messages = unique_messages(rng, n_sft + n_pairs + n_heldout)
    heldout, sft, pairs = (messages[:n_heldout], messages[n_heldout:n_heldout + n_sft],
                           messages[n_heldout + n_sft:])
    pair_rows = []
    for index, m in enumerate(pairs):
        style = STYLES[index % len(STYLES)]  # every violation equally often
        pair_rows.append({"prompt": prompt_messages(m), "chosen": chosen_answer(m),
                          "rejected": rejected_answer(m, style, rng), "style": style})
    rng.shuffle(pair_rows)
    return {
        "sft": [{"messages": prompt_messages(m) + [{"role": "assistant", "content": chosen_answer(m)}]} for m in sft],
        "pairs": pair_rows,
        "heldout": [{"messages": prompt_messages(m), "answer": m.order} for m in heldout],
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", type=int, default=60, help="SFT rows (keep small: SFT should not saturate)")
    parser.add_argument("--pairs", type=int, default=240)
    parser.add_argument("--heldout", type=int, default=80)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sets = build(args.seed, args.sft, args.pairs, args.heldout)
    for name, rows in sets.items():
        write_jsonl(args.out / f"{name}.jsonl", rows)
    print(", ".join(f"{len(rows)} {name}" for name, rows in sets.items()) + f" rows written to {args.out}")


if __name__ == "__main__":
    main()
