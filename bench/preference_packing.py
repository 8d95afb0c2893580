"""What computing each pair's prompt once saves: DPO steps with `share_prompt` on and off.

Preference pairs often have prompts long relative to their answers (a document, a
conversation, then a short reply). With `preference.share_prompt: true` (the default) a
pair's prompt is one path of a token trie that both answers attend to; without it the two
sequences are computed separately (what pairwise trainers usually do). Same model, same
pairs, same seed; the loss and gradients are equal (tests/test_preference.py), so only
the time and the tokens computed differ.

    python bench/preference_packing.py --preset smollm2-135m --prompt 256 --answer 24 --pairs 8 --steps 3

Writes bench/results/preference_packing_<preset>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare_trl import PRESETS  # noqa: E402


def make_groups(pairs: int, prompt: int, answer: int, vocab: int, seed: int) -> list:
    from finesmith.data.pairs import TokenizedGroup
    from finesmith.data.tokenize import TokenizedExample

    rng = np.random.default_rng(seed)
    groups = []
    for i in range(pairs):
        shared = rng.integers(3, vocab, prompt).tolist()
        sides = []
        for _ in range(2):
            ids = shared + rng.integers(3, vocab, answer).tolist()
            sides.append(TokenizedExample(tuple(ids), tuple([False] * prompt + [True] * answer), f"bench:{i}"))
        groups.append(TokenizedGroup(tuple(sides), f"bench:{i}", None, (-100.0, -110.0)))
    return groups


def time_steps(model: torch.nn.Module, groups: list, share: bool, steps: int) -> dict:
    from finesmith.config import PreferenceSettings
    from finesmith.data.pairs import pack_groups
    from finesmith.train.preference import PreferenceObjective

    objective = PreferenceObjective("dpo", PreferenceSettings())
    times, losses = [], []
    for _ in range(steps):
        batch = pack_groups(groups, row_tokens=2048, share_prompt=share)
        started = time.perf_counter()
        total = sum(objective(model, unit)[0] for unit in batch["units"]) / len(groups)
        total.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        losses.append(float(total.detach()))
    return {"share_prompt": share, "tokens_computed": int(batch["real_tokens"]), "step_seconds": times,
            "median_step_seconds": float(np.median(times)), "loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--answer", type=int, default=24)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**PRESETS[args.preset], max_position_embeddings=4096)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    groups = make_groups(args.pairs, args.prompt, args.answer, config.vocab_size, seed=0)
    runs = []
    for share in (False, True, False, True):  # alternate, so warm-up favours neither
        runs.append(time_steps(model, groups, share, args.steps))
    separate = [r for r in runs if not r["share_prompt"]]
    shared = [r for r in runs if r["share_prompt"]]
    result = {
        "bench": "preference_packing", "preset": args.preset, "device": device, "platform": platform.platform(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        "pairs": args.pairs, "prompt_tokens": args.prompt, "answer_tokens": args.answer,
        "tokens_separate": separate[0]["tokens_computed"], "tokens_shared": shared[0]["tokens_computed"],
        "median_step_seconds_separate": float(np.median([t for r in separate for t in r["step_seconds"]])),
        "median_step_seconds_shared": float(np.median([t for r in shared for t in r["step_seconds"]])),
        "loss_separate": separate[-1]["loss"], "loss_shared": shared[-1]["loss"], "runs": runs,
    }
    result["speedup"] = result["median_step_seconds_separate"] / result["median_step_seconds_shared"]
    out = HERE / "results" / f"preference_packing_{args.preset}_{device}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
