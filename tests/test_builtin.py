"""A short run on the real built-in SmolLM2-135M-Instruct: the whole path, for real."""

from __future__ import annotations

import json

import pytest

from finesmith.cli import main
from finesmith.demo import demo_data


@pytest.mark.builtin
def test_lora_steps_on_the_builtin_model_lower_the_loss(tmp_path, capsys):
    train_file, eval_file = demo_data()
    small = tmp_path / "train.jsonl"
    small.write_text("".join(open(train_file).readlines()[:16]))
    out = tmp_path / "run"
    code = main(["train", "--model", "smollm2-135m-instruct", "--data", str(small), "--method", "lora",
                 "--output", str(out), "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3",
                 "--max-length", "128", "log_every=1"])
    assert code == 0, capsys.readouterr().err
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    code = main(["eval", "--model", str(out), "--data", eval_file, "--limit", "4", "--max-new-tokens", "8"])
    assert code == 0 and "accuracy" in capsys.readouterr().out
