"""Every method × every command that reads a run: it works, or refuses in one line naming what.

Each run is trained through the CLI, then evaluated (greedy answers, label log-likelihood,
perplexity), exported (hf, adapter, gguf), chatted with and resumed, each as a user would
call it. No command may end in a traceback.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from conftest import chat, write_jsonl

from finesmith.cli import main
from finesmith.run import load_run

LABELS = ["red", "blue", "green"]
ROWS = [chat(f"Colour number {i}?", LABELS[i % 3]) for i in range(12)]
# (method, command) pairs that must refuse, and a phrase the one-line refusal contains.
REFUSALS = {
    ("full", "export-adapter"): "no adapter",
    ("prompt_tuning", "export-hf"): "cannot be merged",
    ("prompt_tuning", "export-gguf"): "cannot be merged",
    ("prefix_tuning", "export-hf"): "cannot be merged",
    ("prefix_tuning", "export-gguf"): "cannot be merged",
}
METHODS = ("full", "lora", "ia3", "prompt_tuning", "prefix_tuning")
COMMANDS = ("eval-generate", "eval-loglik", "eval-perplexity", "export-hf", "export-adapter", "export-gguf",
            "chat", "resume")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("matrix-data")
    return write_jsonl(root / "train.jsonl", ROWS), write_jsonl(root / "eval.jsonl", ROWS[:4])


@pytest.fixture(scope="module")
def runs(tiny_model: str, files: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix-runs")
    out = {}
    for method in METHODS:
        out[method] = root / method
        code = main(["train", "--model", tiny_model, "--data", files[0], "--eval-data", files[1], "--method", method,
                     "--output", str(out[method]), "--max-steps", "2", "--batch-size", "4", "prompt.virtual_tokens=4"])
        assert code == 0, method
    return out


def run_command(command: str, run: Path, files: tuple[str, str], tiny_model: str, tmp: Path,
                monkeypatch: pytest.MonkeyPatch) -> int:
    train, held_out = files
    if command.startswith("eval-"):
        kind = command.split("-")[1]
        flags = {"generate": ["--task", "classification", "--scoring", "generate"],
                 "loglik": ["--task", "classification", "--scoring", "loglik"],
                 "perplexity": ["--task", "perplexity"]}[kind]
        result = tmp / f"{kind}.json"
        code = main(["eval", "--model", str(run), "--data", held_out, "--max-new-tokens", "4",
                     "--output", str(result), *flags])
        if code == 0:
            saved = json.loads(result.read_text())
            assert saved["n"] == 4 and saved["metrics"]
        return code
    if command.startswith("export-"):
        fmt = command.split("-")[1]
        return main(["export", str(run), "--format", fmt, "--output", str(tmp / fmt)])
    if command == "chat":
        monkeypatch.setattr(sys, "stdin", io.StringIO("Colour number 1?\n/exit\n"))
        return main(["chat", str(run), "--max-new-tokens", "4"])
    if command == "resume":
        record = load_run(run).record
        code = main(["train", "--model", tiny_model, "--data", train, "--eval-data", held_out, "--method",
                     record.method_name, "--output", str(run), "--max-steps", "3", "--batch-size", "4",
                     "prompt.virtual_tokens=4", "--resume", "--extend"])
        if code == 0:
            assert load_run(run).record.result["steps"] == 3
        return code
    raise AssertionError(command)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_command_works_or_refuses_in_one_line(method, command, runs, files, tiny_model, tmp_path,
                                                               capsys, monkeypatch):
    capsys.readouterr()
    code = run_command(command, runs[method], files, tiny_model, tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    refusal = REFUSALS.get((method, command))
    if refusal is None:
        assert code == 0, err
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and refusal in lines[0], err


def test_qlora_refuses_on_a_machine_without_cuda(tiny_model, files, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for CPU-only machines")
    code = main(["train", "--model", tiny_model, "--data", files[0], "--method", "qlora", "--output",
                 str(tmp_path / "q"), "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs a CUDA GPU" in err[0]
    assert not (tmp_path / "q").exists()  # refused before anything was written
