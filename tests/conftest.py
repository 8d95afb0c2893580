"""Shared fixtures: a tiny random Llama with a small ChatML tokenizer, made locally."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# One compute thread per test process (and per command a test starts): `make test` runs two
# workers on two cores, and more threads than cores make the tiny models' ops wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(autouse=True, scope="session")
def service_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fine-tuning service's home folder for the whole test run (never the user's ~/.finesmith);
    set in the environment, so servers started as subprocesses use it too."""
    import os

    folder = tmp_path_factory.mktemp("finesmith-home")
    previous = os.environ.get("FINESMITH_HOME")
    os.environ["FINESMITH_HOME"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("FINESMITH_HOME", None)
    else:
        os.environ["FINESMITH_HOME"] = previous


def make_tiny_model(folder: Path, family: str = "chatml", seed: int = 0) -> Path:
    """Save a 2-layer random Llama plus tokenizer into `folder` and return it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shutil.copytree(ASSETS / f"tokenizer-{family}", folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


def chat(user: str, answer: str, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


QA = [("What colour is the sky?", "blue"), ("How many legs does a cat have?", "four"),
      ("What is 2 plus 2?", "4"), ("Capital of France?", "Paris"), ("Opposite of hot?", "cold"),
      ("First letter of the alphabet?", "a"), ("Say hello.", "hello"), ("Colour of grass?", "green"),
      ("What do bees make?", "honey"), ("Freezing point of water in C?", "0"),
      ("How many days in a week?", "seven"), ("Largest planet?", "Jupiter")]


@pytest.fixture()
def qa_files(tmp_path: Path) -> tuple[str, str]:
    train = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [chat(q, a) for q, a in QA[:4]])
    return train, held_out
