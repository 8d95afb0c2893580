"""The loop around the step: packing, checkpoints and exact resume, stop signals, bad numbers,
evaluation with samples and early stopping, auto settings, early failures."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from conftest import QA
from finesmith.cli import EXIT_PREEMPTED
from finesmith.cli import main as cli_main
from finesmith.config import TrainConfig
from finesmith.data.formats import Example
from finesmith.data.pack import pack_bins, packing_efficiency
from finesmith.data.tokenize import tokenize_examples
from finesmith.model.methods import apply_method, load_base_model
from finesmith.train.auto import auto_batch_size, auto_epochs
from finesmith.train.checkpoint import PAUSE_ENV, list_checkpoints, rotate_checkpoints
from finesmith.train.loop import LoopSettings, Preempted, TrainingDiverged, fit
from finesmith.train.objectives import sft_loss


def main(args):
    return cli_main([str(a) for a in args])


def tokenized(tiny_model, n=12):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = [Example(({"role": "user", "content": q}, {"role": "assistant", "content": a}), f"t:{i}")
                for i, (q, a) in enumerate(QA[:n])]
    return tokenize_examples(tokenizer, examples, max_length=128)[0]


def lora_model(tiny_model):
    # LoRA dropout draws random numbers every step, so exact resume needs the RNG states.
    config = TrainConfig(model=tiny_model, data="-", output="-", method="lora")
    config.lora.r, config.lora.dropout = 4, 0.1
    torch.manual_seed(0)  # the same LoRA initialisation for every run of a test
    return apply_method(load_base_model(config, "cpu"), config)


SETTINGS = dict(lr=5e-3, total_steps=6, batch_size=3, grad_accum=2, warmup_steps=2, log_every=1, seed=3)


def test_best_fit_decreasing_bins_respect_the_budget():
    lengths = [70, 10, 60, 30, 40, 50, 5, 90, 20, 25]
    bins = pack_bins(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 4  # 400 tokens: the lower bound, reached
    assert packing_efficiency(lengths, bins, 100) == 1.0


def test_packed_training_run_reports_efficiency(tiny_model, qa_files, tmp_path, capsys):
    out = tmp_path / "packed"
    code = main(["train", "--model", tiny_model, "--data", qa_files[0], "--output", out, "--epochs", "1",
                 "packing=true", "pack_tokens=128"])
    stdout = capsys.readouterr().out
    assert code == 0
    lengths = [len(ex) for ex in tokenized(tiny_model)]
    bins = pack_bins(lengths, 128)
    assert f"into {len(bins)} bins of ≤128 tokens" in stdout and "efficiency" in stdout
    assert f"{len(bins)} optimizer steps" in stdout  # one bin per micro-batch, one epoch


def test_rotation_orders_by_step_number(tmp_path):
    for step, loss in [(9, 0.5), (10, 0.9), (99, None), (100, 0.8)]:
        folder = tmp_path / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, "eval_loss": loss}))
    (tmp_path / "checkpoints" / ".tmp-step-101-x").mkdir()  # an unfinished write is not a checkpoint
    assert [s for s, _ in list_checkpoints(tmp_path)] == [9, 10, 99, 100]
    rotate_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [99, 100]  # newest two (the best lives in best/)


def interrupt_after(calls: int):
    """An objective that sends this process SIGTERM during micro-batch number `calls`."""
    count = {"n": 0}

    def objective(model, batch):
        count["n"] += 1
        if count["n"] == calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return sft_loss(model, batch)

    return objective


def test_resume_after_a_stop_signal_is_bitwise_identical(tiny_model, tmp_path):
    data = tokenized(tiny_model)
    settings = LoopSettings(**SETTINGS, save_every=100)
    whole_model = lora_model(tiny_model)
    whole = fit(whole_model, data, settings, tmp_path / "whole")
    with pytest.raises(Preempted) as stopped:
        fit(lora_model(tiny_model), data, settings, tmp_path / "cut", objective=interrupt_after(5))
    assert stopped.value.step == 3  # the signal came during step 3; the step finished, then saved
    resumed_model = lora_model(tiny_model)
    resumed = fit(resumed_model, data, settings, tmp_path / "cut", resume=True)
    assert resumed.step_losses == whole.step_losses[3:]  # bitwise, not approximately
    for (name, a), (_, b) in zip(whole_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name
    logged = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def nan_objective(bad_calls: set[int]):
    count = {"n": 0}

    def objective(model, batch):
        count["n"] += 1
        loss, n = sft_loss(model, batch)
        return (loss * float("nan") if count["n"] in bad_calls else loss), n

    return objective


def test_non_finite_step_is_skipped_and_weights_stay(tiny_model, tmp_path):
    model = lora_model(tiny_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = LoopSettings(lr=1e-2, total_steps=1, batch_size=4, log_every=1)
    result = fit(model, tokenized(tiny_model), settings, tmp_path, objective=nan_objective({1}))
    assert result.skipped_steps == 1
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert '"skipped": "non-finite loss"' in (tmp_path / "metrics.jsonl").read_text()


def test_consecutive_non_finite_steps_stop_the_run_naming_the_checkpoint(tiny_model, tmp_path):
    settings = LoopSettings(lr=1e-2, total_steps=10, batch_size=4, log_every=1, save_every=2, max_bad_steps=3)
    # Skipped steps leave the weights as they were, so the step-4 checkpoint holds step-2 weights
    # (and a data position past the bad batches).
    with pytest.raises(TrainingDiverged, match=r"step 5: 3 steps in a row.*last good checkpoint: .*step-4\)"):
        fit(lora_model(tiny_model), tokenized(tiny_model), settings, tmp_path, objective=nan_objective({3, 4, 5}))


def test_eval_samples_and_early_stopping(tiny_model, tmp_path):
    data = tokenized(tiny_model)
    evals = {"n": 0}

    def worsening(model, batch):  # eval loss that only rises, so patience runs out
        loss, n = sft_loss(model, batch)
        if not model.training:
            evals["n"] += 1
            loss = loss * evals["n"]
        return loss, n

    sampled = []
    settings = LoopSettings(lr=1e-3, total_steps=20, batch_size=4, eval_every=2, early_stopping_patience=2,
                            save_every=2, keep_checkpoints=1)
    result = fit(lora_model(tiny_model), data, settings, tmp_path, eval_set=data[:4], objective=worsening,
                 on_eval=lambda model, step: sampled.append(step))
    assert result.stopped_early and result.steps == 6  # evals at 2 (best), 4, 6 (two without improvement)
    assert sampled == [2, 4, 6]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6]  # newest (the early stop); the best is kept apart
    assert result.restored_best and result.best_step == 2


def test_samples_file_and_auto_settings_in_resolved_config(tiny_model, qa_files, tmp_path, capsys):
    out = tmp_path / "auto"
    code = main(["train", "--model", tiny_model, "--data", qa_files[0], "--eval-data", qa_files[1], "--output", out,
                 "--epochs", "auto", "--batch-size", "auto", "--lr", "auto", "--max-steps", "2",
                 "sample_prompts=2", "sample_max_new_tokens=3", "eval_every=1"])
    stdout = capsys.readouterr().out
    assert code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["epochs"], saved["batch_size"], saved["lr"]) == (auto_epochs(12), auto_batch_size(12), 2e-4)
    assert "auto settings: epochs 9, batch_size 4, lr 0.0002" in stdout
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["index"]) for s in samples] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert samples[0]["prompt"] == QA[0][0] and isinstance(samples[0]["output"], str)


def test_auto_rules():
    assert (auto_epochs(12), auto_epochs(300), auto_epochs(20_000)) == (9, 3, 1)
    assert (auto_batch_size(12), auto_batch_size(1000), auto_batch_size(100_000)) == (4, 16, 32)


@pytest.mark.parametrize(("override", "message"), [
    ("optimizer=adamw_8bit", "needs a CUDA GPU.*optimizer=adamw"),
    ("report_to=[tensorboard]", "tensorboard is not installed; run `pip install tensorboard`"),
])
def test_unavailable_options_fail_before_loading(qa_files, tmp_path, capsys, override, message):
    code = main(["train", "--model", "no/such-model", "--data", qa_files[0], "--output", tmp_path / "x", override])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def run_in_subprocess(tiny_model, train, output, env=None):
    args = [sys.executable, "-m", "finesmith.cli", "train", "--model", tiny_model, "--data", train,
            "--output", str(output), "--max-steps", "100000", "--batch-size", "2", "log_every=1", "save_every=2"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_for(condition, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def resume_args(tiny_model, train, output, max_steps):
    return ["train", "--model", tiny_model, "--data", train, "--output", output, "--max-steps", max_steps,
            "--batch-size", "2", "log_every=1", "save_every=2", "--resume", "--extend"]


def test_sigterm_leaves_a_resumable_checkpoint(tiny_model, qa_files, tmp_path, capsys):
    out = tmp_path / "run"
    process = run_in_subprocess(tiny_model, qa_files[0], out)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_PREEMPTED, err
    assert "plus --resume" in err
    step, _ = list_checkpoints(out)[-1]
    assert step >= 3
    assert main(resume_args(tiny_model, qa_files[0], out, step + 2)) == 0
    assert list_checkpoints(out)[-1][0] == step + 2
    assert "resuming from" in capsys.readouterr().out


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tiny_model, qa_files, tmp_path, capsys):
    out = tmp_path / "run"
    process = run_in_subprocess(tiny_model, qa_files[0], out, env={PAUSE_ENV: "4"})
    root = out / "checkpoints"
    wait_for(lambda: any((p / "trainer_state.json").is_file() for p in root.glob(".tmp-step-4")), process)
    process.kill()
    process.communicate(timeout=60)
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert main(resume_args(tiny_model, qa_files[0], out, 5)) == 0
    assert "checkpoints/step-2" in capsys.readouterr().out.replace("\n", "")  # rich wraps long paths
    assert [s for s, _ in list_checkpoints(out)] == [4, 5]
    assert not list(root.glob(".tmp-*"))


def test_resume_refuses_changed_settings_and_missing_checkpoints(tiny_model, qa_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model, "--data", qa_files[0], "--output", out, "--max-steps", "2"]) == 0
    assert main(["train", "--model", tiny_model, "--data", qa_files[0], "--output", out, "--max-steps", "3",
                 "--seed", "7", "--resume", "--extend"]) == 2
    err = capsys.readouterr().err
    assert "settings differ" in err and "seed: 42 -> 7" in err
    shutil.rmtree(out / "checkpoints")
    assert main(["train", "--model", tiny_model, "--data", qa_files[0], "--output", out, "--max-steps", "3",
                 "--resume", "--extend"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
