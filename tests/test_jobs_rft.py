"""The hosted fine-tuning API's newer half, served locally and driven with the official `openai`
client: the `method` object (supervised, DPO, reinforcement with a grader), the graders API,
pause and resume, metadata, result files (the step-metrics CSV and finesmith's compare report),
events with the reward per step, and a python grader that misbehaves failing its job in one
line while the server goes on serving and the next job runs."""

from __future__ import annotations

import csv
import io
import json
import time
import urllib.request

import openai
import pytest

from conftest import QA, chat, write_jsonl
from test_jobs_api import KEY, Server, wait_for

TEXT = "{{ sample.output_text }}"
MULTI = {"type": "multi", "name": "blend", "calculate_output": "0.5 * exact + 0.3 * close + 0.2 * short",
         "graders": {
             "exact": {"type": "string_check", "name": "exact", "input": TEXT, "reference": "{{ item.answer }}",
                       "operation": "ilike"},
             "close": {"type": "text_similarity", "name": "close", "input": TEXT, "reference": "{{ item.answer }}",
                       "evaluation_metric": "fuzzy_match"},
             "short": {"type": "python", "name": "short",
                       "source": "def grade(sample, item):\n    return 1.0 if len(sample['output_text']) < 40 else 0.0\n"}}}


def prompts(tmp_path, name="rft.jsonl"):
    """The hosted reinforcement shape: messages ending in a user turn, other fields for the graders."""
    return write_jsonl(tmp_path / name, [{"messages": [{"role": "user", "content": q}], "answer": a} for q, a in QA])


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """One server for this module's jobs (they queue as a user's would); each test filters its own."""
    env = {"FINESMITH_GRADER_TIMEOUT_S": "3",  # a grader that hangs fails the job quickly here
           "FINESMITH_RL_MAX_NEW_TOKENS": "6"}  # short answers from the tiny model
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        running = Server(tiny_model, tmp_path_factory.mktemp("rft") / "home").start()
    yield running
    running.stop()


def upload(client, path):
    return client.files.create(file=open(path, "rb"), purpose="fine-tune").id


