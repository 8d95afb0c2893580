"""Tests for the sensitive-data scanner and redactor (finesmith.data.pii)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finesmith.data import pii
from finesmith.data.pii import (
    KINDS,
    Finding,
    Match,
    find_sensitive,
    iban_valid,
    luhn_valid,
    redact,
    redact_file,
    scan_file,
    scan_text,
)
from finesmith.errors import FinesmithError

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"

PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEA75q2bqsDr3NqX1TdmJkDhKLf2Z0dBxJ9e7dS2hAcV0pVTpjO\n"
    "kD3pY0v6aQ8E5m8xR7yS2ZlU9wX0cT3bNq1fH4gJ6vK8LmP2oR5sT7uW9yA==\n"
    "-----END RSA PRIVATE KEY-----"
)
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)


def values(text: str) -> list[tuple[str, str]]:
    return [(m.kind, text[m.start : m.end]) for m in find_sensitive(text)]


# --- detection --------------------------------------------------------------

POSITIVES = [
    ("mail me at jane.doe+billing@mail.example.co.uk today", "EMAIL", "jane.doe+billing@mail.example.co.uk"),
    ("From: Bob <bob_smith42@example.org>", "EMAIL", "bob_smith42@example.org"),
    ("email: o'brien@example.ie", "EMAIL", "o'brien@example.ie"),
    ("call +44 20 7946 0958 now", "PHONE", "+44 20 7946 0958"),
    ("call +1 (415) 555-0132 now", "PHONE", "+1 (415) 555-0132"),
    ("call (415) 555-0132.", "PHONE", "(415) 555-0132"),
    ("call 415-555-0132 or", "PHONE", "415-555-0132"),
    ("Rückruf 030 12345678 bitte", "PHONE", "030 12345678"),
    ("appelez le 06 12 34 56 78", "PHONE", "06 12 34 56 78"),
    ("WhatsApp +4915112345678", "PHONE", "+4915112345678"),
    ("callback 0044 20 7946 0321", "PHONE", "0044 20 7946 0321"),
    ("call me at 555-0199 please", "PHONE", "555-0199"),
    ("at 020 7946 0958 24/7", "PHONE", "020 7946 0958"),
    ("card 4111 1111 1111 1111 declined", "CREDIT_CARD", "4111 1111 1111 1111"),
    ("card 4111-1111-1111-1111 declined", "CREDIT_CARD", "4111-1111-1111-1111"),
    ("card 5555555555554444 declined", "CREDIT_CARD", "5555555555554444"),
    ("amex 3782 822463 10005 declined", "CREDIT_CARD", "3782 822463 10005"),
    ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN", "DE89 3704 0044 0532 0130 00"),
    ("IBAN GB82WEST12345698765432.", "IBAN", "GB82WEST12345698765432"),
    ("iban be68 5390 0754 7034", "IBAN", "be68 5390 0754 7034"),
    ("blocked 203.0.113.7 at the WAF", "IP_ADDRESS", "203.0.113.7"),
    ("ssh deploy@10.0.0.5 -p 22", "IP_ADDRESS", "10.0.0.5"),
    ("curl http://192.168.1.20:8080/health", "IP_ADDRESS", "192.168.1.20"),
    ("client 2001:db8::8a2e:370:7334 hit", "IP_ADDRESS", "2001:db8::8a2e:370:7334"),
    ("listen [fe80::1ff:fe23:4567:890a]:443", "IP_ADDRESS", "fe80::1ff:fe23:4567:890a"),
    ("AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", "API_KEY", "AKIAIOSFODNN7EXAMPLE"),
    ("token ghp_16C7e42F292c6912E7710c838347Ae178B4a", "API_KEY", "ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
    ("t github_pat_11ABCDEFG0123456789abc_defGHIJKLmnopQRSTuvwxYZ0123456789", "API_KEY",
     "github_pat_11ABCDEFG0123456789abc_defGHIJKLmnopQRSTuvwxYZ0123456789"),
    ("xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "API_KEY",
     "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
    ('stripe.api_key = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"', "API_KEY", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("rk_live_51H8abcdEFGH1234ijkl and more", "API_KEY", "rk_live_51H8abcdEFGH1234ijkl"),
    ("OPENAI_API_KEY=sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z", "API_KEY", "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"),
    ("key=AIzaSyA-1234567890abcdefghijklmnopqrstu&x=1", "API_KEY", "AIzaSyA-1234567890abcdefghijklmnopqrstu"),
    ("--token hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh", "API_KEY", "hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh"),
    (f"cookie {JWT}", "API_KEY", JWT),
    ("Authorization: Bearer 4f3c2a1b9d8e4c7ba6f53e2d1c0b9a87.", "API_KEY", "4f3c2a1b9d8e4c7ba6f53e2d1c0b9a87"),
    (f"key:\n{PEM}\nthanks", "PRIVATE_KEY", PEM),
    ("one line: " + PEM.replace("\n", "\\n"), "PRIVATE_KEY", PEM.replace("\n", "\\n")),
]


@pytest.mark.parametrize(("text", "kind", "value"), POSITIVES)
def test_each_kind_is_detected(text: str, kind: str, value: str) -> None:
    assert values(text) == [(kind, value)]


def test_every_kind_has_positive_examples() -> None:
    assert {kind for _, kind, _ in POSITIVES} == set(KINDS)


NEGATIVES = [
    "The app version 1.2.3.4 crashes; v10.0.0.1-beta is fine.",
    "Please upgrade to v1.2.3.4 or 1.2.3.4.5 today.",
    "Bump numpy from 1.26.4.0 to 2.0.0.1 in requirements.",
    "pip install foo==2.4.1.0 and see section 4.2.1.3",
    "Firmware 3.2.0.15 fixed it.",
    "Opened 2024-03-15 at 10:30:45, closed 15/03/2024 and 03-15-2024.",
    "Order ORD-2024-001234 and Amazon order 112-4567890-1234567.",
    "UPS 1Z999AA10123456784, USPS 9400 1000 0000 0000 0000 00, FedEx 7712 3456 7890.",
    "The number 4111 1111 1111 1112 fails Luhn, so does 5555555555554445.",
    "SKU 415-555-0132 is out of stock; part no. 212-555-0188 too.",
    "Fixed in 9fceb02d0ae598e95dc970b74767f19372d61af8 (short 9fceb02).",
    "Request 550e8400-e29b-41d4-a716-446655440000 failed.",
    "Total $1,299.99 or €1.299,00 or 1 299,00 €.",
    "ISBN 978-3-16-148410-0, ISBN-10 0-306-40615-2, 9780306406157.",
    "IMEI 352099001761481 is blacklisted.",
    "MAC 00:1A:2B:3C:4D:5E, time 10:30:45, std::vector, arr[1::2].",
    "loss=0.4532015112830366 at epoch ms 1710498600123",
    "git@github.com:acme/widgets.git and logo@2x.png and @maria and user@localhost",
    "AKIAXXXXXXXXXXXXXXXX and sk_live_xxxxxxxxxxxxxxxxxxxxxxxx are placeholders",
    "Send Authorization: Bearer <token> or Bearer YOUR_ACCESS_TOKEN_HERE",
    "We use sk-learn, not sk-some-long-descriptive-name-here.",
    "-----BEGIN PUBLIC KEY----- and -----BEGIN CERTIFICATE----- are public",
    "IBAN DE00 3704 0044 0532 0130 00 has a bad checksum; BIC DEUTDEFF500.",
    "Invalid 256.1.1.1 and 192.168.1.300 and 10.0.0",
    "SSN 078-05-1120, ZIP 94105-1234, +10 000 000 rows",
    "USPS 9400 4600 0713 5590 7372 22 delivered",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_look_alikes_are_not_flagged(text: str) -> None:
    assert values(text) == []


def test_luhn() -> None:
    assert luhn_valid("4111 1111 1111 1111")
    assert luhn_valid("3782-822463-10005")
    assert not luhn_valid("4111 1111 1111 1112")
    assert not luhn_valid("")


def test_iban_checks() -> None:
    assert iban_valid("DE89 3704 0044 0532 0130 00")
    assert iban_valid("gb82west12345698765432")
    assert not iban_valid("DE88 3704 0044 0532 0130 00")  # check digits off
    assert not iban_valid("DE89 3704 0044 0532 0130 0")  # DE needs 22 characters
    assert not iban_valid("ZZ89 3704 0044 0532 0130 00")  # no such country


def test_higher_priority_kind_wins_overlaps() -> None:
    text = f"{PEM[:-29]} admin@example.com 10.0.0.1 {PEM[-29:]}"  # email + IP inside the key
    assert values(text) == [("PRIVATE_KEY", text)]
    assert values(f"Authorization: Bearer {JWT}") == [("API_KEY", JWT)]


def test_matches_are_sorted_and_disjoint() -> None:
    text = "a@example.com 10.0.0.1 +44 20 7946 0958 DE89 3704 0044 0532 0130 00, 4111111111111111"
    matches = find_sensitive(text)
    assert [m.kind for m in matches] == ["EMAIL", "IP_ADDRESS", "PHONE", "IBAN", "CREDIT_CARD"]
    assert all(a.end <= b.start for a, b in zip(matches, matches[1:]))


def test_redact_uses_placeholders() -> None:
    text = "Mail a@example.com, card 4111 1111 1111 1111, host 10.0.0.1, v1.2.3.4."
    assert redact(text) == "Mail <EMAIL>, card <CREDIT_CARD>, host <IP_ADDRESS>, v1.2.3.4."


# --- files ------------------------------------------------------------------


def test_redact_file_text_keeps_input_and_line_endings(tmp_path: Path) -> None:
    src = tmp_path / "chat.txt"
    original = b"hi a@example.com\r\nno secrets here\r\nip 10.0.0.1\n"
    src.write_bytes(original)
    report = redact_file(src, tmp_path / "out.txt")
    assert src.read_bytes() == original
    assert (tmp_path / "out.txt").read_bytes() == b"hi <EMAIL>\r\nno secrets here\r\nip <IP_ADDRESS>\n"
    assert report.lines_scanned == 3
    assert report.findings == [Finding(str(src), 1, "EMAIL"), Finding(str(src), 3, "IP_ADDRESS")]
    assert report.counts() == {"EMAIL": 1, "IP_ADDRESS": 1}


def test_multiline_private_key_in_text_file(tmp_path: Path) -> None:
    src = tmp_path / "notes.md"
    src.write_text(f"before\nkey: {PEM} after\nnext line\n", encoding="utf-8")
    report = redact_file(src, tmp_path / "out.md")
    assert (tmp_path / "out.md").read_text(encoding="utf-8") == "before\nkey: <PRIVATE_KEY>\n after\nnext line\n"
    assert [(f.line, f.kind) for f in report.findings] == [(2, "PRIVATE_KEY")]
    assert report.lines_scanned == 6


def test_redact_file_jsonl_keeps_json_and_keys(tmp_path: Path) -> None:
    src = tmp_path / "data.jsonl"
    rows = [
        {"email": "a@example.com", "nested": {"ips": ["10.0.0.1", "v1.2.3.4"]}, "n": 3},
        {"card": 4111111111111111, "note": "Grüße, keine Geheimnisse"},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    src.write_text("\n".join([lines[0], "not json: b@example.org", lines[1]]) + "\n", encoding="utf-8")
    original = src.read_bytes()
    report = redact_file(src, tmp_path / "out.jsonl")
    out = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert src.read_bytes() == original
    assert json.loads(out[0]) == {"email": "<EMAIL>", "nested": {"ips": ["<IP_ADDRESS>", "v1.2.3.4"]}, "n": 3}
    assert out[1] == "not json: <EMAIL>"
    assert json.loads(out[2]) == {"card": "<CREDIT_CARD>", "note": "Grüße, keine Geheimnisse"}
    assert report.counts() == {"EMAIL": 2, "CREDIT_CARD": 1, "IP_ADDRESS": 1}


def test_jsonl_line_without_findings_is_copied_verbatim(tmp_path: Path) -> None:
    src = tmp_path / "data.jsonl"
    src.write_text('{"text":   "nothing here"}\n', encoding="utf-8")
    redact_file(src, tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == '{"text":   "nothing here"}\n'


def test_jsonl_multiline_private_key_in_one_string(tmp_path: Path) -> None:
    src = tmp_path / "keys.jsonl"
    src.write_text(json.dumps({"text": f"use {PEM} ok"}) + "\n", encoding="utf-8")
    report = scan_file(src)
    assert report.counts() == {"PRIVATE_KEY": 1}
    redact_file(src, tmp_path / "out.jsonl")
    assert json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8")) == {"text": "use <PRIVATE_KEY> ok"}


def test_report_never_contains_values(tmp_path: Path) -> None:
    secrets = ["a@example.com", "4111 1111 1111 1111", "10.0.0.1", "AKIAIOSFODNN7EXAMPLE"]
    src = tmp_path / "s.txt"
    src.write_text("\n".join(secrets) + "\n", encoding="utf-8")
    for report in (scan_file(src), redact_file(src, tmp_path / "o.txt")):
        dumped = repr(report) + repr(report.counts())
        assert len(report.findings) == 4
        assert not any(secret in dumped for secret in secrets)


def test_scan_text_locates_values_and_counts_as_scan_file(tmp_path: Path) -> None:
    text = "intro\n\nmail a@example.com\ncard 4111 1111 1111 1111 and b@example.org\n"
    src = tmp_path / "doc.txt"
    src.write_text(text, encoding="utf-8")
    found = scan_text(text, "doc.txt", 1)
    assert [(f.line, f.kind) for f in found] == [(3, "EMAIL"), (4, "CREDIT_CARD"), (4, "EMAIL")]
    assert sorted(f.kind for f in found) == sorted(f.kind for f in scan_file(src).findings)
    assert {f.line for f in scan_text(text, "rows.jsonl", 7, count_lines=False)} == {7}
    assert not any(secret in repr(found) for secret in ("a@example.com", "4111"))


def test_scan_handles_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    src = tmp_path / "latin1.txt"
    src.write_bytes("caf\xe9 a@example.com\n".encode("latin-1"))
    redact_file(src, tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_bytes() == b"caf\xe9 <EMAIL>\n"


def test_user_errors_are_finesmith_errors(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("a@example.com\n", encoding="utf-8")
    existing = tmp_path / "exists.txt"
    existing.write_text("keep me", encoding="utf-8")
    cases = [
        (lambda: scan_file(tmp_path / "missing.txt"), "not found"),
        (lambda: redact_file(tmp_path / "missing.txt", tmp_path / "x.txt"), "not found"),
        (lambda: redact_file(src, src), "same file"),
        (lambda: redact_file(src, tmp_path / "." / "in.txt"), "same file"),
        (lambda: redact_file(src, existing), "already exists"),
        (lambda: redact_file(src, tmp_path / "no" / "dir.txt"), "does not exist"),
        (lambda: scan_file(tmp_path), "not a regular file"),
    ]
    for call, what in cases:
        with pytest.raises(FinesmithError) as info:
            call()
        message = str(info.value)
        assert what in message and str(tmp_path) in message and "\n" not in message
        assert "a@example.com" not in message
    assert existing.read_text(encoding="utf-8") == "keep me"
    assert src.read_text(encoding="utf-8") == "a@example.com\n"


def test_failed_redaction_leaves_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.txt"
    src.write_text("a@example.com\n", encoding="utf-8")

    def boom(*_: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pii, "_process", boom)
    with pytest.raises(RuntimeError):
        redact_file(src, tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()


# --- labelled evaluation ----------------------------------------------------


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_precision_and_recall_on_labelled_file() -> None:
    result = _load(ROOT / "bench" / "pii_eval.py", "pii_eval").evaluate()
    assert result["lines"] >= 300
    assert result["overall"]["precision"] >= 0.95
    assert result["overall"]["recall"] >= 0.95
    for kind, score in result["per_kind"].items():
        assert score["tp"] >= 20, kind  # every kind has many positives
        assert score["precision"] >= 0.9 and score["recall"] >= 0.9, (kind, score)


def test_labelled_file_is_what_its_generator_writes() -> None:
    generator = _load(ASSETS / "make_pii_labelled.py", "make_pii_labelled")
    expected = [json.dumps(row, ensure_ascii=False) for row in generator.build()]
    assert (ASSETS / "pii_labelled.jsonl").read_text(encoding="utf-8").splitlines() == expected


# --- robustness -------------------------------------------------------------

FRAGMENTS = st.sampled_from(
    ["a@b.co", "@", ".", "-", " ", "+", "(", ")", "0", "4111", "1", "9", ":", "::", "Bearer ", "eyJ", "sk-",
     "AKIA", "DE89", "-----BEGIN RSA PRIVATE KEY-----", "-----END RSA PRIVATE KEY-----", "\n", "\\n", "v",
     "version ", "<EMAIL>", "x", "/", "_", "=", "ff", "é", "٣"]
)
TEXTS = st.one_of(st.text(max_size=200), st.lists(FRAGMENTS, max_size=60).map("".join))


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_never_raises_and_redact_is_idempotent(text: str) -> None:
    matches = find_sensitive(text)
    assert all(isinstance(m, Match) and 0 <= m.start < m.end <= len(text) for m in matches)
    assert all(a.end <= b.start for a, b in zip(matches, matches[1:]))
    once = redact(text)
    assert redact(once) == once


@pytest.mark.parametrize(
    "text",
    ["a" * 200_000, "1 " * 50_000, "1." * 50_000, "+1 " * 30_000, "a@" * 50_000, "0" * 100_000,
     "-----BEGIN PRIVATE KEY-----" * 3_000, "DE89 " * 30_000, "ab12 " * 30_000, "1:" * 50_000,
     "Bearer " + "a1" * 50_000, "x." * 50_000 + "@"],
)
def test_pathological_input_is_fast(text: str) -> None:
    started = time.perf_counter()
    redact(text)
    assert time.perf_counter() - started < 2.0
