"""Label log-likelihood: the packed, prompt-sharing computation equals a slow reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QA
from finesmith.data.formats import Example
from finesmith.data.tokenize import tokens_and_mask
from finesmith.evaluate.loglik import answer_only, label_logprobs
from finesmith.evaluate.tasks import EvalOptions, evaluate_examples


def reference_logprob(model, tokenizer, messages, candidate) -> float:
    """One example at a time: full forward, summed log-softmax over the answer tokens."""
    ids, mask = tokens_and_mask(tokenizer, answer_only(messages, candidate))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logprobs[j - 1, ids[j]]) for j in range(1, len(ids)) if mask[j])


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def test_batched_scores_equal_one_by_one_reference(tiny):
    model, tokenizer = tiny
    prompts = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q}] for q, _ in QA[:5]]
    # a few-shot prompt: the earlier assistant turn is context, never scored
    prompts.append([{"role": "user", "content": "x?"}, {"role": "assistant", "content": "y"},
                    {"role": "user", "content": "z?"}])
    candidates = ["blue", "four legs", "Paris", "a", "billing / low", "billing / high"]  # shared beginnings
    fast = label_logprobs(model, tokenizer, prompts, candidates, max_row_tokens=80)  # several packed rows
    slow = [[reference_logprob(model, tokenizer, p, c) for c in candidates] for p in prompts]
    assert len(fast) == len(slow)
    for fast_row, slow_row in zip(fast, slow):
        assert fast_row == pytest.approx(slow_row, abs=1e-3)


def test_classification_reports_both_scorings(tiny):
    model, tokenizer = tiny
    examples = [Example(({"role": "user", "content": q}, {"role": "assistant", "content": a}), f"f:{i}")
                for i, (q, a) in enumerate(QA[:8])]
    result = evaluate_examples(model, tokenizer, examples, options=EvalOptions(task="classification", max_new_tokens=3))
    assert set(result.metrics) == {"generate", "loglik"}
    assert result.labels == sorted({a for _, a in QA[:8]}, key=str.lower)
    assert all(p["loglik_prediction"] in result.labels for p in result.predictions)
    assert result.accuracy == result.metrics["generate"]["accuracy"]


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_virtual_token_methods_score_like_one_by_one_forwards(tiny_model, kind):
    """Prompt/prefix tuning cannot take packed tries; their padded scoring equals peft's own forward."""
    import peft

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = (peft.PromptTuningConfig if kind == "prompt_tuning" else peft.PrefixTuningConfig)(
        num_virtual_tokens=3, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = peft.get_peft_model(base, config).eval()
    offset = 3 if kind == "prompt_tuning" else 0  # prompt tuning's output has the virtual positions in front
    prompts = [[{"role": "user", "content": q}] for q, _ in QA[:3]]
    candidates = ["blue", "four", "Paris"]
    fast = label_logprobs(model, tokenizer, prompts, candidates)
    for prompt, row in zip(prompts, fast):
        for cand, score in zip(candidates, row):
            ids, mask = tokens_and_mask(tokenizer, answer_only(prompt, cand))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits[0]
            logprobs = torch.log_softmax(logits[offset:].float(), dim=-1)
            slow = sum(float(logprobs[j - 1, ids[j]]) for j in range(1, len(ids)) if mask[j])
            assert score == pytest.approx(slow, abs=1e-3)