def test_method_jobs_graders_results_and_metadata(server, tmp_path):
    client = server.client
    # the graders API, as the hosted service's alpha endpoints
    ran = client.fine_tuning.alpha.graders.run(grader=MULTI, model_sample="Paris", item={"answer": "Paris"})
    assert ran.reward == pytest.approx(1.0) and set(ran.sub_rewards) == {"exact", "close", "short"}
    assert client.fine_tuning.alpha.graders.validate(grader=MULTI).grader.type == "multi"
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.alpha.graders.validate(grader={**MULTI, "calculate_output": "exact +"})
    assert "calculate_output" in str(bad.value)
    # a model grader's judge is a model this server serves (the tiny one answers nonsense: a parse error, not a 500)
    judged = client.fine_tuning.alpha.graders.run(grader={
        "type": "score_model", "name": "judge", "model": "tiny-llama0", "sampling_params": {"max_completions_tokens": 4},
        "input": [{"role": "user", "content": "Is this good? " + TEXT}]}, model_sample="Paris")
    assert judged.metadata.errors.model_grader_parse_error and judged.reward == 0
    assert not judged.metadata.errors.model_grader_server_error

    train = upload(client, write_jsonl(tmp_path / "sft.jsonl", [chat(q, a) for q, a in QA]))
    valid = upload(client, write_jsonl(tmp_path / "valid.jsonl", [chat(q, a) for q, a in reversed(QA)]))
    rl = upload(client, prompts(tmp_path))  # checked as prompts, not refused for "no assistant turn"

    # reinforcement: the grader is checked at create, with a 400 naming the field
    for method, param in (
            ({"type": "reinforcement", "reinforcement": {}}, "method.reinforcement.grader"),
            ({"type": "reinforcement", "reinforcement": {"grader": {**MULTI, "graders": {
                "x": {"type": "string_check", "name": "x", "input": TEXT, "reference": "a", "operation": "nope"}}}}},
             "method.reinforcement.grader.graders.x.operation"),
            ({"type": "reinforcement", "reinforcement": {"grader": {
                "type": "score_model", "name": "judge", "model": "tiny-llama0", "input": [
                    {"role": "user", "content": "Rate: " + TEXT}]}}}, "method.reinforcement.grader"),
            ({"type": "reinforcement", "reinforcement": {"grader": MULTI, "hyperparameters": {
                "reasoning_effort": "high"}}}, "hyperparameters.reasoning_effort"),
            ({"type": "reinforcement", "reinforcement": {"grader": MULTI, "hyperparameters": {"eval_samples": 4}}},
             "hyperparameters.eval_samples"),
            ({"type": "supervised", "supervised": {"finesmith": {"method": "qlora"}}},
             "method.supervised.finesmith.method")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.jobs.create(model="tiny-llama0", training_file=rl, method=method)
        assert refused.value.body["param"] == param, refused.value.body

    # supervised with a validation file: result files hold the step metrics and the compare report
    sft = client.fine_tuning.jobs.create(
        model="tiny-llama0", training_file=train, validation_file=valid, metadata={"team": "search", "run": "a"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4},
                                                     "finesmith": {"method": "auto"}}})
    assert sft.metadata == {"team": "search", "run": "a"}
    rft = client.fine_tuning.jobs.create(
        model="tiny-llama0", training_file=rl, validation_file=rl, metadata={"team": "rl"},
        method={"type": "reinforcement", "reinforcement": {
            "grader": MULTI, "hyperparameters": {"batch_size": 2, "compute_multiplier": 0.5, "eval_interval": 2},
            "finesmith": {"max_steps": 2}}})
    done = wait_for(client, sft.id)
    assert done.status == "succeeded", done.error
    assert done.method.supervised.finesmith["chosen"] in ("lora", "full")  # what the advisor chose, and why
    assert "advisor" in done.method.supervised.finesmith["reason"]
    assert done.trained_tokens > 0 and len(done.result_files) == 2
    results = [client.files.retrieve(f) for f in done.result_files]
    assert [r.purpose for r in results] == ["fine-tune-results"] * 2
    table = list(csv.DictReader(io.StringIO(client.files.content(done.result_files[0]).text)))
    assert list(table[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [int(r["step"]) for r in table] == [1, 2, 3] and all(r["train_loss"] for r in table)
    assert table[-1]["valid_loss"] and not table[-1]["train_accuracy"]  # accuracy is not measured: left empty
    report = client.files.content(done.result_files[1]).text
    assert "fine-tuned · run" in report and "zero-shot" in report
    verdict = [e for e in client.fine_tuning.jobs.list_events(sft.id, limit=100).data if "Compare report" in e.message]
    assert verdict and verdict[0].data["file"] == done.result_files[1]
    asked = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/finesmith/reports",
                                   headers={"Authorization": f"Bearer {KEY}"})
    listed = json.loads(urllib.request.urlopen(asked, timeout=30).read())
    assert f"jobs/{sft.id}/compare" in [r["path"] for r in listed["data"]]  # linked from the dashboard
    last = client.fine_tuning.jobs.checkpoints.list(sft.id).data[0]
    assert last.step_number == 3 and last.metrics.train_loss is not None
    assert last.metrics.valid_loss == last.metrics.full_valid_loss is not None  # the whole file is evaluated

    # reinforcement: GRPO with the multi grader as the reward; the events carry the reward per step
    finished = wait_for(client, rft.id)
    assert finished.status == "succeeded", finished.error
    params = finished.method.reinforcement.hyperparameters
    assert params.compute_multiplier == 0.5 and params.eval_interval == 2
    assert finished.method.reinforcement.grader.type == "multi"
    run = json.loads((server.home / "jobs" / rft.id / "run" / "run.json").read_text())
    assert run["config"]["objective"] == "grpo" and run["config"]["grpo"]["group_size"] == 2
    assert run["config"]["eval_every"] == 2
    events = client.fine_tuning.jobs.list_events(rft.id, limit=100).data
    steps = [e for e in events if e.type == "metrics" and "train_reward_mean" in (e.data or {})]
    assert sorted(e.data["step"] for e in steps) == [1, 2]
    assert all(0.0 <= e.data["train_reward_mean"] <= 1.0 and "reward=" in e.message for e in steps)
    assert any("valid_reward_mean" in (e.data or {}) for e in events)
    table = list(csv.DictReader(io.StringIO(client.files.content(finished.result_files[0]).text)))
    assert [r["step"] for r in table] == ["0", "1", "2"]  # the held-out reward before training, then each step
    assert table[0]["valid_reward_mean"] and all(r["train_reward_mean"] for r in table[1:])

    # metadata filters the list, as the hosted API's metadata[key]=value
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "search"}).data] == [sft.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "rl"}).data] == [rft.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "search", "run": "b"}).data == []

    # a prompt file is no supervised training data: the job fails naming the file
    wrong = wait_for(client, client.fine_tuning.jobs.create(model="tiny-llama0", training_file=rl).id)
    assert wrong.status == "failed" and "prompt" in wrong.error.message


