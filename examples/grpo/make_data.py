"""Write the GRPO demo's data: the preference demo's support-desk task (find the order number,
reply with exactly `Order: <number>`), here learned from a reward instead of from pairs.

The messages come from `examples/preference/make_data.py` with the same seed, so the SFT rows
and the 80 held-out prompts are exactly the preference demo's, and the two demos compare:

- data/sft.jsonl: the same 60 demonstrations (a short SFT stage learns the format part-way);
- data/prompts.jsonl: the 240 prompts of the preference pairs, each with its reference line
  and `answer` (the order number), which the reward function receives; no answers are shown
  to the model: it samples its own;
- data/heldout.jsonl: the same 80 held-out prompts, with `answer` (for measure.py and as the
  eval set whose reward is logged before and after GRPO).

    python examples/grpo/make_data.py
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
spec = importlib.util.spec_from_file_location("preference_data", HERE.parent / "preference" / "make_data.py")
preference = importlib.util.module_from_spec(spec)
sys.modules["preference_data"] = preference  # dataclasses look their module up
spec.loader.exec_module(preference)


def main() -> None:
    sets = preference.build(seed=0)
    folder = HERE / "data"
    folder.mkdir(exist_ok=True)
    prompts = []
    for pair in sets["pairs"]:
        number = re.fullmatch(r"Order: (\d+)", pair["chosen"]).group(1)
        prompts.append({"messages": pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}],
                        "answer": number})
    heldout = [{"messages": row["messages"] + [{"role": "assistant", "content": f"Order: {row['answer']}"}],
                "answer": row["answer"]} for row in sets["heldout"]]
    for name, rows in (("sft", sets["sft"]), ("prompts", prompts), ("heldout", heldout)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {folder}: sft.jsonl ({len(sets['sft'])}), prompts.jsonl ({len(prompts)}), "
          f"heldout.jsonl ({len(heldout)})")


if __name__ == "__main__":
    main()
