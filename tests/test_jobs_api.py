"""The local fine-tuning service, driven with the official `openai` client exactly as a user of
the hosted API drives it: upload, create a job, poll its events, list checkpoints, chat with
the `ft:` model (supervised and DPO); bad requests get the API's error objects; a server
killed with SIGKILL while a job runs comes back and finishes the job without losing what
was recorded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from conftest import QA, chat, write_jsonl

KEY = "test-key"
TIMEOUT = 180  # seconds any job may take here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`finesmith serve MODEL --api-key KEY` in its own process, on a free port, with its own home."""

    def __init__(self, model: str, home: Path) -> None:
        self.model, self.home = model, home

    def start(self) -> "Server":
        self.port = free_port()
        env = {**os.environ, "FINESMITH_HOME": str(self.home)}
        self.log = open(self.home.parent / f"server-{self.port}.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "finesmith", "serve", self.model, "--port",
                                         str(self.port), "--api-key", KEY], env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                self.client.models.list()
                return self
            except openai.APIConnectionError:
                time.sleep(0.3)
        raise AssertionError("the server did not start: " + self.output())

    def output(self) -> str:
        self.log.flush()
        return (self.home.parent / f"server-{self.port}.log").read_text(errors="replace")[-3000:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(60)
        self.log.close()


@pytest.fixture()
def server(tiny_model, tmp_path):
    running = Server(tiny_model, tmp_path / "home").start()
    yield running
    running.stop()


def wait_for(client: openai.OpenAI, job_id: str, until=("succeeded", "failed", "cancelled"), timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def sft_file(tmp_path: Path, copies: int = 2) -> Path:
    return Path(write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA * copies]))


