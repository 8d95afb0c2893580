"""Terminal chat and the OpenAI-compatible server, driven as a user or client would."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import QA, chat, write_jsonl

from finesmith.cli import main
from finesmith.evaluate.generate import generate
from finesmith.serve.chat import chat_loop
from finesmith.serve.engine import ChatEngine, EngineBusy, EngineClosed, Sampling, StopScanner, load_engine
from finesmith.serve.server import build_app

KEY = "test-key"


@pytest.fixture(scope="module")
def lora_run(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    data = write_jsonl(root / "train.jsonl", [chat(q, a) for q, a in QA])
    out = root / "run"
    assert main(["train", "--model", tiny_model, "--data", data, "--method", "lora", "--output", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2"]) == 0
    return out


@pytest.fixture(scope="module")
def engine(lora_run: Path):
    engine = load_engine(str(lora_run), "cpu")
    yield engine
    engine.close()
    assert engine.join(timeout=10)


@pytest.fixture(scope="module")
def server(engine):
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(build_app(engine, KEY), host="127.0.0.1", port=port, log_level="error")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert instance.started
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def greedy(engine, messages, n: int) -> str:
    return generate(engine.model, engine.tokenizer, [messages], max_new_tokens=n)[0]


def post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("pieces, stops, shown, stopped", [
    (["Hel", "lo wor", "ld"], ("wor",), "Hello ", True),
    (["ab", "c##", "#d"], ("###",), "abc", True),
    (["ab", "c#", "d"], ("##",), "abc#d", False),
    (["plain text"], (), "plain text", False),
])
def test_stop_scanner_never_shows_part_of_a_stop_string(pieces, stops, shown, stopped) -> None:
    scanner = StopScanner(stops)
    out = ""
    for piece in pieces:
        out += scanner.feed(piece)
        assert not any(s in out for s in stops)
        if scanner.stopped:
            break
    out += scanner.flush()
    assert (out, scanner.stopped) == (shown, stopped)


def test_chat_loop_streams_greedy_answers_and_resets(engine) -> None:
    out = io.StringIO()
    history = chat_loop(engine, ["Say hello.\n", "/reset\n", "Largest planet?\n", "/exit\n", "ignored\n"], out,
                        system="Be brief.", sampling=Sampling(max_tokens=6))
    lines = out.getvalue().splitlines()
    system = {"role": "system", "content": "Be brief."}
    first = greedy(engine, [system, {"role": "user", "content": "Say hello."}], 6)
    second = greedy(engine, [system, {"role": "user", "content": "Largest planet?"}], 6)
    assert [line.strip() for line in lines] == [first, "(conversation cleared)", second]
    assert [m["role"] for m in history] == ["system", "user", "assistant"]  # reset dropped the first turn


def test_chat_command_through_a_pipe(lora_run: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "finesmith.cli", "chat", str(lora_run), "--max-new-tokens", "4"],
                          input="hello\n/reset\nhi again\n/exit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "/reset starts over" in proc.stderr
    assert proc.stdout.splitlines()[1] == "(conversation cleared)" and len(proc.stdout.splitlines()) == 3


def test_models_and_chat_completion_match_greedy_generation(client, engine) -> None:
    assert [m.id for m in client.models.list().data] == [engine.name]
    messages = [{"role": "user", "content": "What do bees make?"}]
    response = client.chat.completions.create(model=engine.name, messages=messages, max_tokens=5, temperature=0)
    assert response.choices[0].message.content.strip() == greedy(engine, messages, 5)
    assert response.choices[0].finish_reason in ("stop", "length")
    assert 1 <= response.usage.completion_tokens <= 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens

    stream = client.chat.completions.create(model=engine.name, messages=messages, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == response.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == response.choices[0].finish_reason


def test_completions_honour_stop_and_stream(client, engine) -> None:
    prompt = "The colour of grass is"
    full = client.completions.create(model=engine.name, prompt=prompt, max_tokens=12, temperature=0)
    text = full.choices[0].text
    assert len(text) >= 4
    stop = text[2:4]
    cut = client.completions.create(model=engine.name, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=engine.name, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    sampled = client.completions.create(model=engine.name, prompt=prompt, max_tokens=3, temperature=1.5, seed=1)
    assert sampled.usage.completion_tokens <= 3


def test_auth_is_required(server, engine) -> None:
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    body = json.dumps({"model": engine.name, "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, error = post(f"{server}/v1/chat/completions", body, key=None)
    assert status == 401 and error["error"]["code"] == "invalid_api_key"
    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:
        assert response.status == 200  # health needs no key


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (json.dumps({"model": "run", "max_tokens": 3}).encode(), 400, "messages"),
    (json.dumps({"model": "run", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}).encode(),
     400, "temperature"),
    (json.dumps({"model": "run", "messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400, "messages.0.role"),
    (json.dumps({"model": "other", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "model"),
])
def test_bad_requests_get_openai_error_objects(server, body, status, param) -> None:
    got, error = post(f"{server}/v1/chat/completions", body)
    assert got == status
    assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["param"] == param
    assert error["error"]["message"]


def test_bad_request_through_the_client(client, engine) -> None:
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="messages"):
        client.chat.completions.create(model=engine.name, messages=[], max_tokens=3)
    with pytest.raises(BadRequestError, match="fills the model's context of 512"):
        client.completions.create(model=engine.name, prompt="word " * 600, max_tokens=3)


def test_concurrent_requests_all_answer_correctly(client, engine) -> None:
    questions = [q for q, _ in QA[:6]]

    def ask(index: int) -> str:
        messages = [{"role": "user", "content": questions[index]}]
        if index % 2:
            stream = client.chat.completions.create(model=engine.name, messages=messages, max_tokens=4,
                                                    temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return client.chat.completions.create(model=engine.name, messages=messages, max_tokens=4,
                                              temperature=0).choices[0].message.content

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(ask, range(len(questions))))
    expected = [greedy(engine, [{"role": "user", "content": q}], 4) for q in questions]
    assert [a.strip() for a in answers] == expected


LONG = 480  # tokens; about a second on this tiny model, so a cancellation is plain to see


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def stopped(engine_or_status) -> int:
    """Requests that ended because their reader left: stopped while running, or skipped while waiting."""
    status = engine_or_status if isinstance(engine_or_status, dict) else engine_or_status.status()
    return status["cancelled"] + status["skipped"]


def idle(engine) -> bool:
    """No request running or waiting: counts read now are not still moving from an earlier test."""
    status = engine.status()
    return not status["running"] and not status["waiting"]


def test_a_streaming_client_that_leaves_cancels_its_generation(client, engine) -> None:
    assert wait_for(lambda: idle(engine))
    before = engine.status()
    messages = [{"role": "user", "content": "Say hello."}]
    stream = client.chat.completions.create(model=engine.name, messages=messages, max_tokens=LONG, temperature=0,
                                            stream=True)
    next(iter(stream))
    stream.close()  # the client hangs up after the first chunk (the role chunk, sent before any token)
    # stopped at its next token, or, on a busy machine, skipped before the worker reached it
    assert wait_for(lambda: stopped(engine) == stopped(before) + 1, timeout=30)
    after = engine.status()
    assert after["completed"] == before["completed"] and not after["running"]
    quick = client.chat.completions.create(model=engine.name, messages=messages, max_tokens=4, temperature=0)
    assert quick.choices[0].message.content.strip() == greedy(engine, messages, 4)  # the worker moved on


def test_a_client_that_gives_up_on_a_plain_request_cancels_it(server, engine) -> None:
    from openai import APITimeoutError, OpenAI

    assert wait_for(lambda: idle(engine))
    before = engine.status()
    impatient = OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=0.3)
    with pytest.raises(APITimeoutError):
        impatient.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=LONG, temperature=0)
    assert wait_for(lambda: stopped(engine) == stopped(before) + 1, timeout=30)
    assert engine.status()["completed"] == before["completed"]


def test_the_queue_refuses_when_full_and_skips_requests_whose_reader_left(engine) -> None:
    small = ChatEngine(engine.model, engine.tokenizer, engine.name, queue_size=1)
    prompt = engine.chat_ids([{"role": "user", "content": "Say hello."}])
    running = iter(small.generate(prompt, Sampling(max_tokens=LONG)))
    next(running)  # the worker is on it
    left = small.generate(prompt, Sampling(max_tokens=4)).submit()
    with pytest.raises(EngineBusy) as busy:
        small.generate(prompt, Sampling(max_tokens=4)).submit()
    assert busy.value.retry_after >= 1
    left.cancel()
    replacement = small.generate(prompt, Sampling(max_tokens=4)).submit()  # the slot came back
    running.close()
    assert replacement.text().strip() == greedy(engine, [{"role": "user", "content": "Say hello."}], 4)
    assert left.finish_reason == "cancelled"
    counts = small.status()
    assert (counts["cancelled"], counts["skipped"], counts["rejected"], counts["completed"]) == (1, 1, 1, 1)
    small.close()
    assert small.join(timeout=10)


def test_closing_fails_waiting_requests_and_stops_the_running_one(engine) -> None:
    small = ChatEngine(engine.model, engine.tokenizer, engine.name, queue_size=4)
    prompt = engine.chat_ids([{"role": "user", "content": "Say hello."}])
    running = iter(small.generate(prompt, Sampling(max_tokens=LONG)))
    next(running)
    waiting = small.generate(prompt, Sampling(max_tokens=4)).submit()
    started = time.monotonic()
    small.close(grace=0.05)
    with pytest.raises(EngineClosed):
        waiting.text()
    with pytest.raises(EngineClosed):
        list(running)  # the rest of its text, then the news that it was stopped
    assert small.join(timeout=10) and time.monotonic() - started < 2
    with pytest.raises(EngineClosed):
        small.generate(prompt, Sampling(max_tokens=4)).submit()


def submit_together(engine, requests):
    """Queue every request before the worker can take one, so they form one batch."""
    with engine._state:  # the worker needs this lock to take work; it is re-entrant for _enqueue
        generations = [engine.generate(engine.chat_ids(m), s).submit() for m, s in requests]
    return [g.text() for g in generations], generations


def test_requests_that_arrive_together_are_generated_together_and_answer_as_alone(engine) -> None:
    questions = [[{"role": "user", "content": q}] for q, _ in QA[:5]]
    greedy_alone = [engine.generate(engine.chat_ids(m), Sampling(6)).text() for m in questions]
    together, generations = submit_together(engine, [(m, Sampling(6)) for m in questions])
    assert [g.batch_size for g in generations] == [5] * 5
    assert together == greedy_alone  # prompts of different lengths, left-padded: the same greedy answers
    assert greedy_alone == [greedy(engine, m, 6) for m in questions]  # and the same as plain generation

    # a seeded sampled request gives the same answer alone and inside a batch
    sampled = Sampling(8, temperature=0.9, top_p=0.9, seed=123)
    alone = engine.generate(engine.chat_ids(questions[0]), sampled).text()
    mixed, generations = submit_together(engine, [(questions[1], Sampling(3)), (questions[0], sampled),
                                                  (questions[2], Sampling(10, stop=("a",)))])
    assert mixed[1] == alone
    assert generations[0].finish_reason in ("stop", "length") and generations[0].completion_tokens <= 3
    assert "a" not in mixed[2]
