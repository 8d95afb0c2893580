"""The evaluation engine: one prefill per prompt, prefix caching and trie walks equal the
one-prompt-at-a-time computation (greedy answers token for token, log-likelihoods to 1e-4)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QA
from finesmith.core.templates import stop_token_ids
from finesmith.data.tokenize import prompt_ids, tokens_and_mask
from finesmith.evaluate.engine import Job, PromptEngine, continuation_trie
from finesmith.evaluate.loglik import answer_only

SYSTEM = ("You are a careful assistant for a small quiz. Read the question, think about the one word that "
          "answers it, and reply with that word only.")
CANDIDATES = ["blue", "four legs", "Paris", "a", "billing / low", "billing / high"]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def reference_answer(model, tokenizer, ids, max_new_tokens):
    """Greedy tokens from plain `generate` on one unpadded prompt (stop token removed)."""
    stops = stop_token_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id, top_p=None, top_k=None, temperature=None)
    return [t for t in out[0, len(ids):].tolist() if t not in stops]


def reference_logprob(model, tokenizer, messages, candidate) -> float:
    ids, mask = tokens_and_mask(tokenizer, answer_only(messages, candidate))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logprobs[j - 1, ids[j]]) for j in range(1, len(ids)) if mask[j])


def prompts_with(shots):
    """Quiz prompts, each with the same earlier turns (fixed shots) in front."""
    turns = [m for q, a in shots for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    return [[{"role": "system", "content": SYSTEM}, *turns, {"role": "user", "content": q}] for q, _ in QA]


def jobs_for(tokenizer, prompts, group=None):
    jobs = []
    for messages in prompts:
        ids = prompt_ids(tokenizer, messages)
        rendered = [tokens_and_mask(tokenizer, answer_only(messages, c)) for c in CANDIDATES]
        jobs.append(Job(ids, continuation_trie(ids, rendered), group))
    return jobs


@pytest.mark.parametrize("shots, batch_size", [((), 4), (QA[-3:], 5), (QA[-3:], 16)])
def test_answers_and_scores_equal_one_by_one(tiny, shots, batch_size):
    model, tokenizer = tiny
    prompts = prompts_with(shots)
    jobs = jobs_for(tokenizer, prompts)
    engine = PromptEngine(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), batch_size)
    outcomes = engine.run(jobs, max_new_tokens=6, n_candidates=len(CANDIDATES))
    for messages, job, outcome in zip(prompts, jobs, outcomes):
        assert outcome.answer_ids == reference_answer(model, tokenizer, job.ids, 6)
        expected = [reference_logprob(model, tokenizer, messages, c) for c in CANDIDATES]
        assert outcome.scores == pytest.approx(expected, abs=1e-4)
    if shots:  # the shared system prompt and shots were computed once, not once per prompt
        assert engine.tokens_computed < sum(len(job.ids) for job in jobs) * 0.6


def test_greedy_answer_walking_the_trie_equals_decoding(tiny):
    """When the greedy answer follows a candidate, the engine reads it off the trie's logits,
    then decodes on from the end of the path; the tokens equal plain generation."""
    model, tokenizer = tiny
    prompts = prompts_with(QA[-2:])[:6]
    jobs = []
    for messages in prompts:
        ids = prompt_ids(tokenizer, messages)
        greedy = reference_answer(model, tokenizer, ids, 8)
        # candidates: the first 3 greedy tokens, and a branch off the first greedy token
        branch = [(ids + greedy[:3], [False] * len(ids) + [True] * 3),
                  (ids + greedy[:1] + [greedy[1] + 1], [False] * len(ids) + [True] * 2)]
        jobs.append(Job(ids, continuation_trie(ids, branch)))
    outcomes = PromptEngine(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), 4).run(jobs, 8, 2)
    for job, outcome in zip(jobs, outcomes):
        assert outcome.answer_ids == reference_answer(model, tokenizer, job.ids, 8)


def test_groups_with_their_own_shots_share_within_the_group(tiny):
    """Per-example shots (e.g. `similar`): prompts are batched with their group, each group's
    prefix computed once, and results stay equal to one-by-one."""
    model, tokenizer = tiny
    first, second = prompts_with(QA[-3:])[:5], prompts_with(QA[:2])[5:10]
    jobs = jobs_for(tokenizer, first, "a") + jobs_for(tokenizer, second, "b")
    jobs = [jobs[i] for i in (0, 5, 1, 6, 2, 7, 3, 8, 4, 9)]  # interleaved on purpose
    outcomes = PromptEngine(model, tokenizer.pad_token_id, stop_token_ids(tokenizer), 3).run(jobs, 4, len(CANDIDATES))
    for job, outcome in zip(jobs, outcomes):
        assert outcome.answer_ids == reference_answer(model, tokenizer, job.ids, 4)


def test_a_rendering_that_does_not_extend_the_prompt_has_no_trie():
    assert continuation_trie([1, 2, 3], [([1, 2, 4, 5], [False, False, False, True])]) is None
    assert continuation_trie([1, 2, 3], [([1, 2, 3, 5], [False, True, False, True])]) is None
    trie = continuation_trie([1, 2], [([1, 2, 7, 8, 9], [False, False, True, True, False]),
                                      ([1, 2, 7, 6], [False, False, True, True])])
    # 7 is shared; nothing is forwarded after a candidate's last scored token
    assert trie.ids == [7] and trie.parents == [-1] and trie.depth == [0]
    assert trie.targets == [(-1, 7, 0), (0, 8, 0), (-1, 7, 1), (0, 6, 1)]


def test_precision_policy_and_a_bf16_evaluation(tiny_model):
    from finesmith.core.device import inference_dtype
    from finesmith.errors import FinesmithError
    from finesmith.model.methods import load_for_inference

    assert inference_dtype("auto", "cpu") == torch.float32  # half precision is emulated on CPUs without it
    assert inference_dtype("bf16", "cpu") == torch.bfloat16 and inference_dtype("fp32", "cuda") == torch.float32
    with pytest.raises(FinesmithError, match="unknown precision"):
        inference_dtype("int4", "cpu")
    model, tokenizer = load_for_inference(tiny_model, precision="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    fp32, _ = load_for_inference(tiny_model)
    prompts = prompts_with(QA[-2:])[:4]
    for net in (model, fp32):
        jobs = jobs_for(tokenizer, prompts)
        out = PromptEngine(net, tokenizer.pad_token_id, stop_token_ids(tokenizer), 4).run(jobs, 4, len(CANDIDATES))
        scores = [o.scores for o in out]
        assert all(torch.isfinite(torch.tensor(row)).all() for row in scores)
        if net is fp32:
            for row, half in zip(scores, bf16_scores):  # bf16 rounds, it does not change the model
                assert row == pytest.approx(half, abs=0.5)
        bf16_scores = scores
