"""The served model's tokenizer over HTTP (vLLM's `/tokenizer_info`, `/tokenize`, `/detokenize`),
which lm-evaluation-harness's `local-completions` detects and uses instead of loading a tokenizer."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from finesmith.serve.engine import load_engine
from finesmith.serve.server import build_app


@pytest.fixture(scope="module")
def engine(tiny_model: str):
    engine = load_engine(tiny_model, "cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(build_app(engine), base_url="http://127.0.0.1:8000")


def test_tokenize_and_detokenize_use_the_models_own_tokenizer(client, engine):
    text = "The quick brown fox"
    answer = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert answer.status_code == 200, answer.text
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert answer.json()["tokens"] == ids and answer.json()["count"] == len(ids)
    back = client.post("/detokenize", json={"tokens": ids})
    assert back.status_code == 200 and back.json()["prompt"] == engine.tokenizer.decode(ids)
    messages = [{"role": "user", "content": "hi"}]
    rendered = client.post("/tokenize", json={"messages": messages})
    assert rendered.json()["tokens"] == engine.chat_ids(messages)


def test_tokenizer_info_names_the_special_tokens(client, engine):
    info = client.get("/tokenizer_info")
    assert info.status_code == 200
    assert info.json()["eos_token"] == engine.tokenizer.eos_token
    assert info.json()["model"] == engine.name


def test_tokenizer_endpoints_refuse_bad_input_in_the_error_shape(client):
    for path, body, param in [("/tokenize", {}, "prompt"), ("/detokenize", {"tokens": [-1]}, "tokens"),
                              ("/tokenize", {"prompt": "x", "model": "nope"}, "model")]:
        answer = client.post(path, json=body)
        assert 400 <= answer.status_code < 500, (path, answer.text)
        assert answer.json()["error"]["param"] == param


def test_lm_evals_remote_tokenizer_probe_accepts_the_server(client):
    """What lm-eval's `check_remote_tokenizer_support` asks before it uses the server's tokenizer."""
    info = client.get("/tokenizer_info").json()
    assert isinstance(info, dict) and "eos_token" in info
    tokens = client.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()["tokens"]
    assert isinstance(tokens, list) and tokens


def test_the_api_key_guards_the_tokenizer_endpoints_too(engine):
    keyed = TestClient(build_app(engine, "k3y"), base_url="http://127.0.0.1:8000")
    for method, path, body in [("get", "/tokenizer_info", None), ("post", "/tokenize", {"prompt": "x"}),
                               ("post", "/detokenize", {"tokens": [1]})]:
        refused = getattr(keyed, method)(path, **({"json": body} if body else {}))
        assert refused.status_code == 401, path
        allowed = getattr(keyed, method)(path, headers={"Authorization": "bearer k3y"},
                                         **({"json": body} if body else {}))
        assert allowed.status_code == 200, (path, allowed.text)
