"""Write a synthetic banking-intent data set: 10 intents, the intent list in the prompt.

Shaped like the held-out sets users evaluate few-shot prompting on (a Banking77-style
subset): the system prompt lists the 10 intents, a customer writes one to three sentences (about 35 tokens),
and the answer is an intent name of 5–8 tokens on SmolLM2's tokenizer (`card_arrival_delayed`
is 7), so a greedy answer needs several decoding steps and 10 shots make a prompt prefix of
about 1,000 tokens. Messages are made from templates with seeded randomness (no personal data,
reproducible).

    .venv/bin/python bench/banking_intents.py --output /tmp/banking --train 400 --test 400
    # writes /tmp/banking/train.jsonl and /tmp/banking/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INTENTS = {
    "card_arrival_delayed": [
        "I ordered a new card {days} days ago and it still has not arrived",
        "my replacement card was supposed to be here last week, where is it",
        "how long does the card delivery take, I have been waiting for {days} days",
        "the new card you sent to {city} never showed up in my mailbox",
    ],
    "activate_my_card": [
        "I just received my card, how do I activate it",
        "the app does not let me activate the card that came in the post",
        "what are the steps to start using my new card",
        "my card arrived today but it says it is inactive",
    ],
    "card_payment_not_recognised": [
        "there is a payment of {amount} on my card that I did not make",
        "I see a card payment to a shop in {city} that I do not recognise",
        "someone used my card for {amount}, it was not me",
        "a strange card transaction showed up yesterday and I never bought anything there",
    ],
    "exchange_rate_charged_wrong": [
        "the exchange rate on my payment in {currency} was worse than the official one",
        "you converted my {currency} purchase at the wrong rate",
        "why was I charged a different exchange rate than the one shown in the app",
        "the rate applied to my {amount} transfer in {currency} seems wrong",
    ],
    "pending_top_up_reversed": [
        "my top-up of {amount} was pending and then it disappeared",
        "I topped up {amount} but the transaction got reversed",
        "the top-up from my other bank was cancelled after showing as pending",
        "why did my pending top-up of {amount} get reverted",
    ],
    "cash_withdrawal_fee_charged": [
        "I was charged a fee for taking out cash at an ATM in {city}",
        "why is there a {fee} fee on my cash withdrawal",
        "I thought withdrawals were free but I paid {fee} at the machine",
        "the ATM withdrawal of {amount} came with an extra charge",
    ],
    "transfer_fee_charged": [
        "I sent {amount} to my friend and you took a {fee} fee",
        "why did my bank transfer cost me {fee}",
        "there is a charge on the transfer I made to {city}",
        "I was not told that transfers have a fee, but I paid {fee}",
    ],
    "verify_identity_documents_failed": [
        "the app keeps rejecting the photo of my passport",
        "my identity verification failed for the third time",
        "I uploaded my driving licence but the check did not go through",
        "why can I not verify my identity, the documents are valid",
    ],
    "beneficiary_not_allowed": [
        "I cannot add my landlord as a beneficiary, the app says not allowed",
        "adding a new payee in {city} gives me an error",
        "the beneficiary I entered is blocked and I do not know why",
        "why am I not allowed to add this account as a recipient",
    ],
    "lost_or_stolen_phone": [
        "my phone was stolen in {city} and the banking app is on it",
        "I lost my phone, how do I protect my account",
        "someone took my phone last night, please block the app",
        "my mobile is gone and I am worried about my money",
    ],
}
OPENERS = ["", "Hi, ", "Hello, ", "Good morning, ", "Hey there, ", "Sorry to bother you, "]
CLOSERS = ["", " Can you help?", " Please look into it.", " What should I do now?",
           " This is really frustrating.", " I need this sorted today.", " Thanks in advance."]
DETAILS = ["", " I have been a customer for {years} years and this never happened before.",
           " I checked the app twice this morning and also restarted my phone, nothing changed.",
           " My partner had the same thing last month and it took ages to resolve.",
           " I already tried the help section in the app but could not find an answer there.",
           " I am travelling at the moment and only have this account to pay for things."]
CITIES = ["Lisbon", "Berlin", "Madrid", "Warsaw", "Dublin", "Milan", "Prague", "Vienna"]
CURRENCIES = ["euros", "dollars", "pounds", "yen", "Swiss francs", "zloty"]
SYSTEM = ("You are a banking assistant. Classify the customer's message into exactly one of these intents: "
          + ", ".join(INTENTS) + ". Reply with the intent name only.")


def message(rng: random.Random, template: str) -> str:
    """One customer message from a template: filled slots, an opener and a closer."""
    text = template.format(days=rng.randint(3, 30), city=rng.choice(CITIES), currency=rng.choice(CURRENCIES),
                           amount=f"{rng.randint(5, 900)}.{rng.randint(0, 99):02d} EUR",
                           fee=f"{rng.randint(1, 9)}.{rng.randint(0, 99):02d} EUR")
    opener = rng.choice(OPENERS)
    first = text[0].upper() + text[1:] if not opener else text
    detail = rng.choice(DETAILS).format(years=rng.randint(2, 12))
    return f"{opener}{first}.{detail}{rng.choice(CLOSERS)}"


def make(n: int, rng: random.Random) -> list[dict]:
    """n chat rows, intents in turn (shuffled), each a system prompt, a message and its intent."""
    names = list(INTENTS)
    rows = []
    for i in range(n):
        intent = names[i % len(names)]
        rows.append({"messages": [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": message(rng, rng.choice(INTENTS[intent]))},
                                  {"role": "assistant", "content": intent}]})
    rng.shuffle(rows)
    return rows


def write(folder: Path, train: int, test: int, seed: int = 0) -> tuple[Path, Path]:
    """Write `train.jsonl` and `test.jsonl` (different seeds) under `folder`; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "test.jsonl"
    for path, n, offset in ((paths[0], train, 0), (paths[1], test, 1)):
        rows = make(n, random.Random(seed * 2 + offset))
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write(Path(args.output), args.train, args.test, args.seed):
        print(path)


if __name__ == "__main__":
    main()
