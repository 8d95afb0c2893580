"""Write the built-in demo task: triage support tickets into `category / priority`.

The tickets are synthetic (made from templates with seeded randomness), so the data is
free of personal information and reproducible. Category follows from what the ticket is
about; priority from urgency cues ("production is down", "no rush", ...), which a small
model cannot guess zero-shot in the exact answer format but can learn from a few
hundred examples.

    python examples/support_triage/make_data.py   # rewrites src/finesmith/resources/demo/
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = ("Triage the ticket. Reply: <category> / <priority>. Categories: billing, account, "
          "shipping, technical, feature_request. Priorities: low, medium, high.")

PROBLEMS = {
    "billing": [
        "I was charged twice for my {plan} subscription this month",
        "my invoice {num} shows the wrong amount",
        "the refund for order {num} never arrived on my card",
        "I got billed after cancelling my {plan} plan",
        "your system charged my card {amount} instead of the quoted price",
        "the VAT on invoice {num} is calculated wrong",
        "I need a corrected receipt for the payment of {amount}",
        "my discount code was not applied and I paid {amount}",
    ],
    "account": [
        "I can't log in, the password reset email never comes",
        "my account got locked after too many sign-in attempts",
        "two-factor codes from the authenticator app are rejected",
        "I want to change the email address on my account",
        "please merge my two user profiles into one",
        "I lost access to the phone I used for verification",
        "the username on my profile is misspelled and I cannot edit it",
        "I need to delete my account and all my personal data",
    ],
    "shipping": [
        "my package {num} has been stuck in transit for {days} days",
        "the courier marked order {num} as delivered but nothing arrived",
        "I received the wrong item in parcel {num}",
        "the box for order {num} arrived damaged",
        "can you ship order {num} to a different address",
        "the tracking link for shipment {num} does not work",
        "only half of order {num} was delivered",
        "delivery of order {num} is late by {days} days",
    ],
    "technical": [
        "the app crashes every time I open the {feature} screen",
        "exporting a report gives error code {code}",
        "the {feature} page loads forever and never finishes",
        "sync between the desktop and mobile app stopped working",
        "the API returns {code} for every request since this morning",
        "uploading files larger than {size} MB fails",
        "search results in {feature} are empty even though data exists",
        "the dashboard shows a blank white page after the update",
    ],
    "feature_request": [
        "it would be great to have a dark mode in {feature}",
        "please add an option to export {feature} data as CSV",
        "could you support keyboard shortcuts in {feature}",
        "I would love a calendar integration for {feature}",
        "please let us set custom roles for team members",
        "an offline mode for the mobile app would help a lot",
        "can you add bulk editing to {feature}",
        "it would be nice to schedule reports by email",
    ],
}

URGENCY = {
    "high": [
        "This is urgent, our whole team is blocked.",
        "Production is down and we are losing sales every minute.",
        "Please fix this immediately, it affects all our customers.",
        "URGENT: we have a client demo in one hour.",
        "This is critical for us and needs attention right now.",
        "We cannot work at all until this is solved, please hurry.",
    ],
    "medium": [
        "Could you look into it this week?",
        "It is annoying but we have a workaround for now.",
        "Please take a look when your team can.",
        "It happens to a few of our users.",
        "We would appreciate a fix in the next days.",
        "Let me know what you find.",
    ],
    "low": [
        "No rush at all, just wanted to let you know.",
        "Whenever you get a chance, it is only a minor thing.",
        "Not important, just a small suggestion.",
        "Low priority, it can wait until a future release.",
        "Just curious, nothing is blocked.",
        "No hurry, it does not affect our work.",
    ],
}
# Feature requests are rarely urgent in practice; keep that skew so priority is not uniform.
PRIORITY_WEIGHTS = {"feature_request": (0.1, 0.3, 0.6)}

GREETINGS = ["Hi,", "Hello team,", "Hey support,", "Good morning,", "", "Dear support,"]
SIGNOFFS = ["Thanks.", "Best regards, {name}", "Cheers, {name}", "", "Thank you!", "- {name}"]
NAMES = ["Ana", "Ben", "Chen", "Dana", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jin", "Kai", "Lea"]
FEATURES = ["reports", "billing history", "projects", "inbox", "analytics", "settings", "calendar"]
PLANS = ["Pro", "Team", "Basic", "Enterprise"]


def ticket(rng: random.Random) -> tuple[str, str]:
    category = rng.choice(sorted(PROBLEMS))
    priority = rng.choices(["high", "medium", "low"], weights=PRIORITY_WEIGHTS.get(category, (1, 1, 1)))[0]
    problem = rng.choice(PROBLEMS[category]).format(
        plan=rng.choice(PLANS), num=f"#{rng.randint(10000, 99999)}", amount=f"${rng.randint(9, 499)}.{rng.randint(0, 99):02d}",
        days=rng.randint(3, 21), feature=rng.choice(FEATURES), code=rng.choice(["500", "403", "E-1042", "timeout"]),
        size=rng.choice([10, 25, 50, 100]))
    parts = [rng.choice(GREETINGS), problem[0].upper() + problem[1:] + ".", rng.choice(URGENCY[priority]),
             rng.choice(SIGNOFFS).format(name=rng.choice(NAMES))]
    if rng.random() < 0.5:  # urgency before the problem sometimes, so position is not a shortcut
        parts[1], parts[2] = parts[2], parts[1]
    return " ".join(p for p in parts if p), f"{category} / {priority}"


def make(n: int, rng: random.Random, seen: set[str]) -> list[dict]:
    rows = []
    while len(rows) < n:
        text, label = ticket(rng)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"messages": [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": text},
                                  {"role": "assistant", "content": label}]})
    return rows


def main() -> None:
    out = Path(__file__).resolve().parents[2] / "src" / "finesmith" / "resources" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    rng, seen = random.Random(20261126), set()
    for name, n in (("train", 300), ("eval", 100)):
        rows = make(n, rng, seen)
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} examples to {out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