def test_supervised_and_dpo_jobs_through_the_openai_client(server, tmp_path):
    client = server.client
    uploaded = client.files.create(file=open(sft_file(tmp_path), "rb"), purpose="fine-tune")
    assert uploaded.purpose == "fine-tune" and uploaded.filename == "train.jsonl"
    assert [f.id for f in client.files.list().data] == [uploaded.id]
    assert client.files.retrieve(uploaded.id).bytes == sft_file(tmp_path).stat().st_size
    assert client.files.content(uploaded.id).content == sft_file(tmp_path).read_bytes()

    job = client.fine_tuning.jobs.create(model="tiny-llama0", training_file=uploaded.id, suffix="qa", seed=7,
                                         method={"type": "supervised", "supervised": {"hyperparameters": {
                                             "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2}}})
    assert job.status == "validating_files" and job.seed == 7
    # poll the events, as the hosted API's users do, until the job ends
    seen: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    while client.fine_tuning.jobs.retrieve(job.id).status not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, seen
        seen = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
        time.sleep(0.5)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny-llama0:qa:{job.id.split('-')[-1][:8]}"
    assert done.hyperparameters.n_epochs == 2 and done.hyperparameters.batch_size == 4
    assert done.hyperparameters.learning_rate_multiplier == 2 and done.trained_tokens > 0
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [e.message for e in reversed(events)]  # newest first, as the hosted API lists them
    order = ["Created fine-tuning job", "Validating training file", "Files validated", "Fine-tuning job started",
             "Step 1/12: training loss=", "Step 12/12", "New fine-tuned model created", "The job has successfully"]
    positions = [next(i for i, m in enumerate(messages) if m.startswith(p)) for p in order]
    assert positions == sorted(positions), messages
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 13))  # each step once
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(page.data) == 3 and page.has_more
    following = client.fine_tuning.jobs.list_events(job.id, limit=3, after=page.data[-1].id)
    assert following.data[0].id not in {e.id for e in page.data}

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [12, 6]  # one per epoch, newest first
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-12"
    assert checkpoints[0].metrics.train_loss == pytest.approx(
        next(e.data["train_loss"] for e in events if e.type == "metrics" and e.data["step"] == 12))

    assert done.fine_tuned_model in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4,
                                           messages=[{"role": "user", "content": "What colour is the sky?"}])
    assert reply.model == done.fine_tuned_model and reply.usage.completion_tokens >= 1
    listed = client.fine_tuning.jobs.list(limit=10).data
    assert [j.id for j in listed] == [job.id]

    # DPO: preference pairs, beta, the same life cycle
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": "I do not know."}
                                                  for q, a in QA])
    pair_file = client.files.create(file=open(pairs, "rb"), purpose="fine-tune")
    dpo = client.fine_tuning.jobs.create(model="tiny-llama0", training_file=pair_file.id, suffix="dpo",
                                         method={"type": "dpo", "dpo": {"hyperparameters": {
                                             "beta": 0.2, "n_epochs": 1, "batch_size": 4}}})
    finished = wait_for(client, dpo.id)
    assert finished.status == "succeeded", finished.error
    assert finished.method.dpo.hyperparameters.beta == 0.2
    run = json.loads((server.home / "jobs" / dpo.id / "run" / "run.json").read_text())
    assert run["config"]["objective"] == "dpo" and run["config"]["preference"]["beta"] == 0.2
    reply = client.chat.completions.create(model=finished.fine_tuned_model, max_tokens=3,
                                           messages=[{"role": "user", "content": "Say hello."}])
    assert reply.choices[0].message.content is not None

    # cancel a running job: it stops with a checkpoint, and cancelling again is refused
    long = client.fine_tuning.jobs.create(model="tiny-llama0", training_file=uploaded.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 2}}})
    deadline = time.monotonic() + TIMEOUT
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(long.id, limit=5).data):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert client.fine_tuning.jobs.cancel(long.id).id == long.id
    cancelled = wait_for(client, long.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert any(e.message.startswith("Fine-tuning job cancelled (checkpoint at step")
               for e in client.fine_tuning.jobs.list_events(long.id, limit=100).data)
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(long.id)

    # a DPO job on SFT data fails validation with a reason
    wrong = client.fine_tuning.jobs.create(model="tiny-llama0", training_file=uploaded.id, method={"type": "dpo"})
    failed = wait_for(client, wrong.id)
    assert failed.status == "failed" and "needs preference examples" in failed.error.message
    assert client.files.delete(pair_file.id).deleted and pair_file.id not in [f.id for f in client.files.list().data]


def test_bad_requests_get_the_api_error_objects(server, tmp_path):
    client = server.client
    uploaded = client.files.create(file=open(sft_file(tmp_path), "rb"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError) as unknown_model:
        client.fine_tuning.jobs.create(model="gpt-5", training_file=uploaded.id)
    assert unknown_model.value.body["code"] == "model_not_found" and unknown_model.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as unknown_file:
        client.fine_tuning.jobs.create(model="tiny-llama0", training_file="file-nope")
    assert unknown_file.value.body["param"] == "training_file" and "file-nope" in unknown_file.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
    with pytest.raises(openai.BadRequestError) as bad_param:
        client.fine_tuning.jobs.create(model="tiny-llama0", training_file=uploaded.id,
                                       method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": -1}}})
    assert "n_epochs" in bad_param.value.body["param"]

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(chat("a", "b")) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(openai.BadRequestError) as malformed:
        client.files.create(file=open(broken, "rb"), purpose="fine-tune")
    assert malformed.value.body["message"].startswith("broken.jsonl:2") and malformed.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=open(sft_file(tmp_path), "rb"), purpose="assistants")
    assert len(client.files.list().data) == 1  # nothing stored for the refused uploads

    wrong_key = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong_key.fine_tuning.jobs.list()
    assert denied.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as unknown_chat:
        client.chat.completions.create(model="ft:nope", messages=[{"role": "user", "content": "hi"}])
    assert unknown_chat.value.body["code"] == "model_not_found"


def test_sigkill_while_a_job_runs_then_restart_finishes_it(tiny_model, tmp_path):
    home = tmp_path / "home"
    server = Server(tiny_model, home).start()
    client = server.client
    uploaded = client.files.create(file=open(sft_file(tmp_path, copies=1), "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-llama0", training_file=uploaded.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 12, "batch_size": 2}}})
    total = 12 * 6
    deadline = time.monotonic() + TIMEOUT
    while True:  # until training is well under way (a few checkpoints written)
        steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id, limit=5).data if e.type == "metrics"]
        if steps and max(steps) >= 12:
            break
        assert time.monotonic() < deadline and client.fine_tuning.jobs.retrieve(job.id).status != "failed"
        time.sleep(0.2)
    before = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    server.stop(signal.SIGKILL)  # no shutdown code runs in the server

    server = Server(tiny_model, home).start()
    client = server.client
    try:
        done = wait_for(client, job.id)
        assert done.status == "succeeded", done.error
        events = client.fine_tuning.jobs.list_events(job.id, limit=2000).data
        assert {e.id for e in before} <= {e.id for e in events}  # nothing recorded before the kill is lost
        messages = [e.message for e in events]
        assert any(m.startswith("The server restarted while this job ran; it resumes from its checkpoint at step")
                   for m in messages), messages[:20]
        assert sorted(e.data["step"] for e in events if e.type == "metrics") == list(range(1, total + 1))
        record = json.loads((home / "jobs" / job.id / "run" / "run.json").read_text())
        assert record["state"] == "finished" and record["result"]["steps"] == total
        assert done.fine_tuned_model in [m.id for m in client.models.list().data]
    finally:
        server.stop()


def test_serving_off_loopback_needs_a_key(tiny_model, capsys):
    from finesmith.cli import main

    assert main(["serve", tiny_model, "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "needs --api-key" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
