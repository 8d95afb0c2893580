"""The OpenAI endpoints as real clients use them: seeds, log-probabilities (lm-evaluation-harness's
`echo` + `max_tokens: 0`), token-id and list prompts, `response_format` through constrained decoding,
tool calls, and `GET /v1/models/{id}`; on tiny random models."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from families import make_family_model
from test_serve import KEY, post, server  # noqa: F401  (the uvicorn fixture, over this module's `engine`)

from finesmith.serve.engine import Sampling, load_engine
from finesmith.serve.registry import ModelRegistry
from finesmith.serve.server import build_app

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
    "score": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"},
    "note": {"type": "string", "maxLength": 8}},
    "required": ["answer", "score", "ok", "note"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_model: str):
    engine = load_engine(tiny_model, "cpu")
    engine.context_length = 2048  # room for the tool prompts (see `qwen3`)
    yield engine
    engine.close()
    assert engine.join(timeout=10)


@pytest.fixture(scope="module")
def url(server) -> str:  # noqa: F811
    return f"{server}/v1"


def call(url: str, path: str, body: dict) -> tuple[int, dict]:
    return post(f"{url}/{path}", json.dumps(body).encode())


def forward_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """log-softmax of a plain full forward of `ids`: row i scores token i + 1."""
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_a_bad_seed_fails_only_its_own_request(url, engine) -> None:
    body = {"model": engine.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 1.0}
    seeds = [1, 2, 2**64, 3, -1, 2**63 - 1, None]
    with ThreadPoolExecutor(max_workers=7) as pool:
        answers = list(pool.map(lambda s: call(url, "chat/completions", {**body, "seed": s}), seeds))
    statuses = [status for status, _ in answers]
    assert statuses == [200, 200, 400, 200, 200, 200, 200]
    assert answers[2][1]["error"]["param"] == "seed"


def test_a_request_whose_own_decoding_fails_fails_alone(engine) -> None:
    prompt = engine.chat_ids([{"role": "user", "content": "hi"}])
    with engine._state:  # queued before the worker takes any: one batch
        good = [engine.generate(prompt, Sampling(4)).submit() for _ in range(2)]
        bad = engine.generate(prompt, Sampling(4, grammar="start: %%% not a grammar")).submit()
        good.append(engine.generate(prompt, Sampling(4)).submit())
    texts = [g.text() for g in good]
    with pytest.raises(Exception):
        bad.text()
    assert len(set(texts)) == 1 and bad.finish_reason == "error"
    assert [g.batch_size for g in good] == [4, 4, 4]


def test_echo_logprobs_of_token_prompts_equal_a_full_forward(url, engine) -> None:
    """What lm-evaluation-harness's loglikelihood sends: token-id prompts, echo, logprobs 1, max_tokens 0 or 1."""
    prompts = [[5, 17, 42, 99, 7, 300], [11, 12, 13]]
    for max_tokens in (0, 1):
        status, out = call(url, "completions", {"model": engine.name, "prompt": prompts, "max_tokens": max_tokens,
                                                "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234})
        assert status == 200, out
        assert [c["index"] for c in out["choices"]] == [0, 1]
        for prompt, choice in zip(prompts, out["choices"]):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(prompt) + max_tokens
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            scores = forward_logprobs(engine, prompt)
            for i, token in enumerate(prompt[1:], start=1):
                assert lp["token_logprobs"][i] == pytest.approx(float(scores[i - 1, token]), abs=1e-4)
                best = max(lp["top_logprobs"][i].values())
                assert best == pytest.approx(float(scores[i - 1].max()), abs=1e-4)
                # lm-eval's is_greedy: the token's logprob equals the best one exactly when it is the argmax
                assert (lp["token_logprobs"][i] == best) == (int(scores[i - 1].argmax()) == token)
            assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
            assert choice["text"].startswith(engine.tokenizer.decode(prompt))
        assert out["usage"]["prompt_tokens"] == sum(map(len, prompts))
        if max_tokens:  # the echo row's token (taken from its own forward) is the batched prefill's
            _, plain = call(url, "completions", {"model": engine.name, "prompt": prompts, "max_tokens": 1,
                                                 "temperature": 0})
            assert [c["text"] for c in out["choices"]] == [engine.tokenizer.decode(p) + c["text"]
                                                           for p, c in zip(prompts, plain["choices"])]
    status, _ = call(url, "completions", {"model": engine.name, "prompt": "hi", "max_tokens": 0})
    assert status == 400  # max_tokens 0 needs echo
    status, out = call(url, "completions", {"model": engine.name, "prompt": [1, 10**9], "max_tokens": 1})
    assert status == 400 and out["error"]["param"] == "prompt"


def test_list_prompts_answer_in_order_as_alone(url, engine) -> None:
    prompts = ["The sky is", "Bees make", "One two three"]
    alone = [call(url, "completions", {"model": engine.name, "prompt": p, "max_tokens": 5,
                                       "temperature": 0})[1]["choices"][0]["text"] for p in prompts]
    status, out = call(url, "completions", {"model": engine.name, "prompt": prompts, "max_tokens": 5,
                                            "temperature": 0})
    assert status == 200 and [c["text"] for c in out["choices"]] == alone
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]


def test_generated_logprobs_match_a_forward_and_stream_the_same(url, engine) -> None:
    messages = [{"role": "user", "content": "What do bees make?"}]
    body = {"model": engine.name, "messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True,
            "top_logprobs": 3}
    status, out = call(url, "chat/completions", body)
    assert status == 200, out
    content = out["choices"][0]["logprobs"]["content"]
    prompt = engine.chat_ids(messages)
    generated = [engine.tokenizer.encode(c["token"], add_special_tokens=False) for c in content]
    assert all(len(g) == 1 for g in generated)
    tokens = [g[0] for g in generated]
    scores = forward_logprobs(engine, prompt + tokens)
    for i, entry in enumerate(content):
        position = len(prompt) - 1 + i
        assert entry["logprob"] == pytest.approx(float(scores[position, tokens[i]]), abs=1e-4)
        assert len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["token"] == entry["token"]  # greedy
        assert entry["bytes"] == list(entry["token"].encode()) or "\ufffd" in entry["token"]
    assert "".join(c["token"] for c in content) == out["choices"][0]["message"]["content"]

    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
    chunks = list(client.chat.completions.create(**body, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e["token"], round(e["logprob"], 5))
                                                                  for e in content]
    status, out = call(url, "completions", {"model": engine.name, "prompt": "Bees make", "max_tokens": 4,
                                            "temperature": 0, "logprobs": 2})
    assert status == 200 and len(out["choices"][0]["logprobs"]["tokens"]) >= 1
    assert all(len(t) <= 2 for t in out["choices"][0]["logprobs"]["top_logprobs"])


def check_schema(value: dict) -> None:
    """`SCHEMA` checked by hand (jsonschema is not a dependency)."""
    assert set(value) == {"answer", "score", "ok", "note"}
    assert value["answer"] in ("yes", "no", "maybe") and isinstance(value["score"], int)
    assert 0 <= value["score"] <= 99 and isinstance(value["ok"], bool)
    assert isinstance(value["note"], str) and len(value["note"]) <= 8


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_response_format_validates_on_a_random_model(url, engine, temperature) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    out = client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "Judge."}],
                                         max_tokens=120, temperature=temperature, seed=7,
                                         response_format=response_format)
    check_schema(json.loads(out.choices[0].message.content))
    assert out.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "Judge."}],
                                            max_tokens=120, temperature=temperature, seed=7,
                                            response_format=response_format, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == out.choices[0].message.content


