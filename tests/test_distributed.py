"""Several processes, one run: 2 ranks (gloo on CPU, NCCL on GPUs) equal 1 rank at the same
global batch, a stop signal ends every rank with one checkpoint, and a checkpoint resumes
exactly, on the same or another number of processes. Everything goes through the CLI, as a
user runs it (`finesmith train --nproc-per-node 2` starts torchrun)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import QA, chat, write_jsonl
from finesmith.cli import EXIT_PREEMPTED
from finesmith.cli import main as cli_main
from finesmith.train.loop import STOP_AFTER_ENV

TIMEOUT = 300  # per launch; a hung rank fails the test instead of the suite


def train_args(tiny_model, data, output, *extra):
    return ["train", "--model", tiny_model, "--data", data, "--output", str(output), "--max-steps", "4",
            "--batch-size", "4", "--lr", "1e-2", "log_every=1", *extra]


def launch(args, stop_after=None):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", STOP_AFTER_ENV)}
    if stop_after:
        env[STOP_AFTER_ENV] = str(stop_after)
    return subprocess.run([sys.executable, "-m", "finesmith", *args, "--nproc-per-node", "2"], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def in_process(args, monkeypatch, stop_after=None):
    with monkeypatch.context() as m:
        if stop_after:
            m.setenv(STOP_AFTER_ENV, str(stop_after))
        return cli_main(args)


def weights(output):
    return load_file(output / "adapter_model.safetensors")


def metrics(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        # the same sums in another order, through 4 Adam steps: float32 rounding, not a different computation
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-5)


def test_two_ranks_equal_one_and_resume_on_any_world_size(tiny_model, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA * 2])
    one, two = tmp_path / "one", tmp_path / "two"
    assert in_process(train_args(tiny_model, data, one), monkeypatch) == 0

    # 2 ranks × 2 examples = 1 rank × 4 examples: the same losses, gradient norms and weights
    done = launch(train_args(tiny_model, data, two))
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert_close(weights(two), weights(one))
    record = json.loads((two / "run.json").read_text())
    assert record["state"] == "finished" and record["world_size"] == 2
    assert cli_main(["eval", "--model", str(two), "--data", data, "--max-new-tokens", "2"]) == 0  # an ordinary run

    # a stop during step 2 ends both ranks after it, with one checkpoint, written once
    cut = tmp_path / "cut"
    done = launch(train_args(tiny_model, data, cut), stop_after=2)
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-2"]
    assert json.loads((cut / "run.json").read_text())["state"] == "preempted"
    other = tmp_path / "cut-then-one-rank"
    shutil.copytree(cut, other)

    # exact resume on the same world size: bitwise what the uninterrupted 2-rank run trained
    done = launch(train_args(tiny_model, data, cut, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, straight = weights(cut), weights(two)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert [m["loss"] for m in metrics(cut)] == [m["loss"] for m in metrics(two)]

    # 2 ranks -> 1 rank: the checkpoint's place is in global micro-batches (1 -> 2 ranks: the FSDP2 test below)
    assert in_process(train_args(tiny_model, data, other, "--resume"), monkeypatch) == 0
    assert_close(weights(other), weights(one))


def test_settings_that_cannot_be_split_are_refused_before_launching(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA])
    code = cli_main(["train", "--model", tiny_model, "--data", data, "--output", str(tmp_path / "x"),
                     "--batch-size", "1", "--nproc-per-node", "2", "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "batch_size 1 is smaller than the 2 processes" in err and "Traceback" not in err


def test_fsdp_full_fine_tuning_equals_one_rank_and_resumes_across_world_sizes(tiny_model, tmp_path, monkeypatch):
    """Full fine-tuning shards with FSDP2 (parallelism: auto). 13 examples in micro-batches of 4
    end the epoch (step 4) with a micro-batch of 1, so one rank's share is empty there and it
    must still take part in every collective."""
    data = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA + QA[:1]])
    full = ("--method", "full", "--lr", "1e-3")
    one = tmp_path / "one"
    assert in_process(train_args(tiny_model, data, one, *full), monkeypatch) == 0

    # 2 FSDP2 ranks, stopped after step 2: the same losses and gradient norms as 1 rank, one
    # sharded checkpoint (one file per rank), written once
    cut = tmp_path / "cut"
    done = launch(train_args(tiny_model, data, cut, *full), stop_after=2)
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
    assert json.loads((cut / "run.json").read_text())["parallelism"] == "fsdp"
    for a, b in zip(metrics(one)[:2], metrics(cut), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-2"]
    assert sorted(p.name for p in (cut / "checkpoints/step-2/sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    # 2 ranks -> 1 process: the shards are put back together, and training continues as if never cut
    assert in_process(train_args(tiny_model, data, cut, *full, "--resume"), monkeypatch) == 0
    assert [m["loss"] for m in metrics(cut)] == pytest.approx([m["loss"] for m in metrics(one)], rel=1e-5)
    assert_close(load_file(cut / "model.safetensors"), load_file(one / "model.safetensors"))

    # 1 process -> 2 FSDP2 ranks: the checkpoint is sharded on load; the full weights are gathered once at the end
    single_cut = tmp_path / "single-cut"
    assert in_process(train_args(tiny_model, data, single_cut, *full), monkeypatch, stop_after=2) == EXIT_PREEMPTED
    done = launch(train_args(tiny_model, data, single_cut, *full, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [m["loss"] for m in metrics(single_cut)] == pytest.approx([m["loss"] for m in metrics(one)], rel=1e-5)
    assert_close(load_file(single_cut / "model.safetensors"), load_file(one / "model.safetensors"))
    assert cli_main(["eval", "--model", str(single_cut), "--data", data, "--max-new-tokens", "2"]) == 0
