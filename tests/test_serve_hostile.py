"""`finesmith serve` against hostile pages, hostile bodies and its own faults: cross-site and
DNS-rebinding requests are refused, big or deep bodies are refused without freezing the
server, a held database lock does not stop reads, a second server cannot share a home,
uploads stream to disk under a cap, a hanging reward neither hangs the run nor blocks
SIGTERM, a worker that cannot start fails its job, damaged runs and compare reports cannot
break or script the dashboard, every error is OpenAI-shaped, hyperparameters are bounded,
and the server's paths and files stay private.

Most tests drive the app in-process (`TestClient`) with a model registered but never
loaded: none of them generates text."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import QA, chat, write_jsonl

BASE = "http://127.0.0.1:8000"
MODEL = "tiny-llama0"


def make_app(home: Path, runs: list[Path] | None = None, **options):
    from finesmith.serve.jobs import JobService
    from finesmith.serve.registry import ModelRegistry
    from finesmith.serve.server import build_app
    from finesmith.serve.store import Store

    registry = ModelRegistry()
    registry.add(str(home.parent / "no-such-model"), MODEL)  # registered, never loaded here
    service = JobService(Store(home), registry, log=lambda *_: None,
                         max_upload_bytes=options.pop("max_upload_bytes", 1 << 20))
    from finesmith.serve.http import allowed_host_list

    options.setdefault("allowed_hosts", allowed_host_list("127.0.0.1", 8000))  # as `finesmith serve` on 8000
    app = build_app(registry, options.pop("api_key", None), service, [str(r) for r in runs or []], **options)
    return app, service


@pytest.fixture()
def api(tmp_path):
    app, service = make_app(tmp_path / "home", [tmp_path / "runs"])
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as client:
        client.service = service
        yield client


def sft_bytes(copies: int = 1) -> bytes:
    return "".join(json.dumps(chat(q, a)) + "\n" for q, a in QA * copies).encode()


def upload(client, content: bytes = b"", headers: dict | None = None, name: str = "train.jsonl"):
    return client.post("/v1/files", files={"file": (name, content or sft_bytes(), "application/jsonl")},
                       data={"purpose": "fine-tune"}, headers={"Authorization": "Bearer local", **(headers or {})})


def job_body(file_id: str, **extra) -> dict:
    return {"model": MODEL, "training_file": file_id, **extra}


def assert_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# ---- 2: Host, Origin and Content-Type ---------------------------------------------------------------

def test_a_cross_site_text_plain_post_cannot_create_a_job(api):
    file_id = upload(api).json()["id"]
    body = json.dumps(job_body(file_id))
    # what a page on another site can send without a preflight: text/plain, its own Origin
    assert_error(api.post("/v1/fine_tuning/jobs", content=body, headers={
        "Content-Type": "text/plain", "Origin": "https://evil.example"}), 403)
    assert_error(api.post("/v1/fine_tuning/jobs", content=body, headers={"Content-Type": "text/plain"}), 415)
    assert_error(api.post("/v1/fine_tuning/jobs", content=body, headers={
        "Content-Type": "application/x-www-form-urlencoded"}), 415)
    assert_error(api.post("/v1/fine_tuning/jobs", content=body, headers={"Content-Type": "application/json",
                                                                        "Origin": "null"}), 403)
    assert api.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_a_cross_site_form_post_cannot_upload(api):
    assert_error(upload(api, headers={"Origin": "https://evil.example"}), 403)
    # no Origin at all (an old browser's form post): only with a header a form cannot send
    bare = api.post("/v1/files", files={"file": ("t.jsonl", sft_bytes(), "application/jsonl")},
                    data={"purpose": "fine-tune"})
    assert_error(bare, 403)
    assert api.get("/v1/files").json()["data"] == []


def test_a_dns_rebinding_host_is_refused(api):
    file_id = upload(api).json()["id"]
    assert api.get(f"/v1/files/{file_id}/content").status_code == 200
    for path in (f"/v1/files/{file_id}/content", "/v1/fine_tuning/jobs", "/", "/health"):
        error = assert_error(api.get(path, headers={"Host": "attacker.example:8000"}), 403)
        assert "attacker.example" in error["message"]
    assert_error(api.get("/health", headers={"Host": "127.0.0.1:9999"}), 403)  # the bound port only
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
        assert api.get("/health", headers={"Host": host}).status_code == 200


def test_allowed_hosts_extend_and_a_wildcard_bind_with_a_key(tmp_path):
    from finesmith.serve.http import allowed_host_list

    hosts = allowed_host_list("127.0.0.1", 8000, ["ft.example.org"], api_key=None)
    app, _ = make_app(tmp_path / "home", allowed_hosts=hosts)
    with TestClient(app, base_url="http://ft.example.org:8000") as client:
        assert client.get("/health").status_code == 200
        assert client.get("/health", headers={"Host": "other.example"}).status_code == 403
    assert allowed_host_list("0.0.0.0", 8000, [], api_key="k") is None  # any Host: the key guards /v1


def test_the_same_origin_dashboard_and_the_openai_client_keep_working(tmp_path):
    import openai

    app, _ = make_app(tmp_path / "home", api_key="k")
    with TestClient(app, base_url=BASE) as client:
        origin = {"Origin": BASE, "Authorization": "Bearer k"}
        assert "<iframe" in client.get("/", headers={"Origin": BASE}).text
        made = client.post("/v1/files", files={"file": ("t.jsonl", sft_bytes(), "application/jsonl")},
                           data={"purpose": "fine-tune"}, headers=origin)  # the dashboard's fetch
        assert made.status_code == 200, made.text
        created = client.post("/v1/fine_tuning/jobs", json=job_body(made.json()["id"]), headers=origin)
        assert created.status_code == 200, created.text
        sdk = openai.OpenAI(base_url=f"{BASE}/v1", api_key="k", http_client=client, max_retries=0)
        uploaded = sdk.files.create(file=("t.jsonl", sft_bytes()), purpose="fine-tune")
        job = sdk.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id, seed=3)
        assert sdk.fine_tuning.jobs.retrieve(job.id).seed == 3
        assert sdk.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        assert sdk.files.delete(uploaded.id).deleted
        with pytest.raises(openai.BadRequestError) as bad:
            sdk.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id)
        assert bad.value.body["param"] == "training_file"


# ---- 3: nothing blocks the event loop; bodies are capped -----------------------------------------

def test_a_json_body_over_the_cap_is_413(tmp_path):
    app, _ = make_app(tmp_path / "home", max_json_bytes=4096)
    with TestClient(app, base_url=BASE) as client:
        big = json.dumps({"model": MODEL, "training_file": "x" * 10_000})
        error = assert_error(client.post("/v1/fine_tuning/jobs", content=big,
                                         headers={"Content-Type": "application/json"}), 413)
        assert "4096" in error["message"] or "4 KB" in error["message"]

        def chunks():  # no Content-Length: the cap holds on the bytes read
            for _ in range(10):
                yield b" " * 1000
        assert_error(client.post("/v1/fine_tuning/jobs", content=chunks(),
                                 headers={"Content-Type": "application/json"}), 413)


def test_a_held_database_write_lock_does_not_freeze_health_or_reads(api):
    file_id = upload(api).json()["id"]
    assert api.post("/v1/fine_tuning/jobs", json=job_body(file_id)).status_code == 200
    holder = sqlite3.connect(api.service.store.path, timeout=1, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process writing, for as long as it likes
    answers: dict[str, float] = {}

    def get(path: str) -> None:
        started = time.monotonic()
        if api.get(path).status_code == 200:
            answers[path] = time.monotonic() - started

    try:
        threads = [threading.Thread(target=get, args=(p,), daemon=True) for p in
                   ("/v1/fine_tuning/jobs", "/v1/files", "/v1/finesmith/runs")]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        get("/health")
        for thread in threads:
            thread.join(timeout=5)
        assert set(answers) == {"/health", "/v1/fine_tuning/jobs", "/v1/files", "/v1/finesmith/runs"}, answers
        assert max(answers.values()) < 3, answers
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# ---- 4: one server per home ------------------------------------------------------------------------

def test_a_second_server_on_the_same_home_refuses_in_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    from finesmith.cli import main
    from finesmith.errors import FinesmithError
    from finesmith.serve.store import lock_home

    home = tmp_path / "home"
    held = lock_home(home)
    try:
        with pytest.raises(FinesmithError, match=rf"pid {os.getpid()}.*FINESMITH_HOME.*--no-jobs"):
            lock_home(home)
        monkeypatch.setenv("FINESMITH_HOME", str(home))
        assert main(["serve", tiny_model, "--port", "1"]) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    finally:
        held.close()
    lock_home(home).close()  # free again once the first one lets go


# ---- 5: uploads stream to disk under a cap ---------------------------------------------------------

def test_an_upload_over_the_cap_is_413_and_leaves_nothing(tmp_path):
    app, service = make_app(tmp_path / "home", max_upload_bytes=4000)
    with TestClient(app, base_url=BASE) as client:
        small = sft_bytes()[:3000].rsplit(b"\n", 1)[0] + b"\n"
        made = upload(client, small)
        assert made.status_code == 200 and made.json()["bytes"] == len(small), made.text
        error = assert_error(upload(client, sft_bytes(copies=20)), 413, "file")
        assert "4000" in error["message"] or "KB" in error["message"]
        assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [made.json()["id"]]
        assert sorted(p.name for p in service.store.files_dir.iterdir()) == [made.json()["id"] + ".jsonl"]
        bad = upload(client, b"\xff\xfe not utf-8\n")
        assert_error(bad, 400, "file")
        assert len(list(service.store.files_dir.iterdir())) == 1


def test_validate_upload_reads_from_disk(tmp_path):
    from finesmith.serve.jobs import validate_upload

    path = tmp_path / "rows.jsonl"
    path.write_bytes(sft_bytes())
    assert validate_upload(path, "rows.jsonl") == (len(QA), "chat")


# ---- 6: reward code under a timeout, SIGTERM still checkpoints ---------------------------------------

def no_eval(args: list[str]) -> list[str]:
    """`finesmith train` arguments without the held-out set (the first reward call is then in step 1)."""
    at = args.index("--eval-data")
    return args[:at] + args[at + 2:]


def test_a_hanging_reward_fails_the_run_in_one_line_after_its_timeout(tiny_model, tmp_path, capsys):
    from test_grpo import grpo_args

    from finesmith.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA])
    module = tmp_path / "slow.py"
    module.write_text("import time\ndef slow(completion, **kw):\n    time.sleep(60)\n    return 1.0\n")
    args = no_eval(grpo_args(tiny_model, data, tmp_path / "run", f"{module}:slow")) + ["grpo.reward_timeout=1"]
    started = time.monotonic()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert time.monotonic() - started < 40
    assert f"reward {module}:slow did not return within 1 s" in err and len(err.splitlines()) == 1, err


def test_sigterm_during_a_hanging_reward_checkpoints_and_exits_75(tiny_model, tmp_path):
    import signal

    from test_grpo import grpo_args

    from finesmith.cli import main
    from finesmith.train.checkpoint import list_checkpoints

    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA])
    marker = tmp_path / "hanging"
    module = tmp_path / "hang.py"
    module.write_text(f"import os, time\nMARK = {str(marker)!r}\ndef hang(completion, **kw):\n"
                      "    if not os.path.exists(MARK):\n        open(MARK, 'w').close()\n        time.sleep(25)\n"
                      "    return 1.0\n")
    args = no_eval(grpo_args(tiny_model, data, tmp_path / "run", f"{module}:hang"))
    signalled: list[float] = []

    def stop_when_hanging() -> None:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        signalled.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_hanging, daemon=True).start()
    assert main(args) == 75
    assert signalled and time.monotonic() - signalled[0] < 12  # not after the reward's 25 s
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [1]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["state"] == "preempted"


# ---- 7: a worker that cannot start ------------------------------------------------------------------

def test_a_job_whose_worker_cannot_start_fails_and_the_queue_moves_on(api, monkeypatch):
    import subprocess

    from finesmith.serve import jobs as jobs_module

    service = api.service
    file_id = upload(api).json()["id"]
    first = api.post("/v1/fine_tuning/jobs", json=job_body(file_id)).json()["id"]
    second = api.post("/v1/fine_tuning/jobs", json=job_body(file_id)).json()["id"]
    launched: list[list[str]] = []

    class Started:
        pid = 4242

        def poll(self):
            return None

    def popen(argv, **kwargs):
        if first in argv:
            raise OSError(8, "Exec format error", "/opt/secret/bin/python")
        launched.append(argv)
        return Started()

    monkeypatch.setattr(jobs_module.subprocess, "Popen", popen)
    assert subprocess.Popen is popen
    service.tick()  # validates both, tries the first
    service.tick()
    failed = api.get(f"/v1/fine_tuning/jobs/{first}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_start_failed", failed
    assert "Exec format error" in failed["error"]["message"] and "/opt/secret" not in failed["error"]["message"]
    assert len(launched) == 1 and second in launched[0]
    service.worker = None  # the fake never ends


# ---- 8: a damaged run ----------------------------------------------------------------------------

def test_a_damaged_run_json_is_flagged_and_the_others_listed(api, tmp_path, tiny_model):
    runs = tmp_path / "runs"
    for name, record in (("broken", "[1, 2]"), ("bad-method", json.dumps({"method": "lora"})), ("garbage", "{nope")):
        (runs / name).mkdir(parents=True)
        (runs / name / "run.json").write_text(record)
    listed = api.get("/v1/finesmith/runs")
    assert listed.status_code == 200, listed.text
    by_name = {r["name"]: r for r in listed.json()["data"]}
    assert set(by_name) == {"broken", "bad-method", "garbage"}
    for run in by_name.values():
        assert run["state"] == "damaged" and run["error"] and "\n" not in run["error"]
        assert str(tmp_path) not in json.dumps(run)


# ---- 9: compare reports are sandboxed ----------------------------------------------------------------

def test_a_compare_report_cannot_script_the_dashboard(api, tmp_path):
    report = tmp_path / "runs" / "cmp" / "report.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html><script>parent.localStorage.getItem('finesmith-key')</script></html>")
    listed = api.get("/v1/finesmith/reports").json()["data"]
    assert len(listed) == 1 and str(tmp_path) not in json.dumps(listed)
    shown = api.get(f"/v1/finesmith/reports/{listed[0]['id']}")
    assert shown.status_code == 200
    policy = shown.headers["content-security-policy"]
    assert "sandbox" in policy.split(";")[0] and "allow-scripts" not in policy and "script-src 'none'" in policy
    assert shown.headers["x-content-type-options"] == "nosniff"
    import re

    frame = re.search(r"<iframe[^>]*id=\"report\"[^>]*>", api.get("/").text).group(0)
    assert re.search(r"\ssandbox(=\"\")?[\s>]", frame) and "allow-scripts" not in frame, frame


# ---- 10: every error in the OpenAI shape -------------------------------------------------------------

def test_every_error_is_openai_shaped(api, monkeypatch):
    deep = "[" * 100_000 + "]" * 100_000
    assert_error(api.post("/v1/fine_tuning/jobs", content=deep, headers={"Content-Type": "application/json"}), 400)
    nested = json.dumps({"model": MODEL, "training_file": "f", "metadata": json.loads("[" * 200 + "]" * 200)})
    assert_error(api.post("/v1/fine_tuning/jobs", content=nested, headers={"Content-Type": "application/json"}), 400)
    assert_error(api.post("/v1/fine_tuning/jobs", content=b'{"model": NaN}',
                          headers={"Content-Type": "application/json"}), 400)
    assert_error(api.get("/v1/fine_tuning/jobs?limit=abc"), 400, "limit")
    assert_error(api.get("/v1/fine_tuning/jobs/x/events?limit=1.5"), 400, "limit")

    def broken(*_, **__):
        raise RuntimeError("disk on fire at /srv/secret/service.db")

    monkeypatch.setattr(api.service.store, "jobs", broken)
    error = assert_error(api.get("/v1/fine_tuning/jobs"), 500)
    assert error["type"] == "server_error" and "/srv/secret" not in error["message"]
    assert api.get("/health").status_code == 200  # one bad request fails only itself


# ---- 11: bounded hyperparameters ---------------------------------------------------------------------

@pytest.mark.parametrize("extra, param", [
    ({"hyperparameters": {"n_epochs": 1e12}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 1e9}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 1e999}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": 11}}, "hyperparameters.learning_rate_multiplier"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 1e999}}}}, "hyperparameters.beta"),
    ({"seed": 2**31}, "seed"), ({"seed": -1}, "seed"), ({"seed": True}, "seed"),
])
def test_hyperparameters_and_seed_are_bounded(api, extra, param):
    file_id = upload(api).json()["id"]
    body = json.dumps(job_body(file_id, **extra)).replace("Infinity", "1e999")
    error = assert_error(api.post("/v1/fine_tuning/jobs", content=body, headers={"Content-Type": "application/json"}),
                         400, param)
    assert param.split(".")[-1] in error["message"]


def test_hyperparameters_inside_the_bounds_are_accepted(api):
    file_id = upload(api).json()["id"]
    made = api.post("/v1/fine_tuning/jobs", json=job_body(file_id, seed=2**31 - 1, hyperparameters={
        "n_epochs": 50, "batch_size": 256, "learning_rate_multiplier": 10}))
    assert made.status_code == 200, made.text


# ---- 12: no server paths out, private files ----------------------------------------------------------

def test_job_errors_and_listings_show_no_server_paths(api, tmp_path):
    service = api.service
    runs = tmp_path / "runs" / "one"
    runs.mkdir(parents=True)
    (runs / "run.json").write_text("{}")
    file_id = upload(api).json()["id"]
    job_id = api.post("/v1/fine_tuning/jobs", json=job_body(file_id)).json()["id"]
    job = service.store.job(job_id)
    data_path = service.store.file(file_id)["path"]
    Path(job["output"]).mkdir(parents=True, exist_ok=True)
    (Path(job["output"]) / "worker.log").write_text(
        f"error: {data_path}:3: the row has no assistant turn\n", encoding="utf-8")
    service._finished(job, 2)
    error = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["error"]
    assert error["message"].startswith(f"{file_id}:3: the row has no assistant turn"), error
    events = api.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()
    everything = json.dumps(events) + json.dumps(api.get("/v1/finesmith/runs").json())
    assert str(tmp_path) not in everything and str(service.store.root) not in everything


def test_the_home_is_private(tmp_path):
    from finesmith.serve.store import Store

    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    (home / "files").mkdir(mode=0o755)
    (home / "files" / "old.jsonl").write_text("{}\n")
    os.chmod(home / "files" / "old.jsonl", 0o644)
    app, service = make_app(home)
    with TestClient(app, base_url=BASE) as client:
        file_id = upload(client).json()["id"]
        assert client.post("/v1/fine_tuning/jobs", json=job_body(file_id)).status_code == 200
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    for folder in (home, home / "files", home / "jobs"):
        assert mode(folder) == 0o700, (folder, oct(mode(folder)))
    for path in [home / "service.db", home / "files" / "old.jsonl", *(home / "files").iterdir(),
                 *home.glob("service.db-*")]:
        assert mode(path) == 0o600, (path, oct(mode(path)))