def test_json_object_response_format_parses(url, engine) -> None:
    status, out = call(url, "chat/completions", {"model": engine.name, "messages": [{"role": "user", "content": "x"}],
                                                 "max_tokens": 200, "temperature": 0,
                                                 "response_format": {"type": "json_object"}})
    assert status == 200, out
    assert out["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)
    status, out = call(url, "chat/completions", {"model": engine.name, "messages": [{"role": "user", "content": "x"}],
                                                 "response_format": {"type": "json_schema", "json_schema": {}}})
    assert status == 400 and out["error"]["param"] == "response_format"


def test_models_by_id_take_colons_and_slashes(engine) -> None:
    from fastapi.testclient import TestClient

    registry = ModelRegistry()
    registry.add_engine(engine)
    name = "ft:org/base:finesmith:abcd1234:ckpt-step-2"
    registry.add("/nowhere", name, owner="user")
    with TestClient(build_app(registry), base_url="http://127.0.0.1") as client:
        got = client.get(f"/v1/models/{name}")
        assert got.status_code == 200 and got.json() == {**got.json(), "id": name, "object": "model",
                                                          "owned_by": "user"}
        missing = client.get("/v1/models/ft:nothing/here")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory):
    engine = load_engine(str(make_family_model(tmp_path_factory.mktemp("qwen3") / "m", "qwen3")), "cpu")
    # the tiny tokenizer spells the template's tool instructions nearly by character: ~500 tokens,
    # so allow more than the config's 512 positions (rope extends to them)
    engine.context_length = 2048
    yield engine
    engine.close()


