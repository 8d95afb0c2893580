"""The Gemma 3 270M example's pieces that need no real model: its data and its chat format.

The example itself (examples/gemma3_270m/run.sh) trains the real 240 MB model and is run by
hand; its measured numbers are in its README.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import shutil
from pathlib import Path

from conftest import ASSETS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gemma3_270m"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gemma3_270m_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dates_data_is_reproducible_disjoint_and_right(tmp_path: Path) -> None:
    make_data = load("make_data")
    make_data.main(tmp_path / "a")
    make_data.main(tmp_path / "b")
    train = (tmp_path / "a" / "train.jsonl").read_text(encoding="utf-8")
    heldout = (tmp_path / "a" / "heldout.jsonl").read_text(encoding="utf-8")
    assert train == (tmp_path / "b" / "train.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in train.splitlines()]
    held = [json.loads(line) for line in heldout.splitlines()]
    assert (len(rows), len(held)) == (240, 100)
    assert not {r["messages"][0]["content"] for r in rows} & {r["messages"][0]["content"] for r in held}
    for row in rows + held:
        answer = dt.date.fromisoformat(row["messages"][1]["content"])
        sentence = row["messages"][0]["content"]
        assert str(answer.year) in sentence and make_data.MONTHS[answer.month - 1][:3] in sentence
        assert str(answer.day) in sentence


def test_gemma_turn_format_renders_and_becomes_an_ollama_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from finesmith.data.tokenize import render
    from finesmith.export.gguf_modelfile import chat_format

    shutil.copytree(ASSETS / "tokenizer-gemma", tmp_path, dirs_exist_ok=True)  # has Gemma's turn markers
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.chat_template = load("prepare_base").GEMMA_TURNS
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Date?"}]
    assert render(tokenizer, conversation, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nDate?<end_of_turn>\n<start_of_turn>model\n")
    found, why = chat_format(tokenizer)
    assert found is not None, why
    assert (found.user, found.generation, found.fold) == (("<start_of_turn>user\n", "<end_of_turn>\n"),
                                                          "<start_of_turn>model\n", "first")
