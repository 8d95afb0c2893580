"""`finesmith data check`, the tokenized-data cache, `data scan`, and the checks `train` runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import ASSETS, QA, chat, make_tiny_model, write_jsonl
from finesmith import pipeline
from finesmith.cli import main
from finesmith.config import load_config
from finesmith.data.formats import Example, TextExample
from finesmith.data.show import masked_text
from finesmith.core.templates import CHATML_TOKENS, ensure_chat_template
from finesmith.data.tokenize import rendered_lengths, text_tokens, text_windows, tokens_and_mask
from finesmith.data.validate import check_data

U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
CRAFTED = {  # line -> (row as written, the problem data check must name)
    2: ("{not json", "invalid JSON"),
    3: ("[1, 2]", "expected a JSON object"),
    4: ({"messages": []}, "`messages` is missing or empty"),
    5: ({"prompt_x": 1}, "unrecognised example"),
    6: ({"messages": [U, {"role": "robot", "content": "x"}, A]}, "unknown role 'robot'"),
    7: ({"messages": [U, {"role": "assistant"}]}, "has no text `content`"),
    8: ({"messages": [U, U, A]}, "two user turns in a row"),
    9: ({"messages": [A, U, A]}, "starts with the assistant"),
    10: ({"messages": [{"role": "system", "content": "s"}, U]}, "no assistant turn"),
    11: ({"messages": [U, A, U]}, "the last message must be from the assistant"),
    12: ({"messages": [U, {"role": "assistant", "content": " "}]}, "empty assistant content"),
}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own tokenized-data cache, so no result leaks between tests."""
    monkeypatch.setenv("FINESMITH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer-chatml")


def crafted_file(tmp_path: Path) -> str:
    lines = ["\ufeff" + json.dumps(chat("ok", "fine"))] + [
        row if isinstance(row, str) else json.dumps(row) for row, _ in CRAFTED.values()]
    path = tmp_path / "crafted.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8") + b"\n" + b'{"text": "caf\xe9"}\n')
    return str(path)


def test_check_reports_every_problem_with_file_and_line(tmp_path, tokenizer):
    path = crafted_file(tmp_path)
    report = check_data(path, tokenizer, max_length=64)
    for line, (_, reason) in CRAFTED.items():
        assert any(e.startswith(f"{path}:{line}: ") and reason in e for e in report.errors), (line, reason)
    offset = len("\n".join(["\ufeff" + json.dumps(chat("ok", "fine"))] + [
        r if isinstance(r, str) else json.dumps(r) for r, _ in CRAFTED.values()]).encode()) + 1 + len(b'{"text": "caf')
    assert f"{path}:13: not UTF-8 (byte offset {offset})" in " ".join(report.errors)
    assert any(w.startswith(f"{path}:1: ") and "byte-order mark" in w for w in report.warnings)
    assert any("only 1 valid examples; at least 10" in e for e in report.errors)
    assert not report.ok


def test_check_counts_lengths_duplicates_overlap_and_size_rules(tmp_path, tokenizer):
    rows = [chat(q, a) for q, a in QA] + [chat(QA[0][0], QA[0][1]), chat("long " * 80, "yes")]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    held_out = write_jsonl(tmp_path / "eval.jsonl", [chat(*QA[3]), chat("new", "one")])
    report = check_data(path, tokenizer, max_length=60, eval_path=held_out)
    expected = rendered_lengths(tokenizer, [Example(tuple(r["messages"]), "x") for r in rows])
    assert expected == [len(tokens_and_mask(tokenizer, r["messages"])[0]) for r in rows]
    assert report.ok and report.examples == 14 and report.turns == 28 and report.tokens == sum(expected)
    assert report.length_summary()["max"] == max(expected) and report.over_length == 1
    assert report.duplicates == 1 and report.overlap == 1
    warnings = " ".join(report.warnings)
    assert f"{path}:1: exact duplicate at {path}:13" in warnings
    assert f"{path}:4: also in the eval data at {held_out}:1" in warnings
    assert "only 14 examples; 50 or more" in warnings and "1 examples are longer than max_length 60" in warnings


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_data_check_cli_exit_codes_and_masks(tmp_path, tiny_model, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [chat(q, a) for q, a in QA])
    code, out, _ = run_cli(["data", "check", good, "--model", tiny_model, "--show", 1], capsys)
    assert code == 0 and "trainable" in out and "What colour is the sky?" in out
    code, out, err = run_cli(["data", "check", crafted_file(tmp_path), "--model", tiny_model], capsys)
    assert code == 2 and "crafted.jsonl:8: message 2: two user turns" in out.replace("\n", " ")
    assert len(err.strip().splitlines()) == 1 and "not trainable" in err


