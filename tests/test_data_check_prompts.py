"""`finesmith data check --objective grpo`: reinforcement prompts (the hosted shape: a conversation
ending in a user turn, other fields for graders) are checked as prompts, every problem with file:line."""

from __future__ import annotations

import json

from finesmith.cli import main


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def prompt(text, answer):
    return {"messages": [{"role": "user", "content": text}], "answer": answer}


def test_prompt_rows_pass_as_prompts_and_name_their_fields(tiny_model, tmp_path, capsys):
    data = write(tmp_path / "prompts.jsonl", [prompt(f"What is {i} + {i}?", str(2 * i)) for i in range(3)])
    assert main(["data", "check", data, "--model", tiny_model, "--objective", "grpo"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "3 prompts" in out and "item.answer (3)" in out
    # the same rows as supervised data are refused: nothing to learn from
    assert main(["data", "check", data, "--model", tiny_model]) == 2


def test_every_bad_prompt_row_is_listed_with_its_line(tiny_model, tmp_path, capsys):
    data = write(tmp_path / "prompts.jsonl", [prompt("ok", "1"), "not json", {"text": "raw text"},
                                              {"prompt": "x" * 4000, "completion": "y"}])
    assert main(["data", "check", data, "--model", tiny_model, "--objective", "grpo", "--max-length", "64"]) == 2
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert "prompts.jsonl:2: invalid JSON" in out
    assert "prompts.jsonl:3: objective grpo needs prompts" in out
    assert "prompts.jsonl:4: the prompt has" in out and "over max_length 64" in out
    assert "not usable for grpo (3 errors" in out
