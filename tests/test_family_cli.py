"""Every model family through the CLI, each command in a fresh process, as a user meets it.

One class per family (tests/families.py: a tiny random model of the architecture with the
family's real chat template). The training data is multi-turn with a system prompt, and
has tool calls and results where the family's template renders tools. Each class runs:
`data check`, LoRA and full training, `eval`, `export --format hf --verify`,
`export --format gguf --verify` (llama.cpp's greedy tokens must equal the merged model's)
and `serve` answering one chat request.

`bench/supported_models.py` runs this file (with the packing and mask tests) and turns the
outcomes into the README's supported-models table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from families import FAMILIES, make_family_model

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo"]
TOOL_FAMILIES = {"llama", "qwen2", "qwen3", "qwen3_moe", "mistral"}  # their templates render tools
# One thread per process: the models are tiny and two test workers already share the cores.
ENV = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def finesmith(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "finesmith", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)
    assert done.returncode == 0, f"finesmith {' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def conversations(family: str) -> list[dict]:
    rows = []
    for i in range(16):
        city = CITIES[i % len(CITIES)]
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                    {"role": "assistant", "content": f"Hello {i}!"}]
        if family in TOOL_FAMILIES and i % 2:
            call_id = f"call{i:05d}"  # 9 characters, as Mistral's template requires
            messages += [{"role": "user", "content": f"Weather in {city}?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"id": call_id, "type": "function",
                              "function": {"name": "get_weather", "arguments": {"city": city}}}]},
                         {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
                         {"role": "assistant", "content": f"Sunny in {city}."}]
            rows.append({"messages": messages, "tools": TOOLS})
        else:
            messages += [{"role": "user", "content": f"Capital of {city}?"}, {"role": "assistant", "content": city}]
            rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class FamilyMatrix:
    family = ""

    @pytest.fixture(scope="class")
    @classmethod
    def work(cls, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
        root = tmp_path_factory.mktemp(f"family-{cls.family}")
        return {"root": root, "model": make_family_model(root / "model", cls.family),
                "train": write_jsonl(root / "train.jsonl", conversations(cls.family)),
                "eval": write_jsonl(root / "eval.jsonl", [
                    {"messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": f"Capital of {c}?"},
                                  {"role": "assistant", "content": c}]} for c in CITIES])}

    @pytest.fixture(scope="class")
    @classmethod
    def lora_run(cls, work: dict[str, Path]) -> Path:
        out = work["root"] / "lora"
        finesmith("train", "--model", work["model"], "--data", work["train"], "--method", "lora", "--output", out, "--max-steps", 3, "--batch-size", 4, "--lr", "1e-2")
        return out

    def test_data_check(self, work: dict[str, Path]) -> None:
        done = finesmith("data", "check", work["train"], "--model", work["model"])
        assert "16 (16 conversations)" in done.stdout

    def test_lora_trains(self, lora_run: Path) -> None:
        record = json.loads((lora_run / "run.json").read_text())
        assert record["state"] == "finished" and (lora_run / "adapter_model.safetensors").is_file()
        losses = [r["loss"] for r in map(json.loads, (lora_run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        assert losses and all(loss == loss for loss in losses)

    def test_full_trains(self, work: dict[str, Path]) -> None:
        out = work["root"] / "full"
        finesmith("train", "--model", work["model"], "--data", work["train"], "--method", "full", "--output", out,
                  "--max-steps", 2, "--batch-size", 8)
        assert json.loads((out / "run.json").read_text())["state"] == "finished"
        assert (out / "model.safetensors").is_file()

    def test_eval(self, work: dict[str, Path], lora_run: Path) -> None:
        result = work["root"] / "eval.json"
        finesmith("eval", "--model", lora_run, "--data", work["eval"], "--output", result, "--max-new-tokens", 8)
        scored = json.loads(result.read_text())
        assert scored["n"] == len(CITIES) and 0 <= scored["accuracy"] <= 1

    def test_export_hf_verify(self, work: dict[str, Path], lora_run: Path) -> None:
        out = work["root"] / "hf"
        done = finesmith("export", lora_run, "--format", "hf", "--verify", "--output", out)
        assert (out / "model.safetensors").is_file() and "FAIL" not in done.stdout

    @pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama.cpp bindings not installed")
    def test_export_gguf_verify(self, work: dict[str, Path], lora_run: Path) -> None:
        out = work["root"] / "gguf"
        done = finesmith("export", lora_run, "--format", "gguf", "--verify", "--output", out)
        assert list(out.glob("*.gguf")) and (out / "Modelfile").is_file() and "FAIL" not in done.stdout

    def test_serve_answers(self, lora_run: Path, tmp_path: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log = tmp_path / "serve.log"
        with open(log, "w") as sink:
            server = subprocess.Popen([sys.executable, "-m", "finesmith", "serve", str(lora_run), "--port", str(port),
                                       "--no-jobs"], stdout=sink, stderr=subprocess.STDOUT, env=ENV)
        try:
            deadline = time.monotonic() + 120
            body = json.dumps({"model": lora_run.name, "max_tokens": 4, "messages": [
                {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Rome?"}]}).encode()
            while True:
                assert server.poll() is None, log.read_text()
                try:
                    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                                     headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(request, timeout=60) as response:
                        answer = json.loads(response.read())
                    break
                except OSError:
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.2)
            choice = answer["choices"][0]
            assert isinstance(choice["message"]["content"], str) and answer["usage"]["completion_tokens"] >= 1
        finally:
            server.terminate()
            server.wait(timeout=30)


# One test class per family (TestLlama, TestQwen3Moe, ...): `make test` spreads classes over its workers.
for _family in FAMILIES:
    _name = "Test" + "".join(part.capitalize() for part in _family.split("_"))
    globals()[_name] = type(_name, (FamilyMatrix,), {"family": _family})


def test_qwen3_reasoning_trains_and_thinking_round_trips(tmp_path: Path) -> None:
    """Data with and without reasoning trains; `thinking` lands in the run record and in the chat
    template every later process reads (here: the exported model's tokenizer, loaded by transformers)."""
    from transformers import AutoTokenizer

    model = make_family_model(tmp_path / "qwen3", "qwen3")
    rows = []
    for i in range(16):
        answer = CITIES[i % len(CITIES)]
        if i % 3 == 0:
            turn = {"role": "assistant", "content": answer, "reasoning_content": f"The capital is {answer}."}
        elif i % 3 == 1:
            turn = {"role": "assistant", "content": f"<think>I know this one.</think>{answer}"}
        else:
            turn = {"role": "assistant", "content": answer}
        rows.append({"messages": [{"role": "user", "content": f"Capital {i}?"}, turn]})
    data = write_jsonl(tmp_path / "reasoning.jsonl", rows)
    runs, trained = {}, {}
    for thinking in ("auto", "off"):
        out = tmp_path / f"run-{thinking}"
        done = finesmith("train", "--model", model, "--data", data, "--output", out, "--max-steps", 1,
                         f"thinking={thinking}")
        record = json.loads((out / "run.json").read_text())
        assert record["tokenizer"]["thinking"] == thinking and record["config"]["thinking"] == thinking
        runs[thinking] = out
        trained[thinking] = int(re.search(r"(\d+) trained", done.stdout).group(1))
    assert trained["off"] < trained["auto"]  # with thinking off the reasoning is not trained
    exported = tmp_path / "hf-off"
    finesmith("export", runs["off"], "--format", "hf", "--output", exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    asked = tokenizer.apply_chat_template([{"role": "user", "content": "Capital?"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    assert asked.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # asked as it was taught: no thinking
    auto = AutoTokenizer.from_pretrained(runs["auto"])
    assert auto.apply_chat_template([{"role": "user", "content": "Capital?"}], tokenize=False,
                                    add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    from finesmith.evaluate.compare import runs_thinking

    assert runs_thinking([str(runs["off"])]) == "off"  # compare asks the base model as the runs were trained
    assert runs_thinking([str(runs["off"]), str(runs["auto"])]) == "auto"