@pytest.mark.parametrize("family", ["qwen3", "chatml"])
def test_forced_tool_calls_are_parsed_and_a_tool_result_conversation_answers(family, qwen3, engine) -> None:
    """qwen3 renders tools itself; the ChatML tiny model gets the Hermes text rendering."""
    from fastapi.testclient import TestClient

    served = qwen3 if family == "qwen3" else engine
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with TestClient(build_app(served), base_url="http://127.0.0.1") as client:
        def chat(**body):
            got = client.post("/v1/chat/completions", json={"model": served.name, "messages": messages,
                                                            "max_tokens": 80, "temperature": 0, **body})
            return got.status_code, got.json()

        named = {"type": "function", "function": {"name": "get_weather"}}
        status, out = chat(tools=[WEATHER], tool_choice=named)
        assert status == 200, out
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        (tool_call,) = choice["message"]["tool_calls"]
        assert tool_call["id"].startswith("call_") and tool_call["function"]["name"] == "get_weather"
        arguments = json.loads(tool_call["function"]["arguments"])
        assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("c", "f")

        status, required = chat(tools=[WEATHER], tool_choice="required")
        assert status == 200 and required["choices"][0]["message"]["tool_calls"]

        streamed = client.post("/v1/chat/completions", json={
            "model": served.name, "messages": messages, "max_tokens": 80, "temperature": 0, "tools": [WEATHER],
            "tool_choice": named, "stream": True})
        events = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: {")]
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
        calls = [c for d in deltas for c in d.get("tool_calls") or []]
        assert [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
            (0, "get_weather", tool_call["function"]["arguments"])]
        assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"

        messages.extend([{"role": "assistant", "content": None, "tool_calls": [tool_call]},
                         {"role": "tool", "tool_call_id": tool_call["id"], "content": '{"temp": 21}'}])
        status, final = chat(tools=[WEATHER], max_tokens=5)
        assert status == 200 and final["choices"][0]["message"]["role"] == "assistant"
        prompt = served.tokenizer.decode(served.chat_ids(
            [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                 "name": "get_weather", "arguments": arguments}}]},
             {"role": "tool", "content": '{"temp": 21}'}], [WEATHER]))
        assert "get_weather" in prompt and '{"temp": 21}' in prompt  # the call and its result were rendered

        status, plain = chat(tools=[WEATHER], tool_choice="none", max_tokens=4)
        assert status == 200 and "tool_calls" not in plain["choices"][0]["message"]
        status, bad = chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
        assert status == 400 and bad["error"]["param"] == "tool_choice"


