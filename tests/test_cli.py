"""The CLI contract: training writes its outputs and changes the right weights; eval runs;
user mistakes give one clear line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat, write_jsonl
from finesmith.cli import main


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_args(tiny_model, train, output, method):
    return ["train", "--model", tiny_model, "--data", train, "--method", method, "--output", output,
            "--max-steps", 3, "--lr", 1e-2, "--batch-size", 4, "--seed", 1]


def test_full_training_changes_every_weight(tiny_model, qa_files, tmp_path, capsys):
    out = tmp_path / "full"
    code, stdout, _ = run_cli(train_args(tiny_model, qa_files[0], out, "full"), capsys)
    assert code == 0
    assert "trainable parameters" in stdout and "100.00%" in stdout
    for name in ("model.safetensors", "config.json", "tokenizer.json", "config.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name
    before, after = load_file(Path(tiny_model) / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and "loss" in records[-1] and "tokens_per_s" in records[-1]


def test_lora_training_changes_only_the_adapter(tiny_model, qa_files, tmp_path, capsys):
    out = tmp_path / "lora"
    code, stdout, _ = run_cli(train_args(tiny_model, qa_files[0], out, "lora") + ["lora.r=4"], capsys)
    assert code == 0
    assert not (out / "model.safetensors").exists()
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: training moved it
    assert all(v.shape[0] == 4 or v.shape[1] == 4 for v in adapter.values())  # rank from the override
    # Target modules default to all linear layers of every block.
    targets = {k.split(".")[-3] for k in adapter}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "%" in stdout and "100.00%" not in stdout


def test_train_from_yaml_with_overrides(tiny_model, qa_files, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model}\ndata: {qa_files[0]}\noutput: {tmp_path / 'y'}\n"
                      "method: lora\nmax_steps: 2\nlora:\n  r: 2\n")
    code, _, err = run_cli(["train", config, "lora.alpha=4", "batch_size=2"], capsys)
    assert code == 0, err
    saved = (tmp_path / "y" / "config.yaml").read_text()
    assert "alpha: 4" in saved and "r: 2" in saved and "batch_size: 2" in saved


def test_eval_zero_and_k_shot(tiny_model, qa_files, tmp_path, capsys):
    result_file = tmp_path / "result.json"
    code, stdout, _ = run_cli(["eval", "--model", tiny_model, "--data", qa_files[1], "--output", result_file,
                               "--max-new-tokens", 4], capsys)
    assert code == 0 and "accuracy" in stdout
    result = json.loads(result_file.read_text())
    assert result["n"] == 4 and 0.0 <= result["accuracy"] <= 1.0
    code, stdout, _ = run_cli(["eval", "--model", tiny_model, "--data", qa_files[1], "--shots", 2,
                               "--shots-from", qa_files[0], "--max-new-tokens", 4], capsys)
    assert code == 0 and "2-shot" in stdout


def test_eval_accepts_a_lora_run_folder(tiny_model, qa_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(train_args(tiny_model, qa_files[0], out, "lora"), capsys)[0] == 0
    code, stdout, _ = run_cli(["eval", "--model", out, "--data", qa_files[1], "--max-new-tokens", 4], capsys)
    assert code == 0 and "accuracy" in stdout


def test_existing_run_is_not_overwritten(tiny_model, qa_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(train_args(tiny_model, qa_files[0], out, "lora"), capsys)[0] == 0
    code, _, err = run_cli(train_args(tiny_model, qa_files[0], out, "lora"), capsys)
    assert code == 2 and "--overwrite" in err


@pytest.fixture()
def bad_inputs(tmp_path, tiny_model, qa_files):
    malformed = write_jsonl(tmp_path / "bad.jsonl", [chat("q", "a"), "{not json", chat("q", "a")])
    no_assistant = write_jsonl(tmp_path / "noasst.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    yaml_bad = tmp_path / "bad.yaml"
    yaml_bad.write_text(f"model: {tiny_model}\ndata: {qa_files[0]}\noutput: {tmp_path / 'o'}\nlearning_rate: 1e-4\n")
    base = ["train", "--model", tiny_model, "--output", tmp_path / "o"]
    return {
        "missing file": (base + ["--data", tmp_path / "nope.jsonl"], "not found"),
        "malformed line": (base + ["--data", malformed], "bad.jsonl:2"),
        "no assistant turn": (base + ["--data", no_assistant], "noasst.jsonl:1"),
        "unknown alias": (["train", "--model", "smollm9-tiny", "--data", qa_files[0], "--output", tmp_path / "o"],
                          "smollm2-135m-instruct"),
        "unknown config key": (["train", yaml_bad], "learning_rate"),
        "bad method": (base + ["--data", qa_files[0], "--method", "magic"], "invalid choice"),
    }


@pytest.mark.parametrize("case", ["missing file", "malformed line", "no assistant turn", "unknown alias",
                                  "unknown config key", "bad method"])
def test_user_errors_give_one_clear_line(case, bad_inputs, capsys):
    args, expected = bad_inputs[case]
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own validation
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_unknown_key_suggests_the_closest(tiny_model, qa_files, tmp_path, capsys):
    code, _, err = run_cli(["train", "--model", tiny_model, "--data", qa_files[0], "--output", tmp_path / "o",
                            "lora.rank=8"], capsys)
    assert code == 2 and "`lora.rank`" in err and "valid keys here: r, alpha" in err
    code, _, err = run_cli(["train", "--model", tiny_model, "--data", qa_files[0], "--output", tmp_path / "o",
                            "epoch=2"], capsys)
    assert code == 2 and "did you mean `epochs`" in err


def test_console_script_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finesmith.cli", "eval", "--model", "no-such-alias",
                           "--data", str(tmp_path / "x.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