def test_show_highlights_exactly_the_trained_tokens(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello friend"}]
    text = masked_text(tokenizer, Example(tuple(messages), "x"))
    trained = "".join(text.plain[s.start:s.end] for s in text.spans if "green" in str(s.style))
    assert trained == "Hello friend<|im_end|>"


def test_text_examples_train_every_token_in_windows(tokenizer):
    ids = list(range(1, 11))
    windows = text_windows(ids, [False] + [True] * 9, 4, bos=1)
    assert [w for w, _ in windows] == [[1, 2, 3, 4], [1, 5, 6, 7], [1, 8, 9, 10]]
    assert all(m == [False, True, True, True] for _, m in windows)
    ids, mask = text_tokens(tokenizer, "a b c")
    assert rendered_lengths(tokenizer, [TextExample("a b c", "x")]) == [len(ids)] and ids[-1] == tokenizer.eos_token_id
    assert all(mask[1:])


def test_chatml_fallback_adds_tokens_once(tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(ASSETS / "tokenizer-llama3", folder)
    (folder / "chat_template.jinja").unlink()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    notes = []
    size = len(tokenizer)
    assert ensure_chat_template(tokenizer, notes.append) == list(CHATML_TOKENS)
    assert len(tokenizer) == size + 2 and "ChatML" in notes[0]
    ids, mask = tokens_and_mask(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "Yo<|im_end|>"
    assert ensure_chat_template(tokenizer, notes.append) == [] and len(notes) == 1


def base_model_without_template(tmp_path: Path) -> str:
    """A tiny Llama whose tokenizer (Llama-3 family) has no chat template and no ChatML tokens."""
    folder = make_tiny_model(tmp_path / "base-model", family="llama3")
    (folder / "chat_template.jinja").unlink()
    return str(folder)


def test_train_on_a_base_model_resizes_and_trains_new_token_rows(qa_files, tmp_path, capsys, monkeypatch):
    base = base_model_without_template(tmp_path)
    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", "--model", base, "--data", qa_files[0], "--output", out, "--max-steps", 1,
                                 "--method", "lora"], capsys)
    assert code == 0, err
    assert "no chat template" in stdout and "also training embed_tokens" in stdout
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    assert any("embed_tokens" in name for name in saved)
    assert any(t in (out / "tokenizer.json").read_text() for t in CHATML_TOKENS)


def test_tokenized_data_cache_hit_miss_and_invalidation(tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizer-chatml")
    path = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in QA])
    config = load_config(None, ["model=m", "output=o", f"data={path}"])
    calls = []
    real = pipeline.tokenize_examples
    monkeypatch.setattr(pipeline, "tokenize_examples", lambda *a, **k: calls.append(1) or real(*a, **k))

    first = pipeline.prepare_data(tokenizer, path, config, "train")
    again = pipeline.prepare_data(tokenizer, path, config, "train")
    assert len(calls) == 1 and again == first  # hit: same tokens, no tokenization
    changes = [lambda: setattr(config, "max_length", 512), lambda: setattr(config, "truncation", "drop"),
               lambda: setattr(config.data, "format", "chat"), lambda: setattr(config, "skip_invalid", True),
               lambda: write_jsonl(Path(path), [chat(q, a) for q, a in reversed(QA)]),
               lambda: setattr(tokenizer, "chat_template", "{# v2 #}" + tokenizer.chat_template)]
    for change in changes:
        change()
        pipeline.prepare_data(tokenizer, path, config, "train")
        assert len(calls) == len(changes[:changes.index(change) + 1]) + 1


def test_train_refuses_invalid_data_or_skips_it_within_the_threshold(tiny_model, qa_files, tmp_path, capsys):
    rows = [chat(q, a) for q, a in QA] + ["{oops", {"messages": [U]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    base = ["train", "--model", tiny_model, "--data", path, "--output", tmp_path / "o", "--max-steps", 1]
    code, out, err = run_cli(base, capsys)
    assert code == 2 and "2 invalid of 14 examples (first: " in err and "mixed.jsonl:13" in err
    assert len(err.strip().splitlines()) == 1 and "mixed.jsonl:14" in out.replace("\n", "")  # rich wraps long paths
    code, _, err = run_cli(base + ["--skip-invalid"], capsys)
    assert code == 2 and "more than max_invalid_fraction 0.1" in err
    code, out, err = run_cli(base + ["--skip-invalid", "max_invalid_fraction=0.2"], capsys)
    assert code == 0, err
    assert "skipped 2 invalid of 14 examples" in out


def test_train_on_preference_pairs_is_a_clear_error(tiny_model, tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(12)]
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    code, _, err = run_cli(["train", "--model", tiny_model, "--data", path, "--output", tmp_path / "o"], capsys)
    assert code == 2 and "preference pairs" in err and "pref.jsonl:1" in err


SECRET = "jane.doe@example.com"


def test_data_scan_counts_without_values_and_redacts_a_copy(tmp_path, capsys):
    rows = [chat("mail me at " + SECRET, "ok")] + [chat(q, a) for q, a in QA]
    path = write_jsonl(tmp_path / "pii.jsonl", rows)
    before = Path(path).read_bytes()
    code, out, _ = run_cli(["data", "scan", path], capsys)
    assert code == 0 and "EMAIL 1" in out and f"{path}:1" in out and SECRET not in out
    redacted = tmp_path / "clean.jsonl"
    code, out, _ = run_cli(["data", "scan", path, "--redact", redacted], capsys)
    assert code == 0 and Path(path).read_bytes() == before
    assert SECRET not in redacted.read_text() and "<EMAIL>" in redacted.read_text()


def test_refuse_pii_stops_training(tiny_model, tmp_path, capsys):
    path = write_jsonl(tmp_path / "pii.jsonl", [chat("mail " + SECRET, "ok")] + [chat(q, a) for q, a in QA])
    code, _, err = run_cli(["train", "--model", tiny_model, "--data", path, "--output", tmp_path / "o",
                            "refuse_pii=true"], capsys)
    assert code == 2 and "EMAIL 1" in err and "pii.jsonl:1" in err and SECRET not in err
