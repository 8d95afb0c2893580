"""Few-shot selection strategies, shot formats and the prompt-token budget."""

from __future__ import annotations

from collections import Counter

from transformers import AutoTokenizer

from conftest import ASSETS
from finesmith.data.formats import Example
from finesmith.data.tokenize import prompt_ids
from finesmith.evaluate.fewshot import ShotSelector, budgeted_prompt, few_shot_messages


def ex(i: int, user: str, answer: str) -> Example:
    return Example(({"role": "system", "content": "Classify."}, {"role": "user", "content": user},
                    {"role": "assistant", "content": answer}), f"pool:{i}")


# 9 "spam", 3 "ham", 1 "other": a random draw of 3 would usually be all spam.
POOL = ([ex(i, f"win money now offer {i}", "spam") for i in range(9)]
        + [ex(9 + i, f"meeting notes for tuesday {i}", "ham") for i in range(3)]
        + [ex(12, "the invoice for order 5531 is attached", "other")])


def test_balanced_shows_every_label_before_repeating_one():
    for seed in range(10):
        shots = ShotSelector(POOL, "balanced", seed).select(ex(99, "hello", "ham"), 3)
        assert sorted(s.answer for s in shots) == ["ham", "other", "spam"]
        shots = ShotSelector(POOL, "balanced", seed).select(ex(99, "hello", "ham"), 6)
        counts = Counter(s.answer for s in shots)
        assert counts == {"spam": 3, "ham": 2, "other": 1} or counts == {"spam": 2, "ham": 3, "other": 1}


def test_similar_picks_the_obviously_similar_example_and_puts_it_last():
    query = ex(100, "where is the invoice for order 5531", "other")
    shots = ShotSelector(POOL, "similar").select(query, 2)
    assert shots[-1].source == "pool:12"


def test_the_query_is_never_its_own_shot_even_when_it_is_in_the_pool():
    for strategy in ("random", "balanced", "similar"):
        for query in POOL:
            shots = ShotSelector(POOL, strategy, 3).select(query, len(POOL))
            assert len(shots) == len(POOL) - 1
            assert all(s.prompt_messages != query.prompt_messages for s in shots)


def test_inline_format_puts_the_shots_in_one_user_message():
    query = ex(100, "free money!!", "spam")
    messages = few_shot_messages(query, POOL[9:11], "inline")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "Output: ham" in messages[1]["content"] and messages[1]["content"].endswith("Input: free money!!")


def test_budget_drops_shots_never_the_query():
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer-chatml")
    long_query = ex(100, "please classify this rather long message " * 8, "ham")
    shots = POOL[:4]
    full, kept = budgeted_prompt(tokenizer, long_query, shots, "chat", None)
    assert kept == 4
    query_only = len(prompt_ids(tokenizer, few_shot_messages(long_query, [])))
    two_shots = len(prompt_ids(tokenizer, few_shot_messages(long_query, shots[2:])))
    messages, kept = budgeted_prompt(tokenizer, long_query, shots, "chat", two_shots)
    assert kept == 2 and messages[-1]["content"] == long_query.prompt_messages[-1]["content"]
    assert [m["content"] for m in messages[1:-1:2]] == [s.prompt_messages[-1]["content"] for s in shots[2:]]
    messages, kept = budgeted_prompt(tokenizer, long_query, shots, "inline", query_only - 5)
    assert kept == 0 and messages == few_shot_messages(long_query, [])  # over budget, but whole