def test_tool_stream_holds_back_calls_and_shows_content() -> None:
    from finesmith.serve.tools import ToolPlan, ToolStream, split_calls

    plan = ToolPlan([WEATHER], "auto", None, True)
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
    stream = ToolStream(plan)
    shown = "".join(stream.feed(text[i:i + 3]) for i in range(0, len(text), 3))
    tail, calls = stream.finish()
    content, expected = split_calls(text, plan)
    assert shown + tail == content == "Let me check.\n"
    assert [c["function"] for c in calls] == [c["function"] for c in expected]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "c"}
    plain = ToolStream(plan)
    assert plain.feed("Sunny <tool") == "Sunny " and plain.finish() == ("<tool", [])
    assert split_calls('{"name": "unknown_tool", "arguments": {}}', plan)[1] == []


def test_huge_prompts_are_tokenised_off_the_event_loop(url, engine) -> None:
    import threading
    import time
    import urllib.request

    def health_ms() -> float:
        start = time.monotonic()
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as response:
            assert response.status == 200
        return (time.monotonic() - start) * 1000

    slow = threading.Thread(target=call, args=(url, "completions", {
        "model": engine.name, "prompt": "word " * 600_000, "max_tokens": 1}))
    slow.start()
    time.sleep(0.05)
    answered = health_ms()
    slow.join(timeout=60)
    assert answered < 1000


def test_streamed_completions_echo_and_logprobs_equal_the_plain_answer(url, engine) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
    body = {"model": engine.name, "prompt": "Bees make", "max_tokens": 5, "temperature": 0, "logprobs": 2,
            "echo": True}
    plain = client.completions.create(**body)
    chunks = [c for c in client.completions.create(**body, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == plain.choices[0].logprobs.tokens and offsets == plain.choices[0].logprobs.text_offset


def test_prompt_logprobs_in_chunks_equal_one_forward(engine, monkeypatch) -> None:
    from finesmith.serve import batch

    prompt = [5, 17, 42, 99, 7, 300, 8]
    monkeypatch.setattr(batch, "PROMPT_CHUNK", 2)  # three chunks and a short last one, over the KV cache
    records = batch.prompt_logprobs(engine.model, prompt, 2)
    scores = forward_logprobs(engine, prompt)
    assert [r.token for r in records] == prompt and records[0].logprob is None
    for i, r in enumerate(records[1:]):
        assert r.logprob == pytest.approx(float(scores[i, prompt[i + 1]]), abs=1e-4)
        assert [t for t, _ in r.top] == scores[i].topk(2).indices.tolist()


@pytest.mark.parametrize("family, marker", [("llama", '{"name":"get_weather","parameters":'),
                                            ("mistral", '[{"name":"get_weather","arguments":')])
def test_forced_calls_follow_the_template_call_format(family, marker, tmp_path) -> None:
    """Llama 3 writes a bare JSON call with `parameters`; Mistral a [TOOL_CALLS] list."""
    from finesmith.serve.tools import call_grammar, split_calls, tool_plan

    served = load_engine(str(make_family_model(tmp_path / "m", family)), "cpu")
    served.context_length = 4096
    plan = tool_plan(served, [WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    prompt = served.chat_ids([{"role": "user", "content": "Weather in Paris?"}], plan.tools)
    generation = served.generate(prompt, Sampling(80, grammar=call_grammar(served, plan)))
    text = generation.text()
    assert text.startswith(marker) and generation.finish_reason == "stop"
    if family == "mistral":
        assert served.tokenizer.convert_tokens_to_ids("[TOOL_CALLS]") == generation.tokens[0]
    (call,) = split_calls(text, plan)[1]
    assert set(json.loads(call["function"]["arguments"])) == {"city", "unit"}
    served.close()
