"""`refuse_pii: true`: training refuses sensitive data in the text it would train, for every source."""

from __future__ import annotations

import json
import sys
import types
import zlib
from pathlib import Path

import pytest

from conftest import QA, chat, write_jsonl
from finesmith import pipeline
from finesmith.cli import main
from finesmith.data.validate import refuse_sensitive
from finesmith.errors import FinesmithError

EMAIL, PHONE, CARD = "jane.doe@example.com", "+44 20 7946 0958", "4111 1111 1111 1111"
SECRETS = (EMAIL, PHONE, CARD)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own tokenized-data cache, so no result leaks between tests."""
    monkeypatch.setenv("FINESMITH_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if training gets as far as loading the model."""
    def load_base_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was refused")

    monkeypatch.setattr(pipeline, "load_base_model", load_base_model)


def train(tiny_model, data, out, *overrides, capsys):
    code = main(["train", "--model", tiny_model, "--data", str(data), "--output", str(out), "--max-steps", "1",
                 "refuse_pii=true", *overrides])
    _, err = capsys.readouterr()
    return code, err


def assert_refused(code, err, *, where, kinds):
    """One `error:` line naming the location and each `KIND n`, without any value."""
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert where in err and "refuse_pii" in err, err
    for kind in kinds:
        assert kind in err, err
    assert not any(secret in err for secret in SECRETS), err


def write_parquet(path: Path, columns: dict[str, list], hidden: bool = True) -> str:
    """Compressed and without column statistics; with `hidden`, check no value is readable in the raw bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, compression="zstd", write_statistics=False)
    raw = path.read_bytes()
    assert not hidden or not any(secret.encode() in raw for secret in SECRETS)
    return str(path)


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF whose (deflated) text layer is `text`; every offset in its xref is exact."""
    content = zlib.compress(f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode("latin-1"))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(content) + content + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_parquet_values_are_refused_before_the_model_loads(tiny_model, tmp_path, no_model_load, capsys):
    prompts, completions = [q for q, _ in QA], [a for _, a in QA]
    prompts[2] = f"my number is {PHONE}"
    completions[4] = f"write to {EMAIL}"
    completions[6] = f"card {CARD}"
    path = write_parquet(tmp_path / "pii.parquet", {"prompt": prompts, "completion": completions})
    code, err = train(tiny_model, path, tmp_path / "o", capsys=capsys)
    assert_refused(code, err, where="pii.parquet:3", kinds=("EMAIL 1", "CREDIT_CARD 1", "PHONE 1"))
    assert "export it to .jsonl" in err


def test_pdf_text_layer_is_refused(tiny_model, tmp_path, no_model_load, capsys):
    path = tmp_path / "letter.pdf"
    path.write_bytes(tiny_pdf(f"Write to {EMAIL} or call {PHONE}"))
    assert EMAIL.encode() not in path.read_bytes()
    code, err = train(tiny_model, path, tmp_path / "o", capsys=capsys)
    assert_refused(code, err, where="letter.pdf", kinds=("EMAIL 1", "PHONE 1"))
    assert "extract its text" in err


def test_pdf_that_cannot_be_read_is_refused_not_passed(tmp_path, monkeypatch):
    path = tmp_path / "letter.pdf"
    path.write_bytes(tiny_pdf(f"Write to {EMAIL}"))
    monkeypatch.setitem(sys.modules, "pypdf", None)  # as if pypdf were not installed
    with pytest.raises(FinesmithError, match=r"letter\.pdf.*pypdf") as info:
        refuse_sensitive(str(path))
    assert "\n" not in str(info.value)


def test_hub_dataset_rows_are_scanned(tiny_model, tmp_path, monkeypatch, no_model_load, capsys):
    rows = [chat(q, a) for q, a in QA]
    rows[2] = chat("who are you?", f"reach me at {EMAIL}")
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return iter(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    code, err = train(tiny_model, "someone/chat-logs", tmp_path / "o", capsys=capsys)
    assert_refused(code, err, where="someone/chat-logs:3", kinds=("EMAIL 1",))
    assert "to_json" in err
    assert calls == [("someone/chat-logs", "train", True)]  # streamed, never held whole


def test_remapped_fields_are_scanned(tiny_model, tmp_path, no_model_load, capsys):
    answers = [a for _, a in QA]
    answers[5] = f"call {PHONE}"
    path = write_parquet(tmp_path / "qa.parquet", {"question": [q for q, _ in QA], "answer": answers})
    code, err = train(tiny_model, path, tmp_path / "o", "data.fields.instruction=question",
                      "data.fields.output=answer", capsys=capsys)
    assert_refused(code, err, where="qa.parquet:6", kinds=("PHONE 1",))


def test_columns_training_does_not_read_are_not_scanned(tmp_path):
    notes = [""] * len(QA)
    notes[0] = f"reviewed by {EMAIL}"
    path = write_parquet(tmp_path / "qa.parquet", {"prompt": [q for q, _ in QA],
                                                   "completion": [a for _, a in QA], "note": notes}, hidden=False)
    refuse_sensitive(path)  # `note` is never trained, so it cannot leak into the model


def test_document_findings_name_the_line_in_the_document(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Notes\n\nnothing to see\n", encoding="utf-8")
    (docs / "b.md").write_text(f"# Contacts\n\nmail {EMAIL}\nphone {PHONE}\n", encoding="utf-8")
    (docs / "c.md").write_text(f"ring {PHONE}\n", encoding="utf-8")
    with pytest.raises(FinesmithError) as info:
        refuse_sensitive(str(docs))
    message = str(info.value)
    assert "EMAIL 1, PHONE 2 in 2 files" in message and f"{docs / 'b.md'}:3" in message
    assert not any(secret in message for secret in SECRETS)


def test_unreadable_source_is_refused_in_one_line(tmp_path):
    path = tmp_path / "notes.docx"
    path.write_bytes(b"PK\x03\x04 not a data file")
    with pytest.raises(FinesmithError, match=r"notes\.docx.*unsupported file type") as info:
        refuse_sensitive(str(path))
    assert "\n" not in str(info.value)


def test_clean_parquet_passes_the_scan_and_trains(tiny_model, tmp_path, capsys):
    path = write_parquet(tmp_path / "clean.parquet", {"prompt": [q for q, _ in QA],
                                                      "completion": [a for _, a in QA]})
    code, err = train(tiny_model, path, tmp_path / "o", capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "config.yaml").exists()


def test_tool_call_arguments_are_scanned(tiny_model, tmp_path, capsys):
    from finesmith.cli import main

    call = {"id": "c1", "type": "function",
            "function": {"name": "send_mail", "arguments": json.dumps({"to": "jane.doe@example.com"})}}
    rows = [{"messages": [{"role": "user", "content": f"Mail Jane, note {i}"},
                          {"role": "assistant", "content": None, "tool_calls": [call]}]} for i in range(12)]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--model", tiny_model, "--data", str(data), "--output", str(tmp_path / "run"),
                 "--max-steps", "1", "refuse_pii=true", "tool_format=hermes"]) == 2
    err = capsys.readouterr().err
    assert "EMAIL" in err and "jane.doe" not in err
