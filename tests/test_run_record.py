"""The run record and the seams between commands, driven as a user meets them.

A run is trained, then evaluated, exported, chatted with and resumed in fresh processes;
resume refuses what it cannot continue exactly; early stopping ends with the best weights;
`--overwrite` never deletes a folder finesmith did not write; staged runs dry-run and resume.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import QA, chat, make_tiny_model, write_jsonl
from test_domain import prose

from finesmith.cli import main
from finesmith.run import load_run
from finesmith.train.checkpoint import list_checkpoints
from finesmith.train.optim import schedule_factor


def cli(*args: object, cwd: Path | None = None, stdin: str | None = None, timeout: float = 240):
    """`finesmith ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "finesmith.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, input=stdin, timeout=timeout)


def start_cli(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "finesmith.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def metric_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_train_writes_a_record_every_reader_uses(tiny_model, qa_files, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model, "--data", qa_files[0], "--eval-data", qa_files[1],
                 "--output", str(out), "--max-steps", "3", "--batch-size", "4"]) == 0
    record = load_run(out).record
    assert record.kind == "run" and record.state == "finished" and record.resumable
    assert record.base_model["spec"] == str(Path(tiny_model).resolve()) and len(record.base_model["fingerprint"]) == 16
    assert record.tokenizer["template_source"] == "model" and record.tokenizer["added_tokens"] == []
    assert record.method == {"name": "lora", "adapter": True, "layout": "packed", "mergeable": True,
                             "trained_in_full": []}
    assert record.data["train"]["examples"] == len(QA) and len(record.data["train"]["tokens_sha256"]) == 64
    assert record.data["eval"]["examples"] == 4
    assert record.schedule["total_steps"] == 3 and record.schedule["extensions"] == []
    assert {"finesmith", "torch", "transformers", "peft"} <= set(record.versions)
    assert record.result["steps"] == 3 and record.result["eval_loss"] is not None
    # A folder with an adapter but no record is not a run: one line, no traceback.
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
    assert "without a finesmith run record" in one_line_error(cli("eval", "--model", stray, "--data", qa_files[1]))


def test_a_template_less_adapter_run_evaluates_exports_and_chats_in_fresh_processes(qa_files, tmp_path):
    base = make_tiny_model(tmp_path / "base", family="llama3")
    (base / "chat_template.jinja").unlink()  # a base model: no chat template, no ChatML tokens
    out = tmp_path / "run"
    done = cli("train", "--model", base, "--data", qa_files[0], "--output", out, "--max-steps", "2", "--method", "lora")
    assert done.returncode == 0, done.stderr
    record = load_run(out).record
    assert record.tokenizer["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert record.tokenizer["vocab_size"] > 600 and record.tokenizer["template_source"] == "chatml"
    assert record.method["trained_in_full"] == ["embed_tokens", "lm_head"]
    evaluated = cli("eval", "--model", out, "--data", qa_files[1], "--max-new-tokens", "3", "--output",
                    tmp_path / "eval.json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 4
    exported = cli("export", out, "--format", "hf", "--output", tmp_path / "hf", "--verify")
    assert exported.returncode == 0, exported.stderr + exported.stdout
    talked = cli("chat", out, "--max-new-tokens", "3", stdin="What is 2 plus 2?\n/exit\n")
    assert talked.returncode == 0, talked.stderr
    # The base model itself, which training accepted, is accepted for evaluation too.
    plain = cli("eval", "--model", base, "--data", qa_files[1], "--max-new-tokens", "2")
    assert plain.returncode == 0, plain.stderr
    # Resume compares the settings the user gave, not the modules the new tokens added.
    resumed = cli("train", "--model", base, "--data", qa_files[0], "--output", out, "--max-steps", "3",
                  "--method", "lora", "--resume", "--extend")
    assert resumed.returncode == 0, resumed.stderr
    assert load_run(out).record.result["steps"] == 3


def test_resume_after_preemption_refuses_what_it_cannot_continue_exactly(tiny_model, qa_files, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", tiny_model, "--data", qa_files[0], "--output", out, "--batch-size", "2",
            "log_every=1", "save_every=2"]
    process = start_cli(*args, "--max-steps", "200")
    wait_for(lambda: (out / "metrics.jsonl").is_file() and len(metric_lines(out)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 75, err
    assert load_run(out).record.state == "preempted"
    done_steps = list_checkpoints(out)[-1][0]

    horizon = one_line_error(cli(*args, "--max-steps", "150", "--resume"))
    assert "schedule horizon changed (200 -> 150 steps" in horizon and "--extend" in horizon
    changed = tmp_path / "changed.jsonl"
    changed.write_text(Path(qa_files[0]).read_text() + json.dumps(chat("One more?", "yes")) + "\n")
    data_args = [a if a != qa_files[0] else changed for a in args]
    assert "the train data changed" in one_line_error(cli(*data_args, "--max-steps", "200", "--resume"))
    other = make_tiny_model(tmp_path / "other-model", seed=1)
    model_args = [a if a != tiny_model else other for a in args]
    assert "base model changed" in one_line_error(cli(*model_args, "--max-steps", "200", "--resume"))

    new_total = done_steps + 3
    resumed = cli(*args, "--max-steps", new_total, "--resume", "--extend")
    assert resumed.returncode == 0, resumed.stderr
    record = load_run(out).record
    assert record.state == "finished" and record.schedule["extensions"] == [[done_steps, new_total]]
    assert record.schedule["planned_steps"] == 200 and record.result["steps"] == new_total
    # The extended schedule: a new cosine from the rate at the resume step down to the floor.
    lrs = {m["step"]: m["lr"] for m in metric_lines(out) if "lr" in m}
    factor = schedule_factor(200, math.ceil(0.05 * 200), extensions=[(done_steps, new_total)])
    for step in range(done_steps + 1, new_total + 1):
        assert lrs[step] == pytest.approx(2e-4 * factor(step), rel=1e-6)
    assert lrs[new_total] == pytest.approx(2e-4 * 0.1, rel=1e-6)
    finished = one_line_error(cli(*args, "--max-steps", new_total, "--resume"))
    assert "already finished" in finished


def test_early_stopping_ends_with_the_best_weights(tiny_model, tmp_path, capsys):
    from safetensors.torch import load_file

    # Training on one answer per question and evaluating on another makes eval loss rise
    # once the training answers are learnt, so patience runs out well before max_steps.
    train = write_jsonl(tmp_path / "train.jsonl", [chat(q, "alpha") for q, _ in QA])
    held = write_jsonl(tmp_path / "eval.jsonl", [chat(q, "omega zulu") for q, _ in QA[:4]])
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model, "--data", train, "--eval-data", held, "--output", str(out),
                 "--method", "full", "--max-steps", "40", "--batch-size", "4", "--lr", "3e-3", "eval_every=1",
                 "early_stopping_patience=2", "warmup_ratio=0"]) == 0
    printed = capsys.readouterr().out
    evals = {m["step"]: m["eval_loss"] for m in metric_lines(out) if "eval_loss" in m}
    best_step = min(evals, key=evals.get)
    record = load_run(out).record
    assert record.result["stopped_early"] and record.result["steps"] < 40
    assert record.result["best_step"] == best_step < record.result["steps"]
    assert record.result["restored_best"] and not record.resumable
    assert f"best weights: step {best_step}" in printed
    restored = [m for m in metric_lines(out) if "restored_best_step" in m]
    assert restored == [{"step": record.result["steps"], "restored_best_step": best_step,
                         "best_eval_loss": round(evals[best_step], 5)}]
    final, best = load_file(out / "model.safetensors"), load_file(out / "checkpoints" / "best" / "trainable.safetensors")
    assert all((final[name] == value).all() for name, value in best.items() if name in final)
    final_checkpoint = list_checkpoints(out)[-1][1]
    assert not (final_checkpoint / "state.pt").exists()  # rewound weights carry no optimizer state
    assert "cannot be continued" in one_line_error(cli("train", "--model", tiny_model, "--data", train, "--output",
                                                       out, "--max-steps", "50", "--resume", "--extend"))
    # A new process evaluates the saved (best) weights: its loss on the eval file is the best eval loss.
    ppl = cli("eval", "--model", out, "--data", held, "--task", "perplexity", "--output", tmp_path / "ppl.json")
    assert ppl.returncode == 0, ppl.stderr


def test_overwrite_replaces_only_what_finesmith_wrote(tiny_model, qa_files, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("my work")
    data = write_jsonl(project / "train.jsonl", [chat(q, a) for q, a in QA])
    refused = cli("train", "--model", tiny_model, "--data", data, "--output", ".", "--max-steps", "1", "--overwrite",
                  cwd=project)
    assert "was not written by finesmith" in one_line_error(refused)
    assert (project / "notes.txt").read_text() == "my work"
    run = tmp_path / "run"
    assert main(["train", "--model", tiny_model, "--data", data, "--output", str(run), "--max-steps", "1"]) == 0
    exported = cli("export", run, "--format", "adapter", "--output", project, "--overwrite")
    assert "was not written by finesmith" in one_line_error(exported)
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt", "train.jsonl"]
    # A run or export folder is replaced when asked, and only then.
    assert "--overwrite" in one_line_error(cli("train", "--model", tiny_model, "--data", data, "--output", run,
                                               "--max-steps", "1"))
    assert main(["train", "--model", tiny_model, "--data", data, "--output", str(run), "--max-steps", "2",
                 "--overwrite"]) == 0
    assert load_run(run).record.result["steps"] == 2
    assert cli("export", run, "--format", "adapter", "--output", tmp_path / "exp").returncode == 0
    assert (tmp_path / "exp" / "export.json").is_file()
    again = cli("export", run, "--format", "adapter", "--output", tmp_path / "exp", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert "run folder" in one_line_error(cli("export", run, "--format", "adapter", "--output", run, "--overwrite"))


def staged_config(tiny_model: str, tmp_path: Path, sft_steps: int) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for seed in range(14):  # 10 train + 4 eval documents, none a near duplicate of another
        (corpus / f"{seed}.md").write_text(f"Document {seed} about valves. {prose(seed, 40)}", encoding="utf-8")
    train = write_jsonl(tmp_path / "qa.jsonl", [chat(q, a) for q, a in QA])
    config = {"model": tiny_model, "output": str(tmp_path / "run"), "method": "lora", "max_length": 64,
              "batch_size": 4, "log_every": 1, "lora": {"r": 4, "alpha": 8},
              "stages": [{"name": "pretrain", "objective": "cpt", "data": str(corpus), "max_steps": 2,
                          "corpus": {"eval_fraction": 0.25, "min_words": 10}},
                         {"name": "sft", "data": train, "max_steps": sft_steps, "save_every": 2}]}
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_staged_runs_dry_run_without_training_and_resume_after_preemption(tiny_model, tmp_path):
    path = staged_config(tiny_model, tmp_path, sft_steps=400)
    out = tmp_path / "run"
    dry = cli("train", path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "stage 2/2: sft" in dry.stdout and "dry run" in dry.stdout
    assert not out.exists()  # nothing trained, nothing written

    process = start_cli("train", path)
    metrics = out / "sft" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 75 and "--resume" in err, err
    assert load_run(out).record.state == "preempted" and load_run(out / "sft").record.state == "preempted"
    pretrain_record = (out / "pretrain" / "run.json").read_text()

    # how far the stage got before the signal took effect depends on the machine's speed
    stopped_at = load_run(out / "sft").record.result["steps"]
    target = stopped_at + 3
    resumed = cli("train", path, f"stages.sft.max_steps={target}", "--resume", "--extend")
    assert resumed.returncode == 0, resumed.stderr
    assert "pretrain already finished; skipped" in resumed.stdout.replace("\n", " ")
    assert "resuming" in resumed.stdout
    assert (out / "pretrain" / "run.json").read_text() == pretrain_record  # the finished stage was not retrained
    report = json.loads((out / "stages.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["pretrain", "sft"] and all(s["done"] for s in report["stages"])
    assert load_run(out).record.state == "finished" and load_run(out / "sft").record.result["steps"] == target
    assert "already finished" in one_line_error(cli("train", path, "--resume"))
