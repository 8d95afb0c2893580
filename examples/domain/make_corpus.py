"""Write the example corpus: a service manual for the Tarnwell HX-40, a fictional heat-exchange controller.

Reference pages (error codes, settings, commands) are generated from the tables below with
seeded phrasing, like real manuals generated from a product database; a few overview
chapters are written out. One page is copied exactly and one is a lightly edited revision,
so ingestion has an exact and a near duplicate to remove. Also writes the Q&A set
(`qa_train.jsonl`, `qa_eval.jsonl`) whose answers come from the same tables.

Run: python examples/domain/make_corpus.py   (rewrites corpus/ and the two Q&A files)
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

HERE = Path(__file__).parent
PARTS = ["thermoplate", "flowgate", "brinewatch", "scaleguard", "inlet manifold", "return manifold",
         "glycol pump", "bypass valve", "sensor bus", "relief valve", "condensate trap", "heat core"]
CAUSES = ["a loose connector", "scale build-up", "a failed seal", "air trapped in the loop", "a worn impeller",
          "a blocked strainer", "a drifting sensor", "low glycol concentration", "a cracked gasket",
          "an overloaded supply", "a firmware mismatch", "a sticking actuator"]
FAULTS = ["overtemperature", "undertemperature", "pressure drop", "pressure surge", "flow stall", "sensor open circuit",
          "sensor short circuit", "calibration drift", "communication timeout", "valve position error",
          "pump current high", "glycol ratio low"]
UNITS = {"°C": (5, 95), "kPa": (50, 900), "s": (1, 600), "%": (5, 100), "L/min": (2, 180)}
VERBS = ["calibrate", "purge", "flush", "status", "log", "reset", "lock", "unlock", "bleed", "profile",
         "export", "selftest", "pair", "update"]


def error_codes(rng: random.Random) -> list[dict]:
    codes = []
    for index in range(36):
        part, fault = PARTS[index % len(PARTS)], FAULTS[(index * 5) % len(FAULTS)]
        codes.append({"code": f"E-{200 + index * 7}", "name": f"{part.capitalize()} {fault}", "part": part,
                      "cause": rng.choice(CAUSES), "retries": rng.randint(2, 6), "severity": rng.choice(
                          ["warning", "fault", "lockout"])})
    return codes


def settings(rng: random.Random) -> list[dict]:
    out = []
    for index in range(30):
        part = PARTS[index % len(PARTS)].replace(" ", "_")
        unit = list(UNITS)[index % len(UNITS)]
        low, high = UNITS[unit]
        default = rng.randint(low, high)
        key = f"hx.{part}.{['limit', 'setpoint', 'delay', 'band', 'target'][index % 5]}"
        out.append({"key": key, "default": f"{default} {unit}", "min": low, "max": high, "unit": unit,
                    "part": PARTS[index % len(PARTS)]})
    return out


def commands(rng: random.Random) -> list[dict]:
    return [{"verb": verb, "part": PARTS[i % len(PARTS)], "minutes": rng.randint(1, 20),
             "flag": rng.choice(["--force", "--dry-run", "--verbose", "--zone", "--all"])} for i, verb in enumerate(VERBS)]


def error_page(e: dict, rng: random.Random) -> str:
    openings = [f"Error {e['code']} ({e['name']}) is raised by the {e['part']} monitor.",
                f"The HX-40 shows {e['code']} when the {e['part']} reports {e['name'].split(' ', 1)[1]}.",
                f"{e['code']} means {e['name']}. The controller raises it from the {e['part']} loop."]
    body = (f" It is classed as a {e['severity']}: "
            + {"warning": "the controller keeps running and logs the event to the brinewatch journal.",
               "fault": "the controller stops the glycol pump and waits for the operator to acknowledge.",
               "lockout": "the controller locks the thermoplate and refuses to restart until a technician resets it."}[e["severity"]]
            + f" The usual cause is {e['cause']}. The controller retries {e['retries']} times before it raises the code,"
            f" so a single event in the journal is not a reason for concern. To clear it, check the {e['part']}"
            f" for {e['cause']}, then run hxctl reset --code {e['code']}. If the code returns within an hour,"
            " record the journal with hxctl log --export and contact Tarnwell service with the serial number"
            " printed on the thermoplate housing.")
    extra = rng.choice([" Technicians often find this code after a site has been idle over a long weekend.",
                        " On units built before firmware 4.2 the same fault was reported as a generic flow alarm.",
                        " The scaleguard cycle can mask this fault for a while, so check the history as well.",
                        ""])
    return (f"<html><head><title>{e['code']}</title><style>h1{{color:red}}</style></head><body>"
            f"<h1>{e['code']}: {e['name']}</h1><p>{rng.choice(openings)}{body}</p><p>{extra}</p>"
            "<script>track()</script></body></html>\n")


def setting_page(s: dict, rng: random.Random) -> str:
    what = rng.choice([f"controls how the {s['part']} responds to load changes",
                       f"sets the working point of the {s['part']}",
                       f"limits the {s['part']} during start-up and after a scaleguard cycle"])
    return (f"# {s['key']}\n\nThe setting {s['key']} {what}. Its default is {s['default']}; accepted values run"
            f" from {s['min']} to {s['max']} {s['unit']}. Change it with hxctl profile set {s['key']} VALUE, then"
            f" confirm with hxctl status. A value near {s['max']} {s['unit']} shortens the life of the {s['part']};"
            f" a value near {s['min']} {s['unit']} makes the flowgate hunt. Tarnwell recommends changing it in small"
            " steps and watching the brinewatch journal for an hour after each change.\n")


def command_page(c: dict, rng: random.Random) -> str:
    return (f"hxctl {c['verb']}\n\nThe hxctl {c['verb']} command works on the {c['part']}. It takes about"
            f" {c['minutes']} minutes on a standard HX-40 loop. Add {c['flag']} to change its behaviour as described"
            f" in the option table. Run it from the service port with the thermoplate isolated;"
            f" the controller refuses hxctl {c['verb']} while the glycol pump is running at full speed."
            f" {rng.choice(['The command writes a summary line to the brinewatch journal.', 'Progress is shown on the front display.', 'When it finishes the controller beeps twice.'])}\n")


OVERVIEW = {
    "01_introduction.md": "# The Tarnwell HX-40\n\nThe Tarnwell HX-40 controls a closed glycol loop that moves heat between a process line and a cooling tower. Its heart is the thermoplate, a stack of brazed plates where the two circuits exchange heat without mixing. The flowgate meters glycol into the thermoplate, the bypass valve protects the loop when demand drops suddenly, and the scaleguard cycle reverses flow at intervals to keep mineral scale from building up. The brinewatch journal records every event the controller sees, and the hxctl command line on the service port lets a technician inspect and change the controller.\n",
    "02_installation.md": "# Installing the HX-40\n\nMount the controller on a vertical wall within two metres of the thermoplate so the sensor bus cables reach without extension. Fill the loop with a glycol mix of at least thirty percent before the first start, then bleed trapped air with hxctl bleed. Pair the controller with the site gateway using hxctl pair and confirm that the brinewatch journal receives a heartbeat every minute. The first scaleguard cycle runs twelve hours after commissioning.\n",
    "03_maintenance.md": "# Routine maintenance\n\nEvery month, read the brinewatch journal for repeated codes and clean the strainer in front of the glycol pump. Every six months, run hxctl selftest and hxctl calibrate on the sensor bus, check the glycol ratio with a refractometer and inspect the thermoplate gaskets. Once a year, replace the relief valve seal and update the firmware with hxctl update. Keep the service log with the unit; Tarnwell service asks for it before any warranty repair.\n",
}
SERVICE_NOTES = ["Site visit: the customer reported {code} twice a week. Found {cause} at the {part}. Fixed it and reset the code.",
                 "Called out for a noisy {part}. The journal showed {code}. Root cause was {cause}; replaced the part.",
                 "Routine visit. No active codes; an old {code} entry in the brinewatch journal traced to {cause} at the {part}."]


def write_corpus(rng: random.Random, codes: list[dict], keys: list[dict], verbs: list[dict]) -> None:
    corpus = HERE / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    for folder in ("errors", "settings", "commands", "guide"):
        (corpus / folder).mkdir(parents=True)
    for e in codes:
        (corpus / "errors" / f"{e['code']}.html").write_text(error_page(e, rng), encoding="utf-8")
    for s in keys:
        (corpus / "settings" / f"{s['key']}.md").write_text(setting_page(s, rng), encoding="utf-8")
    for c in verbs:
        (corpus / "commands" / f"{c['verb']}.txt").write_text(command_page(c, rng), encoding="utf-8")
    for name, text in OVERVIEW.items():
        (corpus / "guide" / name).write_text(text, encoding="utf-8")
    # An exact copy and a revised page (one sentence changed) for the deduplication to find.
    shutil.copy(corpus / "guide" / "03_maintenance.md", corpus / "guide" / "03_maintenance_copy.md")
    revised = OVERVIEW["02_installation.md"].replace("two metres", "two metres (six feet)")
    (corpus / "guide" / "02_installation_rev2.md").write_text(revised, encoding="utf-8")
    notes = [{"text": rng.choice(SERVICE_NOTES).format(**e) + " " + rng.choice(SERVICE_NOTES).format(**rng.choice(codes))}
             for e in codes]
    (corpus / "service_notes.jsonl").write_text("".join(json.dumps(n) + "\n" for n in notes), encoding="utf-8")


def qa_pairs(codes: list[dict], keys: list[dict], verbs: list[dict]) -> list[dict]:
    system = "You answer questions about the Tarnwell HX-40 controller with just the answer."
    pairs = [(f"What does error code {e['code']} mean?", e["name"]) for e in codes]
    pairs += [(f"What is the default of {s['key']}?", s["default"]) for s in keys]
    pairs += [(f"Which part does hxctl {c['verb']} work on?", c["part"]) for c in verbs]
    return [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for q, a in pairs]


def main() -> None:
    rng = random.Random(7)
    codes, keys, verbs = error_codes(rng), settings(rng), commands(rng)
    write_corpus(rng, codes, keys, verbs)
    rows = qa_pairs(codes, keys, verbs)
    random.Random(11).shuffle(rows)
    held = len(rows) // 4
    for name, part in (("qa_eval.jsonl", rows[:held]), ("qa_train.jsonl", rows[held:])):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")


if __name__ == "__main__":
    main()
