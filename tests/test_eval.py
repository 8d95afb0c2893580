"""Evaluation: answer normalisation, few-shot prompts, batched generation."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QA
from finesmith.data.formats import Example
from finesmith.evaluate.fewshot import ShotSelector, few_shot_messages
from finesmith.evaluate.generate import generate
from finesmith.evaluate.tasks import normalise_answer


def example(i, q, a, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return Example(tuple(msgs), f"f:{i}")


POOL = [example(i, q, a) for i, (q, a) in enumerate(QA)]


def test_normalise_answer_first_line_case_and_space():
    assert normalise_answer("  Billing  /   HIGH \nbecause...") == "billing / high"
    assert normalise_answer("") == ""


def test_a_shot_never_equals_the_query():
    for strategy in ("random", "balanced", "similar"):
        for query in POOL:
            for seed in range(5):
                shots = ShotSelector(POOL, strategy, seed).select(query, 3)
                assert len(shots) == 3 and all(s.messages != query.messages for s in shots)


def test_shots_are_seeded():
    assert ShotSelector(POOL, "random", 7).select(POOL[0], 3) == ShotSelector(POOL, "random", 7).select(POOL[0], 3)


def test_shots_become_earlier_turns_after_the_system_prompt():
    query = example(99, "Colour of snow?", "white", system="Answer in one word.")
    messages = few_shot_messages(query, POOL[:2])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == QA[0][0] and messages[2]["content"] == QA[0][1]
    assert messages[-1]["content"] == "Colour of snow?"


def test_batched_generation_equals_one_by_one(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = [list(ex.prompt_messages) for ex in POOL[:6]]
    batched = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=6)
    single = [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
