"""Write a small tool-calling task: a smart-home assistant with four functions.

Each conversation is in the hosted fine-tuning API's chat shape: top-level `tools`
(function schemas), an assistant turn with `tool_calls` whose `arguments` are a JSON
string, and, for part of the training set, the `tool` result followed by the assistant's
final text answer. The held-out conversations all end in the call, so evaluation scores
the call itself (function name and arguments).

Requests come from templates with seeded randomness over small vocabularies (rooms,
doors, sensors, temperatures), so the data is synthetic, free of personal information
and reproducible. Every argument value is stated in the request (no guessing); what the
model must learn is which function a phrasing asks for, how words map to argument values
("lights off" is `state: "off"`, "secure the door" is `locked: true`), which optional
argument to leave out, and the exact call format.

    python examples/tool_calling/make_data.py            # writes train.jsonl and eval.jsonl beside this file
    python examples/tool_calling/make_data.py --out DIR  # or into DIR
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "You are HomeHub, a smart-home assistant."
ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "office", "hallway", "garage"]
DOORS = ["front", "back", "garage", "patio", "side", "cellar"]
SENSORS = ["temperature", "humidity", "motion", "air_quality"]


def function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


# Schemas are kept short: each training example carries all four in its prompt, and on a
# CPU the prompt tokens are most of the training time.
ROOM = {"type": "string"}
TOOLS = [
    function("set_lights", "Lights on/off in a room.",
             {"room": ROOM, "state": {"type": "string", "enum": ["on", "off"]},
              "brightness": {"type": "integer"}}, ["room", "state"]),
    function("set_thermostat", "Set a room's temperature (C).",
             {"room": ROOM, "temperature": {"type": "integer"}}, ["room", "temperature"]),
    function("lock_door", "Lock or unlock a door.",
             {"door": {"type": "string"}, "locked": {"type": "boolean"}}, ["door", "locked"]),
    function("get_sensor", "Read a room's sensor.",
             {"room": ROOM, "sensor": {"type": "string", "enum": SENSORS}}, ["room", "sensor"]),
]

PHRASES = {
    ("set_lights", "on"): ["turn on the {room} lights", "switch the lights on in the {room}",
                           "lights on in the {room} please", "can you light up the {room}?",
                           "I need the {room} lights on"],
    ("set_lights", "off"): ["turn off the {room} lights", "switch the {room} lights off",
                            "lights off in the {room}", "kill the lights in the {room}",
                            "it's too bright in the {room}, lights off"],
    ("set_lights", "dim"): ["set the {room} lights to {brightness}%", "dim the {room} lights to {brightness} percent",
                            "{room} lights at {brightness}% please"],
    "set_thermostat": ["set the {room} to {temperature} degrees", "make it {temperature}°C in the {room}",
                       "I want the {room} at {temperature} degrees", "change the {room} thermostat to {temperature}",
                       "heat the {room} to {temperature} degrees please"],
    ("lock_door", True): ["lock the {door} door", "please lock the {door} door", "is the {door} door locked? lock it",
                          "secure the {door} door", "make sure the {door} door is locked"],
    ("lock_door", False): ["unlock the {door} door", "open the lock on the {door} door",
                           "let me in, unlock the {door} door", "please unlock the {door} door"],
    "get_sensor": {"temperature": ["how warm is it in the {room}?", "what's the temperature in the {room}?",
                                   "check the {room} temperature"],
                   "humidity": ["how humid is the {room}?", "what's the humidity in the {room}?",
                                "check the {room} humidity"],
                   "motion": ["is there anyone moving in the {room}?", "any motion in the {room}?",
                              "check the {room} motion sensor"],
                   "air_quality": ["how is the air in the {room}?", "check the air quality in the {room}",
                                   "what's the air quality like in the {room}?"]},
}
OPENERS = ["", "", "", "Hey, ", "Hi HomeHub, ", "Quick one: "]


def request(rng: random.Random) -> tuple[str, str, dict, str, str]:
    """(user text, function name, arguments, tool result, final answer) for one random request."""
    kind = rng.choice(["set_lights", "set_lights", "set_thermostat", "lock_door", "get_sensor"])
    room = rng.choice(ROOMS)
    if kind == "set_lights":
        mode = rng.choice(["on", "off", "dim"])
        brightness = rng.choice(range(10, 100, 10))
        text = rng.choice(PHRASES[("set_lights", mode)]).format(room=room, brightness=brightness)
        args = {"room": room, "state": "off" if mode == "off" else "on"}
        if mode == "dim":
            args["brightness"] = brightness
        answer = f"The {room} lights are {args['state']}" + (f" at {brightness}%." if mode == "dim" else ".")
        return text, kind, args, json.dumps({"ok": True}), answer
    if kind == "set_thermostat":
        temperature = rng.randint(16, 26)
        text = rng.choice(PHRASES[kind]).format(room=room, temperature=temperature)
        return (text, kind, {"room": room, "temperature": temperature}, json.dumps({"ok": True}),
                f"The {room} is set to {temperature}°C.")
    if kind == "lock_door":
        door, locked = rng.choice(DOORS), rng.random() < 0.6
        text = rng.choice(PHRASES[("lock_door", locked)]).format(door=door)
        return (text, kind, {"door": door, "locked": locked}, json.dumps({"ok": True}),
                f"The {door} door is {'locked' if locked else 'unlocked'}.")
    sensor = rng.choice(SENSORS)
    text = rng.choice(PHRASES["get_sensor"][sensor]).format(room=room)
    value, answer = sensor_reading(rng, sensor, room)
    return text, kind, {"room": room, "sensor": sensor}, json.dumps({"value": value}), answer


def sensor_reading(rng: random.Random, sensor: str, room: str) -> tuple[object, str]:
    if sensor == "temperature":
        value = round(rng.uniform(17, 25), 1)
        return value, f"It is {value}°C in the {room}."
    if sensor == "humidity":
        value = rng.randint(30, 70)
        return value, f"The {room} humidity is {value}%."
    if sensor == "motion":
        value = rng.random() < 0.5
        return value, f"{'Yes, there is' if value else 'No, there is no'} motion in the {room}."
    value = rng.choice(["good", "moderate", "poor"])
    return value, f"The air quality in the {room} is {value}."


def conversation(rng: random.Random, index: int, requests: int, end_with_result: bool) -> tuple[list[str], dict]:
    """One conversation row of `requests` user requests, each answered by a call; every call
    but possibly the last is followed by its result and a text answer. The user texts are
    returned too, to keep held-out requests unseen."""
    messages, users = [{"role": "system", "content": SYSTEM}], []
    for turn in range(requests):
        text, name, args, result, answer = request(rng)
        opener = rng.choice(OPENERS)
        users.append(opener + text if opener else text[0].upper() + text[1:])
        call_id = f"call_{index}_{turn}"
        messages += [{"role": "user", "content": users[-1]},
                     {"role": "assistant", "content": "", "tool_calls": [
                         {"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(args)}}]}]
        if turn < requests - 1 or end_with_result:
            messages += [{"role": "tool", "tool_call_id": call_id, "content": result},
                         {"role": "assistant", "content": answer}]
    return users, {"messages": messages, "tools": TOOLS}


def make(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Training rows and held-out rows, with no held-out request identical to a training one.

    A training conversation holds 2 to 5 requests: the tool schemas are most of every
    prompt, so several calls per conversation teach more per trained token (on a CPU,
    tokens are time). Half of them end with the last call's result and a text answer.
    A held-out conversation is one request that ends in the call, which is what is scored.
    """
    rng = random.Random(seed)
    train, seen = [], set()
    while len(train) < n_train:
        users, row = conversation(rng, len(train), rng.randint(2, 5), end_with_result=len(train) % 2 == 1)
        seen.update(u.lower() for u in users)
        train.append(row)
    held_out = []
    while len(held_out) < n_eval:
        users, row = conversation(rng, 10_000 + len(held_out), 1, end_with_result=False)
        if users[0].lower() not in seen:
            seen.add(users[0].lower())
            held_out.append(row)
    return train, held_out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--train", type=int, default=64, help="training conversations (2-5 calls each)")
    parser.add_argument("--eval", type=int, default=60, help="held-out conversations (one call each)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = make(args.train, args.eval, args.seed)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held_out)
    calls = sum(bool(m.get("tool_calls")) for row in train for m in row["messages"])
    print(f"wrote {len(train)} training conversations ({calls} calls) and {len(held_out)} held-out calls to {out}")


if __name__ == "__main__":
    main()
