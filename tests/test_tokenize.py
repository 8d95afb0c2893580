"""Golden masks: exactly the assistant turns plus their end-of-turn tokens are trained."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from conftest import ASSETS
from finesmith.data.formats import Example
from finesmith.data.tokenize import tokenize_examples, tokens_and_mask, truncate

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello friend"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye now"},
]
GOLDEN = {
    "chatml": ["Hello friend<|im_end|>", "Goodbye now<|im_end|>"],
    "llama3": ["Hello friend<|eot_id|>", "Goodbye now<|eot_id|>"],
    "mistral": [" Hello friend</s>", " Goodbye now</s>"],
}


def trained_runs(tokenizer, ids, mask) -> list[str]:
    """Decode each contiguous run of supervised tokens separately."""
    runs, current = [], []
    for token, supervised in zip(ids, mask):
        if supervised:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_golden_mask_per_template_family(family):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / f"tokenizer-{family}")
    ids, mask = tokens_and_mask(tokenizer, CONVERSATION)
    assert trained_runs(tokenizer, ids, mask) == GOLDEN[family]


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_exactly_one_bos(family):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / f"tokenizer-{family}")
    ids, _ = tokens_and_mask(tokenizer, CONVERSATION)
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1] != tokenizer.bos_token_id
    if family != "chatml":  # in ChatML the BOS id doubles as the turn marker
        assert ids.count(tokenizer.bos_token_id) == 1


def test_weight_zero_turn_not_trained():
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer-chatml")
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["weight"] = 0
    ids, mask = tokens_and_mask(tokenizer, messages)
    assert trained_runs(tokenizer, ids, mask) == ["Goodbye now<|im_end|>"]


def test_truncation_keeps_supervised_tokens():
    ids = list(range(20))
    mask = [False] * 17 + [True] * 3
    cut_ids, cut_mask = truncate(ids, mask, 8, keep_bos=True)
    assert len(cut_ids) == 8 and cut_ids[0] == 0 and cut_ids[-3:] == [17, 18, 19]
    assert sum(cut_mask) == 3
    # When the start already holds trained tokens, the end is cut.
    early = [False, True, True] + [False] * 17
    assert truncate(ids, early, 8, keep_bos=True) == (ids[:8], early[:8])


def test_over_length_policy_truncate_or_drop():
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer-chatml")
    long = Example(({"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}), "x:1")
    kept, stats = tokenize_examples(tokenizer, [long], max_length=32, truncation="truncate")
    assert stats.truncated == 1 and len(kept[0]) == 32 and any(kept[0].supervised)
    kept, stats = tokenize_examples(tokenizer, [long], max_length=32, truncation="drop")
    assert kept == [] and stats.dropped == 1


@pytest.mark.builtin
def test_golden_mask_on_the_builtin_smollm2_tokenizer():
    from finesmith.model.load import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    ids, mask = tokens_and_mask(tokenizer, CONVERSATION)
    assert trained_runs(tokenizer, ids, mask) == GOLDEN["chatml"]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
