"""A tool-calling run served and driven by the `openai` client through a whole round trip, and
checkpoints served under their `ft:...:ckpt-step-N` names."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import ASSETS, QA, chat, write_jsonl

from finesmith.cli import main
from finesmith.serve.engine import Sampling, load_engine
from finesmith.serve.registry import ModelRegistry
from finesmith.serve.server import build_app

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tool_calling" / "train.jsonl"
KEY = "tools-key"


def tiny_long_model(folder: Path) -> Path:
    """A tiny ChatML Llama with 2048 positions (its small tokenizer spells the Hermes tool
    instructions in ~500 tokens, more than the usual tiny model's 512) and hidden size 128,
    which memorises one exchange in 100 steps (~10 s on CPU; 64 needs several times more)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shutil.copytree(ASSETS / "tokenizer-chatml", folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def one_call_conversation() -> dict:
    """The example's first conversation cut to one exchange: a request, the call, its result, the answer."""
    row = json.loads(EXAMPLE.read_text().splitlines()[0])
    messages = row["messages"][:5]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    return {"messages": messages, "tools": row["tools"]}


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model overfit on one tool-calling exchange (Hermes rendering), until it emits the call."""
    root = tmp_path_factory.mktemp("tool-run")
    model = tiny_long_model(root / "base")
    data = write_jsonl(root / "train.jsonl", [one_call_conversation()] * 10)  # the same exchange, as often as training needs rows
    config = {"model": str(model), "data": data, "output": str(root / "run"), "tool_format": "hermes",
              "method": "full", "lr": 3e-3, "max_steps": 100, "batch_size": 1, "max_length": 2048,
              "warmup_ratio": 0.0, "log_every": 20}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(root / "config.yaml")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def served(tool_run: Path):
    import uvicorn

    engine = load_engine(str(tool_run), "cpu")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engine, KEY), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", engine
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()


def test_openai_client_tool_round_trip(served) -> None:
    from openai import OpenAI

    url, engine = served
    client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
    example = one_call_conversation()
    messages = example["messages"][:2]
    first = client.chat.completions.create(model=engine.name, messages=messages, tools=example["tools"],
                                           temperature=0, max_tokens=120)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    (call,) = choice.message.tool_calls
    expected = example["messages"][2]["tool_calls"][0]["function"]
    assert call.id.startswith("call_") and call.function.name == expected["name"]
    assert json.loads(call.function.arguments) == json.loads(expected["arguments"])

    streamed = client.chat.completions.create(model=engine.name, messages=messages, tools=example["tools"],
                                              temperature=0, max_tokens=120, stream=True)
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert [(t.function.name, t.function.arguments) for t in calls] == [(call.function.name,
                                                                          call.function.arguments)]
    assert not "".join(d.content or "" for d in deltas)

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": example["messages"][3]["content"]}]
    final = client.chat.completions.create(model=engine.name, messages=messages, tools=example["tools"],
                                           temperature=0, max_tokens=40)
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    assert final.choices[0].message.content.strip() == example["messages"][4]["content"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpoints_are_served_by_their_ft_names(method: str, tiny_model: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA])
    run = tmp_path / "job" / "run"
    assert main(["train", "--model", tiny_model, "--data", data, "--method", method, "--output", str(run),
                 "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "save_every=1", "keep_checkpoints=2"]) == 0
    registry = ModelRegistry()
    registry.add(str(run), "ft:tiny:finesmith:abcd1234")
    names = registry.add_checkpoints(run, "ft:tiny:finesmith:abcd1234")
    assert names == ["ft:tiny:finesmith:abcd1234:ckpt-step-2", "ft:tiny:finesmith:abcd1234:ckpt-step-3"]
    assert registry.names()[1:] == names and all(registry.owners[n] == "user" for n in names)
    prompt = [{"role": "user", "content": QA[0][0]}]

    def answer(name: str) -> tuple[str, list[float]]:
        engine = registry.engine(name)
        generation = engine.generate(engine.chat_ids(prompt), Sampling(8, logprobs=0))
        return generation.text(), [round(r.logprob, 4) for r in generation.records]

    assert answer(names[-1]) == answer("ft:tiny:finesmith:abcd1234")  # the last checkpoint is the final weights
    assert answer(names[0])[1] != answer(names[-1])[1]  # an earlier step's weights
    if method == "lora":  # the jobs service registers a job's checkpoints as it records them, and at start
        from finesmith.serve.jobs import JobService, fine_tuned_name
        from finesmith.serve.store import SUCCEEDED, Store

        store = Store(tmp_path / "home")
        job = store.add_job({"id": "ftjob-0123456789abcdef", "model": "tiny", "training_file": "file-x",
                             "validation_file": None, "suffix": None, "seed": 1, "method": {"type": "supervised"},
                             "output": str(tmp_path / "job")})
        jobs_registry = ModelRegistry()
        JobService(store, jobs_registry).follow(job)
        expected = [f"{fine_tuned_name(job)}:ckpt-step-{step}" for step in (2, 3)]
        assert jobs_registry.names() == expected
        store.update_job(job["id"], status=SUCCEEDED, fine_tuned_model=fine_tuned_name(job))
        restarted, service = ModelRegistry(), None
        try:
            service = JobService(store, restarted)
            service.start()
            assert restarted.names() == [fine_tuned_name(job)] + expected
        finally:
            if service:
                service.stop()
    shutil.rmtree(run / "checkpoints" / "step-2")  # rotated away by training: no longer listed
    assert names[0] not in registry and names[0] not in registry.names()
    registry.close()
