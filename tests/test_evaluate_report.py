"""`finesmith eval` tasks and `finesmith compare`: the result JSON and the report files."""

from __future__ import annotations

import json

from conftest import chat, write_jsonl
from finesmith.cli import main

TICKETS = [("refund my card please", "billing"), ("cannot log in at all", "account"),
           ("parcel arrived damaged", "shipping"), ("charged twice this month", "billing"),
           ("password reset mail missing", "account"), ("courier lost my box", "shipping"),
           ("invoice amount is wrong", "billing"), ("two-factor code rejected", "account")]


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compare_writes_markdown_and_self_contained_html(tiny_model, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(t, label) for t, label in TICKETS * 2])
    held_out = write_jsonl(tmp_path / "heldout.jsonl", [chat(t + "!", label) for t, label in TICKETS])
    run_dir = tmp_path / "run"
    code, _, err = run(["train", "--model", tiny_model, "--data", train, "--eval-data", held_out, "--output", run_dir,
                        "--max-steps", 2, "--batch-size", 4, "log_every=1", "eval_every=1", "lora.r=2"], capsys)
    assert code == 0, err
    report = tmp_path / "report"
    code, stdout, err = run(["compare", "--data", held_out, "--base", tiny_model, "--shots", "1,2", "--shots-from",
                             train, "--max-new-tokens", 3, run_dir, "--output", report], capsys)
    assert code == 0, err
    markdown = (report / "report.md").read_text()
    page = (report / "report.html").read_text()
    assert "| approach | task | n | shots | accuracy (generated)" in markdown
    for name in ("base · zero-shot", "base · 1-shot (balanced)", "base · 2-shot (balanced)", f"fine-tuned · {run_dir}"):
        assert name in markdown and name in page
    # the verdict comes first and is a paired test against the best prompting result
    assert markdown.index("## Verdict") < markdown.index("## Results")
    verdict = markdown.split("## Verdict")[1].split("\n\n")[1]
    assert f"fine-tuned · {run_dir}" in verdict and "McNemar exact test" in verdict and "95% CI" in verdict
    assert "## Paired comparisons (same examples)" in markdown
    assert "%]" in markdown.split("## Results")[1].split("##")[0]  # accuracies carry their interval
    assert "calibration error (ECE)" in markdown
    assert "the same 2 balanced shots before every query, in this order:" in markdown
    assert "![Training and eval loss](loss_curves.png)" in markdown and (report / "loss_curves.png").stat().st_size > 1000
    assert page.count("src='data:image/png;base64,") == 2 and "<table>" in page
    assert "<details><summary>Per-class metrics" in page and "Sample outputs" in page
    results = sorted(p.name for p in (report / "results").iterdir())
    assert len(results) == 4
    zero = json.loads((report / "results" / "base-zero-shot.json").read_text())
    assert zero["task"] == "classification" and zero["n"] == 8 and "accuracy" in zero


def test_compare_refuses_a_folder_that_is_not_a_run(tiny_model, tmp_path, capsys):
    held_out = write_jsonl(tmp_path / "heldout.jsonl", [chat(t, label) for t, label in TICKETS])
    code, _, err = run(["compare", "--data", held_out, "--base", tiny_model, tmp_path, "--output", tmp_path / "r"], capsys)
    assert code == 2 and "not a finesmith run" in err and "Traceback" not in err


def test_eval_generation_and_perplexity_results(tiny_model, tmp_path, capsys):
    held_out = write_jsonl(tmp_path / "qa.jsonl", [chat(f"question {i}", f"a different answer {i}") for i in range(4)])
    out = tmp_path / "gen.json"
    code, stdout, err = run(["eval", "--model", tiny_model, "--data", held_out, "--max-new-tokens", 3,
                             "--output", out], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["task"] == "generation" and result["n"] == 4 and 0 <= result["accuracy"] <= 1
    assert set(result["metrics"]["generate"]) == {"exact_match", "token_f1", "rouge_l", "chrf", "exact_match_ci",
                                                  "token_f1_ci"}
    texts = write_jsonl(tmp_path / "text.jsonl", [{"text": "the quick brown fox jumps"}, {"text": "over the lazy dog"}])
    out = tmp_path / "ppl.json"
    code, stdout, err = run(["eval", "--model", tiny_model, "--data", texts, "--output", out], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["task"] == "perplexity" and result["accuracy"] is None
    # a random model over a ~2k-token vocabulary is close to uniform
    assert 100 < result["metrics"]["perplexity"]["perplexity"] < 20000
    code, _, err = run(["eval", "--model", tiny_model, "--data", texts, "--task", "classification"], capsys)
    assert code == 2 and "perplexity" in err
