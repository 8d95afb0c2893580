"""The graders API routes (`/v1/fine_tuning/alpha/graders/run` and `/validate`) on a bare app,
and the official openai client against them over HTTP."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from finesmith.graders.python_grader import PythonLimits
from finesmith.graders.result import ERROR_FLAGS
from finesmith.serve.graders_api import add_grader_routes
from finesmith.serve.http import APIError

RUN = "/v1/fine_tuning/alpha/graders/run"
VALIDATE = "/v1/fine_tuning/alpha/graders/validate"
FAST = PythonLimits(timeout_s=2.0, memory_mb=384)
CHECK = {"type": "string_check", "name": "capital", "input": "{{ sample.output_text }}",
         "reference": "{{ item.answer }}", "operation": "ilike"}


def judge(model, messages, sampling):
    if "boom" in messages[-1]["content"]:
        raise RuntimeError("engine stopped")
    return {"text": '{"steps": [], "result": 0.75}', "usage": {"prompt_tokens": 12, "completion_tokens": 3}}


def make_app(**options) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return exc.response()

    add_grader_routes(app, **{"limits": FAST, **options})
    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(make_app(chat=judge, models=lambda: ["tiny-judge"]))


def test_run_string_check(client: TestClient) -> None:
    response = client.post(RUN, json={"grader": CHECK, "model_sample": "It is PARIS.", "item": {"answer": "paris"}})
    assert response.status_code == 200
    body = response.json()
    assert body["reward"] == 1.0 and body["sub_rewards"] == {} and body["model_grader_token_usage_per_model"] == {}
    metadata = body["metadata"]
    assert metadata["name"] == "capital" and metadata["type"] == "string_check"
    assert metadata["token_usage"] is None and metadata["sampled_model_name"] is None
    assert all(metadata["errors"][flag] is False for flag in ERROR_FLAGS)
    assert metadata["execution_time"] >= 0


def test_run_reports_error_flags_with_200(client: TestClient) -> None:
    missing = client.post(RUN, json={"grader": CHECK, "model_sample": "Paris"}).json()  # no item
    assert missing["reward"] == 0.0 and missing["metadata"]["errors"]["invalid_variable_error"] is True
    loop = {"type": "python", "name": "spin", "source": "def grade(sample, item):\n    while True:\n        pass\n"}
    started = time.perf_counter()
    body = client.post(RUN, json={"grader": loop, "model_sample": "x"}).json()
    assert body["reward"] == 0.0 and body["metadata"]["errors"]["unresponsive_reward_error"] is True
    assert time.perf_counter() - started < 5


def test_run_multi_and_model_graders(client: TestClient) -> None:
    grader = {"type": "multi", "name": "combo", "calculate_output": "(exact + judged) / 2", "graders": {
        "exact": CHECK,
        "judged": {"type": "score_model", "name": "judge", "model": "tiny-judge",
                   "input": [{"role": "user", "content": "Grade: {{ sample.output_text }}"}]}}}
    body = client.post(RUN, json={"grader": grader, "model_sample": "Paris", "item": {"answer": "Paris"}}).json()
    assert body["reward"] == pytest.approx(0.875)
    assert body["sub_rewards"] == {"exact": 1.0, "judged": 0.75}
    assert body["metadata"]["sampled_model_name"] == "tiny-judge"
    assert body["model_grader_token_usage_per_model"]["tiny-judge"]["total_tokens"] == 15
    failing = client.post(RUN, json={"grader": grader, "model_sample": "boom", "item": {"answer": "Paris"}}).json()
    assert failing["reward"] == 0.0 and failing["metadata"]["errors"]["model_grader_server_error"] is True
    assert failing["metadata"]["errors"]["model_grader_server_error_details"] == "engine stopped"


def test_validate(client: TestClient) -> None:
    response = client.post(VALIDATE, json={"grader": {**CHECK}})
    assert response.status_code == 200 and response.json() == {"grader": CHECK}
    score = {"type": "score_model", "name": "judge", "model": "tiny-judge",
             "input": [{"role": "user", "content": "{{ sample.output_text }}"}]}
    normalized = client.post(VALIDATE, json={"grader": score}).json()["grader"]
    assert normalized["range"] == [0.0, 1.0] and normalized["input"][0]["type"] == "message"


@pytest.mark.parametrize(("body", "param", "text"), [
    ({"grader": {**CHECK, "operation": "contains"}}, "grader.operation", "must be one of eq, ne, like, ilike"),
    ({"grader": {**CHECK, "type": "nope"}}, "grader.type", "must be one of"),
    ({"grader": {"type": "score_model", "name": "j", "model": "gpt-4o", "input": [{"role": "user", "content": "x"}]}},
     "grader.model", "not a model this server serves"),
    ({"grader": {"type": "multi", "name": "m", "graders": {"a": CHECK}, "calculate_output": "a + b"}},
     "grader.calculate_output", "'b', which is not a sub-grader"),
    ({}, "grader", "Field required"),
])
def test_validate_and_run_refuse_bad_graders_with_400(client: TestClient, body: dict, param: str, text: str) -> None:
    for path, extra in ((VALIDATE, {}), (RUN, {"model_sample": "x"})):
        response = client.post(path, json={**body, **extra})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and text in error["message"] and error["type"] == "invalid_request_error"


def test_run_needs_a_string_model_sample(client: TestClient) -> None:
    response = client.post(RUN, json={"grader": CHECK, "model_sample": {"output_text": "x"}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "model_sample"


def test_judge_names_come_from_a_registry_per_request() -> None:
    class Registry:
        served = ["a"]

        def names(self):
            return list(self.served)

    registry = Registry()
    client = TestClient(make_app(chat=judge, models=registry))
    grader = {"type": "score_model", "name": "j", "model": "b", "input": [{"role": "user", "content": "x"}]}
    assert client.post(VALIDATE, json={"grader": grader}).status_code == 400
    registry.served.append("b")
    assert client.post(VALIDATE, json={"grader": grader}).status_code == 200


def test_model_graders_are_refused_without_a_judge() -> None:
    bare = TestClient(make_app())
    grader = {"type": "label_model", "name": "l", "model": "m", "input": [{"role": "user", "content": "x"}],
              "labels": ["a", "b"], "passing_labels": ["a"]}
    response = bare.post(VALIDATE, json={"grader": grader})
    assert response.status_code == 400 and "need a judge model" in response.json()["error"]["message"]
    assert bare.post(VALIDATE, json={"grader": CHECK}).status_code == 200


# ---- the official client ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served() -> str:
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(chat=judge), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(5)


def test_openai_client_runs_and_validates_graders(served: str) -> None:
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=served, api_key="unused", max_retries=0)
    graders = client.fine_tuning.alpha.graders
    run = graders.run(grader=CHECK, model_sample="Paris!", item={"answer": "paris"})
    assert run.reward == 1.0 and run.metadata.name == "capital" and run.metadata.type == "string_check"
    assert run.metadata.errors.invalid_variable_error is False and run.metadata.errors.api_model_grader_parse_error \
        is False
    assert run.sub_rewards == {} and run.api_model_grader_token_usage_per_model == {}

    python = {"type": "python", "name": "length",
              "source": "def grade(sample, item):\n    return len(sample['output_text']) / 10\n"}
    multi = {"type": "multi", "name": "combo", "calculate_output": "max(capital, length)",
             "graders": {"capital": CHECK, "length": python}}
    run = graders.run(grader=multi, model_sample="Rome", item={"answer": "Paris"})
    assert run.reward == pytest.approx(0.4) and run.sub_rewards == {"capital": 0.0, "length": pytest.approx(0.4)}

    socket_grader = {"type": "python", "name": "net", "source":
                     "import socket\ndef grade(sample, item):\n    socket.create_connection(('1.1.1.1', 53))\n"}
    run = graders.run(grader=socket_grader, model_sample="x")
    assert run.reward == 0.0 and run.metadata.errors.python_grader_runtime_error is True
    assert "network access is disabled" in run.metadata.errors.python_grader_runtime_error_details

    validated = graders.validate(grader=CHECK)
    assert validated.grader.type == "string_check" and validated.grader.operation == "ilike"
    with pytest.raises(BadRequestError) as refused:
        graders.validate(grader={**CHECK, "operation": "regex"})
    assert "grader.operation" in str(refused.value)
