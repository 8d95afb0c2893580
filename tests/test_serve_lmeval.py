"""`/v1/completions` as lm-evaluation-harness's `local-completions` uses it for log-likelihoods:
token-id prompts, `echo: true`, `max_tokens: 1`, `logprobs: 1`, read as `token_logprobs[ctxlen:-1]`."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from finesmith.serve.engine import load_engine
from finesmith.serve.server import build_app


@pytest.fixture(scope="module")
def engine(tiny_model: str):
    engine = load_engine(tiny_model, "cpu")
    yield engine
    engine.close()


def lm_eval_loglikelihood(answer: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-eval 0.4's `LocalCompletionsAPI.parse_logprobs`, restated."""
    choice = answer["choices"][0]["logprobs"]
    picked = choice["token_logprobs"][ctxlen:-1]
    tops = choice["top_logprobs"][ctxlen:-1]
    return sum(picked), all(tok == max(top.values()) for tok, top in zip(picked, tops))


def direct(engine, context: list[int], continuation: list[int]) -> float:
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([context + continuation])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return sum(float(logprobs[len(context) + i - 1, t]) for i, t in enumerate(continuation))


@pytest.mark.parametrize("ends_with_stop", [False, True])
def test_loglikelihood_requests_score_the_continuation_even_when_the_next_token_ends_the_text(
        engine, ends_with_stop, monkeypatch):
    context = engine.tokenizer("The answer is", add_special_tokens=False)["input_ids"]
    continuation = engine.tokenizer(" blue sky", add_special_tokens=False)["input_ids"]
    if ends_with_stop:  # make the model's greedy next token an end-of-text token of this server
        with torch.inference_mode():
            nxt = int(engine.model(input_ids=torch.tensor([context + continuation])).logits[0, -1].argmax())
        monkeypatch.setattr(engine, "stop_ids", [nxt, *engine.stop_ids])
    client = TestClient(build_app(engine), base_url="http://127.0.0.1:8000")
    answer = client.post("/v1/completions", json={
        "model": engine.name, "prompt": [context + continuation], "max_tokens": 1, "temperature": 0,
        "logprobs": 1, "echo": True, "seed": 1234})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["choices"][0]["logprobs"]["token_logprobs"]) == len(context) + len(continuation) + 1
    if ends_with_stop:
        assert body["choices"][0]["finish_reason"] == "stop"
    score, _ = lm_eval_loglikelihood(body, len(context))
    assert score == pytest.approx(direct(engine, context, continuation), abs=1e-4)