def test_a_bad_python_grader_fails_its_job_in_one_line_and_pause_resume(server, tmp_path):
    client = server.client
    rl = upload(client, prompts(tmp_path))
    for source, what in (("import socket\ndef grade(sample, item):\n    socket.create_connection(('10.0.0.1', 80))\n"
                          "    return 1.0\n", "network access is disabled"),
                         ("def grade(sample, item):\n    while True:\n        pass\n", "did not return within 3 s")):
        grader = {"type": "python", "name": "bad", "source": source}
        job = client.fine_tuning.jobs.create(model="tiny-llama0", training_file=rl, method={
            "type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {"batch_size": 2}}})
        failed = wait_for(client, job.id)
        assert failed.status == "failed" and failed.error.code == "grader_failed"
        assert failed.error.param == "method.reinforcement.grader"
        message = failed.error.message
        assert message.startswith("grader bad (python): ") and what in message and "\n" not in message, message
        assert rl in message and str(server.home) not in message  # the file by its id, no paths of this machine
    assert client.models.list().data  # the server goes on serving

    # pause and resume: the worker checkpoints and exits; resumed, the job continues from that checkpoint
    slow = {"type": "python", "name": "slow", "source": "import time\ndef grade(sample, item):\n"
                                                        "    time.sleep(0.2)\n    return len(sample['output_text'])\n"}
    method = {"type": "reinforcement", "reinforcement": {"grader": slow, "hyperparameters": {
        "batch_size": 2, "compute_multiplier": 0.5}, "finesmith": {"max_steps": 6}}}
    job = client.fine_tuning.jobs.create(model="tiny-llama0", training_file=rl, method=method)
    straight = client.fine_tuning.jobs.create(model="tiny-llama0", training_file=rl, method=method)  # never paused
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(job.id)  # not paused
    deadline = time.monotonic() + 120
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    running = client.fine_tuning.jobs.retrieve(job.id)
    assert running.status == "running" and running.estimated_finish >= running.created_at  # from its steps/s
    assert client.fine_tuning.jobs.pause(job.id).id == job.id
    paused = wait_for(client, job.id, until=("paused", "succeeded", "failed"))
    assert paused.status == "paused", paused.error
    checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number
    assert 1 <= checkpoint < 6
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    messages = [e.message for e in events]
    assert any(m == f"Fine-tuning job paused with a checkpoint at step {checkpoint}" for m in messages), messages
    assert any(f"continues from its checkpoint at step {checkpoint}" in m for m in messages)
    steps = sorted(e.data["step"] for e in events if e.type == "metrics" and "train_reward_mean" in (e.data or {}))
    assert steps == [1, 2, 3, 4, 5, 6]  # every step once, none lost or repeated
    assert wait_for(client, straight.id).status == "succeeded"

    def trained(job_id):
        lines = (server.home / "jobs" / job_id / "run" / "metrics.jsonl").read_text().splitlines()
        return [(m["step"], m["reward"], m["loss"]) for m in map(json.loads, lines) if "loss" in m]

    # the same samples, rewards and losses as the job that was never paused: it continued exactly
    assert [s for s, _, _ in trained(job.id)] == [1, 2, 3, 4, 5, 6] and trained(job.id) == trained(straight.id)


def test_the_hosted_examples_run_unchanged(server, tmp_path):
    """The hosted docs' supervised, DPO and reinforcement (multi grader) examples, only base_url changed."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "hosted_migration" / "hosted_examples.py"
    spec = importlib.util.spec_from_file_location("hosted_examples", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    jobs = module.main(f"http://127.0.0.1:{server.port}/v1", KEY, "tiny-llama0", tmp_path)
    assert [(j.method.type, j.status) for j in jobs] == [
        ("supervised", "succeeded"), ("dpo", "succeeded"), ("reinforcement", "succeeded")], [j.error for j in jobs]
    assert jobs[1].method.dpo.hyperparameters.beta == 0.1
    events = server.client.fine_tuning.jobs.list_events(jobs[2].id, limit=100).data
    assert any(e.type == "metrics" and "train_reward_mean" in (e.data or {}) for e in events)


def test_a_train_config_takes_graders_as_its_reward(tiny_model, tmp_path, capsys):
    """`finesmith train` with `reward: {type: multi, ...}`: the same graders, the same GRPO loop."""
    import yaml

    from finesmith.cli import main

    config = {"model": tiny_model, "data": prompts(tmp_path), "output": str(tmp_path / "run"), "objective": "grpo",
              "max_steps": 2, "batch_size": 2, "log_every": 1, "grpo": {"group_size": 2, "max_new_tokens": 4},
              "reward": MULTI}
    (tmp_path / "rft.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "rft.yaml")]) == 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2] and all(0 <= m["reward_multi"] <= 1 for m in steps)
    broken = {**config, "output": str(tmp_path / "bad"), "reward": ["exact_match", {**MULTI, "calculate_output": "x"}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(broken))
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    assert "config: reward[1].calculate_output:" in capsys.readouterr().err


def test_a_grader_reward_that_allocates_without_bound_fails_in_one_line_or_scores_zero():
    from finesmith.train.rewards import GradingFailed, grader_reward

    hog = {"type": "python", "name": "hog", "source": "def grade(sample, item):\n    x = []\n    while True:\n"
                                                      "        x.append(bytearray(50_000_000))\n"}
    with pytest.raises(GradingFailed) as failed:
        grader_reward(hog, timeout=20)("prompt", "answer", {}, "file-abc.jsonl:3")
    assert str(failed.value) == ("grader hog (python): MemoryError: the grader went over its memory limit (2048 MB) "
                                 "on file-abc.jsonl:3")
    seen = []
    assert grader_reward(hog, timeout=20, on_error="zero", log=seen.append)("p", "a", {}, "f:1") == 0.0
    assert seen and seen[0].endswith("; scored 0")
