"""Evaluation speed on the built-in model: answer + label log-likelihood, zero-shot and 4-shot.

    python bench/eval_speed.py [N] [--skip-loop]

Makes N (default 200) fresh tickets with the demo task's generator
(examples/support_triage/make_data.py, another seed than the shipped data), loads the
built-in SmolLM2-135M-Instruct once and times, in one process, one after the other:

- `prompt_forward`: one batched forward over every prompt's tokens (batches of 16 sorted by
  length, no cache, only the last logits): the floor any evaluation of these prompts pays;
- `zero_shot` / `four_shot`: `evaluate_examples` with both scorings (greedy answer and the
  log-likelihood of all 15 labels), 4-shot with fixed balanced shots;
- `separate_passes`: the previous way, `model.generate` in batches and label tries in their
  own forward, zero-shot;
- `generate_loop_*`: a plain `model.generate` loop, one prompt at a time (answers only);
- `bfloat16_subset`: the zero-shot evaluation of the first 16 examples with the model in
  bf16, its time against fp32 on the same examples, and how many answers and
  log-likelihood choices agree with fp32.

Writes bench/results/eval_speed.json with seconds, examples/s and the ratios the targets
are stated in.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "eval_speed.json"
MODEL = "smollm2-135m-instruct"
MAX_NEW_TOKENS = 12
BATCH = 16

try:
    import finesmith  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT / "src"))

from finesmith.core.templates import stop_token_ids  # noqa: E402
from finesmith.data.formats import Example  # noqa: E402
from finesmith.data.tokenize import prompt_ids  # noqa: E402
from finesmith.evaluate.generate import generate_batched  # noqa: E402
from finesmith.evaluate.loglik import label_logprobs  # noqa: E402
from finesmith.evaluate.metrics import normalise_answer  # noqa: E402
from finesmith.evaluate.tasks import EvalOptions, build_prompts, evaluate_examples, label_set  # noqa: E402
from finesmith.model.methods import load_for_inference  # noqa: E402


def make_examples(n: int, seed: int) -> list[Example]:
    """n synthetic tickets from the demo generator, as chat examples."""
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "examples" / "support_triage" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    rows = make_data.make(n, random.Random(seed), set())
    return [Example(tuple(row["messages"]), f"generated-{seed}:{i + 1}") for i, row in enumerate(rows)]


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


@torch.no_grad()
def prompt_forward(model, tokenizer, prompts) -> float:
    """Seconds for one forward over all prompt tokens, batched like the evaluation."""
    encoded = sorted((prompt_ids(tokenizer, p) for p in prompts), key=len)
    started = time.perf_counter()
    for start in range(0, len(encoded), BATCH):
        batch = encoded[start:start + BATCH]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            ids[row, width - len(e):] = torch.tensor(e)
            mask[row, width - len(e):] = 1
        model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - started


@torch.no_grad()
def generate_loop(model, tokenizer, prompts) -> list[str]:
    """The plain way: `model.generate` on one prompt at a time."""
    stops = stop_token_ids(tokenizer)
    answers = []
    for p in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, p)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=MAX_NEW_TOKENS, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                             top_p=None, top_k=None, temperature=None)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def evaluation(model, tokenizer, examples, pool, shots: int) -> tuple[dict, object]:
    options = EvalOptions(task="classification", scoring="both", max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH,
                          shots=shots)
    result, seconds = timed(lambda: evaluate_examples(model, tokenizer, examples, pool, options))
    return {"seconds": round(seconds, 2), "examples_per_s": round(len(examples) / seconds, 2),
            "accuracy_generated": result.metrics["generate"]["accuracy"],
            "accuracy_loglik": result.metrics["loglik"]["accuracy"]}, result


def agreement(a, b) -> dict:
    same_answer = sum(x["prediction"] == y["prediction"] for x, y in zip(a.predictions, b.predictions))
    same_label = sum(x["loglik_prediction"] == y["loglik_prediction"] for x, y in zip(a.predictions, b.predictions))
    return {"answers_equal": same_answer, "loglik_choices_equal": same_label, "n": len(a.predictions)}


def save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=200)
    parser.add_argument("--skip-loop", action="store_true", help="leave out the one-prompt-at-a-time generate loop")
    parser.add_argument("--half-examples", type=int, default=16, help="examples of the bf16 run (emulated on CPUs)")
    args = parser.parse_args()
    examples, pool = make_examples(args.n, seed=7), make_examples(200, seed=11)
    model, tokenizer = load_for_inference(MODEL)
    results = {"model": MODEL, "examples": args.n, "labels": 15, "max_new_tokens": MAX_NEW_TOKENS, "batch_size": BATCH,
               "device": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "load_average_1m_at_start": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d")}

    def report(name: str, value: dict) -> None:
        results[name] = value
        print(f"{name:22s} {json.dumps(value)}", flush=True)
        save(results)  # after each step, so a stopped run keeps what it measured

    zero_prompts = build_prompts(tokenizer, examples, [], EvalOptions(), "classification").messages
    four = build_prompts(tokenizer, examples, pool, EvalOptions(shots=4), "classification")
    results["prompt_tokens_zero_shot"] = sum(len(prompt_ids(tokenizer, p)) for p in zero_prompts)
    results["prompt_tokens_four_shot"] = sum(len(prompt_ids(tokenizer, p)) for p in four.messages)
    prompt_forward(model, tokenizer, zero_prompts[:BATCH])  # warm-up
    report("prompt_forward_zero_shot", {"seconds": round(prompt_forward(model, tokenizer, zero_prompts), 2)})
    zero, zero_result = evaluation(model, tokenizer, examples, pool, 0)
    report("zero_shot", zero)
    four_shot, _ = evaluation(model, tokenizer, examples, pool, 4)
    report("four_shot", {**four_shot, "shots": four.describe()})

    labels, surface = label_set([ex.answer for ex in examples])
    (_, seconds) = timed(lambda: (generate_batched(model, tokenizer, zero_prompts, MAX_NEW_TOKENS, BATCH),
                                  label_logprobs(model, tokenizer, zero_prompts, surface)))
    report("separate_passes_zero_shot", {"seconds": round(seconds, 2)})

    if not args.skip_loop:
        answers, seconds = timed(lambda: generate_loop(model, tokenizer, zero_prompts))
        same = sum(normalise_answer(a) == normalise_answer(p["prediction"]) for a, p in zip(answers, zero_result.predictions))
        report("generate_loop_zero_shot", {"seconds": round(seconds, 2), "answers_equal_to_engine": same})
        _, seconds = timed(lambda: generate_loop(model, tokenizer, four.messages))
        report("generate_loop_four_shot", {"seconds": round(seconds, 2)})

    # bf16 on this CPU is emulated (about 125x slower matrix products), so it runs on a small
    # subset, against fp32 on the same subset
    subset = examples[:args.half_examples]
    fp32_subset, fp32_result = evaluation(model, tokenizer, subset, pool, 0)
    model.to(torch.bfloat16)
    value, result = evaluation(model, tokenizer, subset, pool, 0)
    model.to(torch.float32)
    report("bfloat16_subset", {**value, "fp32_seconds": fp32_subset["seconds"], **agreement(fp32_result, result)})

    ratios = {"zero_shot_over_prompt_forward": results["zero_shot"]["seconds"] / results["prompt_forward_zero_shot"]["seconds"],
              "four_shot_over_zero_shot": results["four_shot"]["seconds"] / results["zero_shot"]["seconds"],
              "separate_passes_over_engine": results["separate_passes_zero_shot"]["seconds"] / results["zero_shot"]["seconds"]}
    if "generate_loop_zero_shot" in results:
        ratios["generate_loop_over_zero_shot"] = (results["generate_loop_zero_shot"]["seconds"]
                                                  / results["zero_shot"]["seconds"])
        ratios["generate_loop_over_four_shot"] = (results["generate_loop_four_shot"]["seconds"]
                                                  / results["four_shot"]["seconds"])
    ratios["bfloat16_speedup"] = results["bfloat16_subset"]["fp32_seconds"] / results["bfloat16_subset"]["seconds"]
    results["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
    results["targets"] = {"zero_shot_over_prompt_forward": "<= 1.5", "four_shot_over_zero_shot": "<= 1.3",
                          "generate_loop_over_zero_shot": ">= 2", "generate_loop_over_four_shot": ">= 2"}
    save(results)
    print(json.dumps(results["ratios"], indent=2))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
