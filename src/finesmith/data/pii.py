"""Find and redact sensitive data (PII and secrets) in text and in data files.

Standard library only. Detection is regex candidates followed by validation:
checksums (Luhn for cards, mod-97 for IBANs), ``ipaddress`` for IPs and a few
context rules that reject look-alikes (version strings, order ids, IMEIs...).

Public API::

    KINDS                      kinds detected, in priority order
    find_sensitive(text)       -> list[Match]   spans in one string
    redact(text)               -> str           each span replaced by "<KIND>"
    scan_text(text, path)      -> list[Finding] what one string from a file contains
    scan_file(path)            -> ScanReport    what a file contains (no values)
    redact_file(src, dst)      -> ScanReport    write a redacted copy of src to dst
    luhn_valid(number), iban_valid(iban)        the checksums, for callers' own checks

For ``Bearer <token>`` only the token is a match ("Bearer <API_KEY>"). No function
here ever puts a matched value into a message, report or log.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

from finesmith.errors import FinesmithError

# Priority order: when two candidate spans overlap, the kind listed first wins.
KINDS: tuple[str, ...] = (
    "PRIVATE_KEY",
    "API_KEY",
    "EMAIL",
    "IBAN",
    "CREDIT_CARD",
    "IP_ADDRESS",
    "PHONE",
)
_RANK = {kind: rank for rank, kind in enumerate(KINDS)}

# re.ASCII everywhere: \d, \w and \b mean ASCII only, so Unicode digits never reach
# int()/ipaddress and the boundaries behave the same for every input.
_A = re.ASCII


@dataclass(frozen=True)
class Match:
    """One sensitive span ``text[start:end]`` of a given kind in one string."""

    kind: str
    start: int
    end: int


@dataclass(frozen=True)
class Finding:
    """Where a sensitive value was found in a file. Never holds the value itself."""

    path: str
    line: int
    kind: str


@dataclass
class ScanReport:
    """The findings of one file scan or redaction, and how many lines were read."""

    findings: list[Finding] = field(default_factory=list)
    lines_scanned: int = 0

    def counts(self) -> dict[str, int]:
        """Number of findings per kind, in ``KINDS`` order, omitting kinds never found."""
        tally = Counter(f.kind for f in self.findings)
        return {kind: tally[kind] for kind in KINDS if tally[kind]}


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _window_before(text: str, start: int, size: int = 60) -> str:
    return text[max(0, start - size) : start]


def _bad_follower(text: str, end: int) -> bool:
    """True if the span is glued to more token text (``x``, ``-beta``, ``.5``)."""
    rest = text[end : end + 2]
    if not rest:
        return False
    if rest[0].isalnum() or rest[0] == "_":
        return True
    return rest[0] in ".-" and len(rest) == 2 and rest[1].isalnum()


def _looks_random(body: str, min_distinct: int = 6) -> bool:
    """Reject placeholders such as ``XXXXXXXX`` or ``xxxx-xxxx`` by character variety."""
    return len(set(body)) >= min_distinct


# Identifier words that make a following number an id rather than a phone/card.
_ID_CONTEXT = re.compile(
    r"\b(?:order|invoice|inv|ticket|case|ref|reference|sku|part|model|serial|s/n|p/n"
    r"|tracking|shipment|parcel|awb|item|product|batch|lot|po|isbn|imei|policy|claim"
    r"|confirmation|booking|transaction|txn|id|ean|upc|gtin|barcode)"
    r"\s*(?:no\.?|nr\.?|num(?:ber)?|id|code|#)?\s*[:#=]?\s*$",
    re.IGNORECASE | _A,
)


def _id_context(text: str, start: int) -> bool:
    return bool(_ID_CONTEXT.search(_window_before(text, start)))


# ---------------------------------------------------------------------------
# Detectors: each yields Match objects for one kind
# ---------------------------------------------------------------------------

_PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----", _A)
_PEM_END = re.compile(r"-----END (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----", _A)
# A whole block, or (when the END line is missing: truncated paste, or a file read
# line by line) the header plus whatever base64 body lines follow it. The body
# never contains "-----", so the search for END stops at the next marker and a
# BEGIN without an END cannot make a scan quadratic.
_PRIVATE_KEY = re.compile(
    _PEM_BEGIN.pattern
    + r"(?:(?:[^-]|-(?!----)){0,65536}?"
    + _PEM_END.pattern
    + r"|(?:(?:\s|\\[nr])+[A-Za-z0-9+/=]{16,})*)",
    re.DOTALL | _A,
)


def _find_private_keys(text: str) -> Iterator[Match]:
    for m in _PRIVATE_KEY.finditer(text):
        yield Match("PRIVATE_KEY", m.start(), m.end())


# (pattern, length of the fixed prefix before the random part)
_TOKEN_PATTERNS: tuple[tuple[re.Pattern[str], int], ...] = tuple(
    (re.compile(r"(?<![A-Za-z0-9_-])" + pattern + r"(?![A-Za-z0-9_-])", _A), prefix)
    for pattern, prefix in (
        (r"(?:AKIA|ASIA)[0-9A-Z]{16}", 4),  # AWS access key id
        (r"gh[pousr]_[A-Za-z0-9]{30,255}", 4),  # GitHub classic tokens
        (r"github_pat_[A-Za-z0-9_]{22,255}", 11),  # GitHub fine-grained tokens
        (r"xox[baprs]-[A-Za-z0-9-]{10,250}", 5),  # Slack
        (r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,247}", 8),  # Stripe secret/restricted
        (r"AIza[0-9A-Za-z_-]{35}", 4),  # Google API key
        (r"hf_[A-Za-z0-9]{30,64}", 3),  # Hugging Face
        # JSON Web Token: base64url header and payload both start with '{"' = eyJ.
        (r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", 0),
    )
)
# OpenAI-style keys: "sk-" plus a long body; needs letters and digits, so words
# such as "sk-some-descriptive-name" are left alone.
_OPENAI_KEY = re.compile(
    r"(?<![A-Za-z0-9_-])sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,200}(?![A-Za-z0-9_-])", _A
)
_BEARER = re.compile(r"\b(?i:bearer)\s+([A-Za-z0-9._~+/-]{16,4096}=*)", _A)


def _mixed(body: str) -> bool:
    return any(c.isdigit() for c in body) and any(c.isalpha() for c in body)


def _find_api_keys(text: str) -> Iterator[Match]:
    for pattern, prefix in _TOKEN_PATTERNS:
        for m in pattern.finditer(text):
            if _looks_random(m.group()[prefix:]):
                yield Match("API_KEY", m.start(), m.end())
    for m in _OPENAI_KEY.finditer(text):
        body = m.group()[3:]
        if _mixed(body) and _looks_random(body, 8):
            yield Match("API_KEY", m.start(), m.end())
    for m in _BEARER.finditer(text):
        token = m.group(1).rstrip(".")  # a full stop ends the sentence, not the token
        if _mixed(token) and _looks_random(token, 8):
            yield Match("API_KEY", m.start(1), m.start(1) + len(token))


# Image and source-file names such as "logo@2x.png" look like addresses.
_FILE_TLDS = frozenset(
    "png jpg jpeg gif svg webp ico bmp tif tiff pdf js ts css py json txt zip gz html htm".split()
)
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])"
    r"[A-Za-z0-9_%+-][A-Za-z0-9._%+'-]{0,63}@"
    r"(?:[A-Za-z0-9-]+\.)+([A-Za-z]{2,24})"
    # Not glued to more text, not "git@host:org/repo" (an SSH remote, not a mailbox).
    r"(?![A-Za-z0-9_@-]|:[\w~/])",
    _A,
)


def _find_emails(text: str) -> Iterator[Match]:
    for m in _EMAIL.finditer(text):
        if m.group(1).lower() not in _FILE_TLDS:
            yield Match("EMAIL", m.start(), m.end())


# Registered IBAN lengths (ISO 13616); an unknown country code is not an IBAN.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31,
    "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip
# Greedy on purpose: the candidate may run into a following upper-case word, and is
# then cut back to the registered length of its country.
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}[0-9]{2}(?: ?[A-Za-z0-9]){11,30}", _A)


def iban_valid(iban: str) -> bool:
    """True if ``iban`` (spaces allowed) has its country's length and a valid mod-97 check."""
    compact = iban.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact.isalnum():
        return False
    if not compact.isascii() or not compact[2:4].isdigit():
        return False
    digits = "".join(str(int(c, 36)) for c in compact[4:] + compact[:4])
    return int(digits) % 97 == 1


def _find_ibans(text: str) -> Iterator[Match]:
    # Not finditer: a greedy candidate may swallow the next IBAN ("DE89... and
    # FR14..."), so the search resumes right after what was actually kept.
    pos = 0
    while m := _IBAN.search(text, pos):
        end = m.start() + _cut_to_length(m.group(), _IBAN_LENGTHS.get(m.group()[:2].upper(), 0))
        if end > m.start() and not _bad_follower(text, end) and iban_valid(text[m.start() : end]):
            yield Match("IBAN", m.start(), end)
            pos = end
        else:
            pos = m.start() + 1


def _cut_to_length(candidate: str, length: int) -> int:
    """Offset where ``candidate`` holds ``length`` alphanumerics, or 0 if it is shorter."""
    seen = 0
    for offset, char in enumerate(candidate):
        seen += char != " "
        if seen == length:
            return offset + 1
    return 0


def luhn_valid(number: str) -> bool:
    """True if the digits of ``number`` (separators ignored) pass the Luhn checksum."""
    digits = [int(c) for c in number if c in "0123456789"]
    if not digits:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# A run of 13-19 digits with optional single space/dash separators that is not
# part of a longer run (tracking numbers, account numbers) nor the decimals of a
# float ("loss 0.4532015112830366").
_CARD = re.compile(r"(?<![\w+.])(?<![0-9][ -])[0-9](?:[ -]?[0-9]){12,18}(?![ -]?[0-9])", _A)
# Printed groupings: 4-4-4-4(-3), 4-4-4-1 (13-digit Visa), 4-6-5 (Amex), 4-6-4 (Diners).
_CARD_GROUPS = re.compile(r"4(?:,4){2},[1-4]|4(?:,4){3}(?:,[1-3])?|4,6,[45]")


def _card_shape_ok(candidate: str) -> bool:
    separators = {c for c in candidate if c in " -"}
    if not separators:
        return True
    if len(separators) > 1:
        return False
    groups = ",".join(str(len(g)) for g in candidate.split(separators.pop()))
    return bool(_CARD_GROUPS.fullmatch(groups))


def _find_cards(text: str) -> Iterator[Match]:
    for m in _CARD.finditer(text):
        number = m.group()
        # Issuer ranges: 2 (Mastercard/Mir), 3 (Amex/JCB/Diners), 4 (Visa),
        # 5 (Mastercard/Maestro), 6 (Discover/UnionPay). Excludes epoch-ms, ISBNs.
        if number[0] not in "23456" or not _card_shape_ok(number):
            continue
        if _bad_follower(text, m.end()) or _id_context(text, m.start()):
            continue
        if luhn_valid(number):
            yield Match("CREDIT_CARD", m.start(), m.end())


_IPV4 = re.compile(r"(?<![\w.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}", _A)
# "10.0.0.1-10.0.0.9" is a range of two addresses; "build-1.2.3.4" is not.
_WORD_DASH = re.compile(r"\w-", _A)
_IPV4_RANGE_START = re.compile(r"(?<![\w.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}-$", _A)
_IPV4_RANGE_END = re.compile(r"-(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![\w-]|\.\w)", _A)
# Words and operators after which a dotted quad is a version (or a section number),
# not an address. A chain of earlier versions may come in between ("upgraded from
# 1.2.3.4 to 1.2.3.5"), and a package name after bump/upgrade ("Bump numpy from").
_VERSION_BEFORE = re.compile(
    r"(?:\b(?:versions?|ver|v|releases?|released|builds?|firmware|fw|drivers?|rev|revision"
    r"|patch(?:ed)?|tagged|upgrad\w*|updat\w*|downgrad\w*|bump\w*|pin|pinned"
    r"|requires?|sdk|kernel|plugin|package|chrome|chromium|firefox|safari|macos|ios"
    r"|android|java|jdk|python|npm|pip|sections?|clause|chapter|paragraph|step|figure|table)"
    r"\s*[:=#]?\s*(?:(?:from|to|is|was|of)\s+)*"
    r"|\b(?:bump|upgrad|downgrad)\w*\s+[\w.-]+\s+(?:from|to)\s+"
    r"|(?:==|>=|<=|~=|!=|\^|~|\u00a7)\s*)"
    r"(?:v?\d+(?:\.\d+)+\s*(?:to|->|-|and|or|,|/)\s*)*$",
    re.IGNORECASE | _A,
)
_VERSION_AFTER = re.compile(
    r"\s*(?:release|beta|alpha|rc\d*|changelog|hotfix|snapshot)\b", re.IGNORECASE | _A
)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])", _A)


def _glued(text: str, start: int, end: int) -> bool:
    """True if the dotted quad is part of a longer token, unless in an address range."""
    if _bad_follower(text, end) and not _IPV4_RANGE_END.match(text, end):
        return True
    if not _WORD_DASH.fullmatch(text, max(0, start - 2), start):
        return False
    return not _IPV4_RANGE_START.search(text, max(0, start - 16), start)


def _find_ipv4(text: str) -> Iterator[Match]:
    for m in _IPV4.finditer(text):
        if _glued(text, m.start(), m.end()):
            continue
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        if _VERSION_BEFORE.search(_window_before(text, m.start())):
            continue
        if _VERSION_AFTER.match(text, m.end()):
            continue
        yield Match("IP_ADDRESS", m.start(), m.end())


def _find_ipv6(text: str) -> Iterator[Match]:
    for m in _IPV6.finditer(text):
        groups = [g for g in m.group().split(":") if g]
        # At least two groups and one of 3+ hex digits: skips "1::2" slices, "a::b".
        if len(groups) < 2 or max(len(g) for g in groups) < 3:
            continue
        try:
            ipaddress.IPv6Address(m.group())
        except ValueError:
            continue
        yield Match("IP_ADDRESS", m.start(), m.end())


# ITU-T E.164 country calling codes (1-3 digits; no code is a prefix of another).
_COUNTRY_CODE = (
    r"(?:1|7|2[07]|3[0-469]|4[013-9]|5[1-8]|6[0-6]|8[1246]|9[0-58]"
    r"|(?:2[1-689]|3[578]|42|5[09]|6[7-9]|8[0578]|9[679])[0-9])"
)
# Phone shapes. Groups after the first always need a separator, which keeps the
# patterns free of ambiguous (slow) backtracking.
_PHONE_SHAPES: tuple[tuple[re.Pattern[str], int, int], ...] = tuple(
    (re.compile(pattern, re.VERBOSE | _A), low, high)
    for pattern, low, high in (
        (  # international: +CC, optional (area) or (0), then groups
            rf"""(?<![\w+]) \+{_COUNTRY_CODE} (?:[ .-]?\(0?[0-9]{{1,4}}\))?
                [ .-]?[0-9]+ (?:[ .-][0-9]+)*""",
            8, 16,
        ),
        (  # international with the 00 prefix; the code must stand alone: 0044 20 7946 0321
            rf"""(?<![\w+./-])(?<![0-9][ -]) 00{_COUNTRY_CODE} (?:[ .-]?\(0?[0-9]{{1,4}}\))?
                (?:[ .-][0-9]+)+""",
            10, 18,
        ),
        (  # North American: (415) 555-0132, 415-555-0132, 1-800-555-0199
            r"""(?<![\w+.-])(?<![0-9][ -]) (?:1[ .-])?
                (?:\([2-9][0-9]{2}\)[ .-]?|[2-9][0-9]{2}[ .-]) [2-9][0-9]{2}[ .-][0-9]{4}""",
            10, 11,
        ),
        (  # European national: 020 7946 0958, 030 12345678, 06 12 34 56 78, 0151/12345678
            r"""(?<![\w+./-])(?<![0-9][ -]) 0[1-9][0-9]{0,4} (?:[ -][0-9]{2,8}){1,5}
              | (?<![\w+./-])(?<![0-9][ -]) 0[1-9][0-9]{1,4}/[0-9]{3,8} (?:[ -][0-9]{2,8}){0,3}""",
            9, 12,
        ),
        (r"""(?<![\w+.-]) 0[1-9](?:\.[0-9]{2}){4}""", 10, 10),  # French dotted
    )
)  # fmt: skip
# A 7-digit local number (555-0199) is too short to trust alone: only right after a
# word that announces a phone number ("call 555-0199", "tel: 555-0199").
_LOCAL_PHONE = re.compile(
    r"\b(?:call|phone|tel|text|fax|cell|mobile|dial|ring)(?: (?:me|us))?(?: (?:at|on))?:? "
    r"([2-9][0-9]{2}-[0-9]{4})(?![0-9]|[.-]?\w)",
    re.IGNORECASE | _A,
)
# A 1-2 digit group right after a 4+ digit group is a following number, not part
# of the phone number ("020 7946 0958 24/7"); short groups after 2-3 digit groups
# are normal ("+41 44 668 18 00").
_PHONE_STRAY_TAIL = re.compile(r"(?<=[0-9]{4})[ .-][0-9]{1,2}$", _A)


def _fit_phone(candidate: str, low: int, high: int) -> str:
    """The phone number in ``candidate`` without a stray tail, or '' if its length is implausible."""
    candidate = _PHONE_STRAY_TAIL.sub("", candidate)
    return candidate if low <= sum(c.isdigit() for c in candidate) <= high else ""


# The US social security number layout, which no phone numbering plan uses.
_SSN_SHAPE = re.compile(r"[0-9]{3}-[0-9]{2}-[0-9]{4}", _A)
# A count written with thousand separators ("+10 000 000 rows"): zeros after the
# first group. "+1" followed by 0/1 is no number either (NANP area codes are 2-9).
_NOT_A_NUMBER = re.compile(r"\+?[0-9]+(?:[ .-]0+)+|\+1[ .-]?\(?[01].*", _A)


def _find_phones(text: str) -> Iterator[Match]:
    for pattern, low, high in _PHONE_SHAPES:
        for m in pattern.finditer(text):
            number = _fit_phone(m.group(), low, high)
            if _SSN_SHAPE.fullmatch(number) or _NOT_A_NUMBER.fullmatch(number):
                continue
            end = m.start() + len(number)
            if number and not _bad_follower(text, end) and not _id_context(text, m.start()):
                yield Match("PHONE", m.start(), end)
    for m in _LOCAL_PHONE.finditer(text):
        yield Match("PHONE", m.start(1), m.end(1))


_DETECTORS: tuple[Callable[[str], Iterator[Match]], ...] = (
    _find_private_keys,
    _find_api_keys,
    _find_emails,
    _find_ibans,
    _find_cards,
    _find_ipv4,
    _find_ipv6,
    _find_phones,
)


# ---------------------------------------------------------------------------
# Strings
# ---------------------------------------------------------------------------


def find_sensitive(text: str) -> list[Match]:
    """Sensitive spans in ``text``: non-overlapping, sorted by start.

    Where candidates overlap, the kind earlier in ``KINDS`` wins; within a kind the
    earlier, then longer, span wins.
    """
    candidates = [m for detect in _DETECTORS for m in detect(text)]
    candidates.sort(key=lambda m: (_RANK[m.kind], m.start, m.start - m.end))
    starts: list[int] = []
    chosen: list[Match] = []
    for m in candidates:
        i = bisect.bisect_left(starts, m.start)
        if i > 0 and chosen[i - 1].end > m.start:
            continue
        if i < len(chosen) and chosen[i].start < m.end:
            continue
        starts.insert(i, m.start)
        chosen.insert(i, m)
    return chosen


def _substitute(text: str, matches: list[Match]) -> str:
    parts, last = [], 0
    for m in matches:
        parts += [text[last : m.start], f"<{m.kind}>"]
        last = m.end
    parts.append(text[last:])
    return "".join(parts)


def _redact_counting(text: str) -> tuple[str, list[str]]:
    """Redact ``text`` to a fixed point and return it with the kinds replaced.

    One pass can expose a new match (removing an email may remove the word that
    marked a nearby dotted quad as a version), so passes repeat until nothing is
    found. That makes ``redact`` idempotent. It terminates because every match
    contains text that is not a placeholder ("<", ">" are in no pattern), so each
    pass shrinks the text outside placeholders.
    """
    kinds: list[str] = []
    while matches := find_sensitive(text):
        kinds += [m.kind for m in matches]
        text = _substitute(text, matches)
    return text, kinds


def redact(text: str) -> str:
    """``text`` with every sensitive span replaced by ``<KIND>``, e.g. ``<EMAIL>``."""
    return _redact_counting(text)[0]


def scan_text(text: str, path: str, line: int = 1, *, count_lines: bool = True) -> list[Finding]:
    """Findings in one string read from ``path`` at ``line``, in line order; never the values.

    Passes repeat to the fixed point, as in ``redact``, so the kinds and counts are those
    redaction replaces. With ``count_lines`` (a whole document) a finding's line is ``line``
    plus the line breaks before its value; without (one value of a row), it is ``line``.
    A value found only in a later pass is located in the partly redacted text, which has
    the same line breaks unless a multi-line private key was replaced before it.
    """
    findings: list[Finding] = []
    while matches := find_sensitive(text):
        breaks, counted = 0, 0
        for m in matches:  # sorted by start: count each stretch of the text once
            if count_lines:
                breaks += text.count("\n", counted, m.start)
                counted = m.start
            findings.append(Finding(path, line + breaks, m.kind))
        text = _substitute(text, matches)
    findings.sort(key=lambda finding: finding.line)
    return findings


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

# How lines are redacted: returns the new line (None drops it) and the kinds found.
_LineRedactor = Callable[[str], tuple[str | None, list[str]]]


class _TextLines:
    """Redacts plain-text lines; a PEM private key spans lines, so this keeps state.

    After a BEGIN line without its END, following base64/header lines are dropped
    until the END line (or any line that cannot be key material).
    """

    _BODY_LINE = re.compile(
        r"\s*(?:[A-Za-z0-9+/=]+|(?:Proc-Type|DEK-Info|Comment|Version|Hash|Charset): .*)?\s*",
        _A,
    )

    def __init__(self) -> None:
        self.in_key = False

    def __call__(self, line: str) -> tuple[str | None, list[str]]:
        if self.in_key:
            end = _PEM_END.search(line)
            if end:
                line = line[end.end() :]
                if not line.strip():
                    self.in_key = False
                    return None, []
            elif self._BODY_LINE.fullmatch(line):
                return None, []
        redacted, kinds = _redact_counting(line)
        begins = list(_PEM_BEGIN.finditer(line))
        self.in_key = bool(begins) and not _PEM_END.search(line, begins[-1].end())
        return redacted, kinds


def _redact_json(value: object, kinds: list[str]) -> object:
    """Redact every string value inside parsed JSON; keys are left untouched."""
    if isinstance(value, str):
        redacted, found = _redact_counting(value)
        kinds += found
        return redacted
    if isinstance(value, list):
        return [_redact_json(v, kinds) for v in value]
    if isinstance(value, dict):
        return {k: _redact_json(v, kinds) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool):
        # A card number stored as a JSON number is still a card number.
        redacted, found = _redact_counting(str(value))
        if found:
            kinds += found
            return redacted
    return value


def _dump_json(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    try:  # lone surrogates from "\ud83d" escapes cannot be written as UTF-8
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        text = json.dumps(value)
    return text


def _json_lines() -> _LineRedactor:
    """Redacts JSONL lines; a line that is not valid JSON is handled as plain text."""
    as_text = _TextLines()

    def redact_line(line: str) -> tuple[str | None, list[str]]:
        try:
            value = json.loads(line)
        except ValueError:
            return as_text(line)
        as_text.in_key = False  # a JSON line ends any key block begun in plain text
        kinds: list[str] = []
        redacted = _redact_json(value, kinds)
        return (_dump_json(redacted) if kinds else line), kinds

    return redact_line


def _split_ending(raw: str) -> tuple[str, str]:
    body = raw.rstrip("\r\n")
    return body, raw[len(body) :]


def _open_text(path: Path, mode: str) -> TextIO:
    # surrogateescape round-trips bytes that are not UTF-8 instead of failing midway.
    return open(path, mode, encoding="utf-8", errors="surrogateescape", newline="")


def _process(src: Path, out: TextIO | None) -> ScanReport:
    """Stream ``src`` line by line, collecting findings and writing to ``out`` if given."""
    redact_line = _json_lines() if src.suffix.lower() == ".jsonl" else _TextLines()
    report = ScanReport()
    with _open_text(src, "r") as lines:
        for number, raw in enumerate(lines, start=1):
            body, ending = _split_ending(raw)
            redacted, kinds = redact_line(body)
            report.findings += [Finding(str(src), number, kind) for kind in kinds]
            report.lines_scanned = number
            if out is not None and redacted is not None:
                out.write(redacted + ending)
    return report


def _input_path(path: str | os.PathLike[str]) -> Path:
    src = Path(path)
    if not src.exists():
        raise FinesmithError(f"input file not found: {src} (check the path, or create the file first)")
    if not src.is_file():
        raise FinesmithError(f"input is not a regular file: {src} (pass a text or .jsonl file)")
    return src


def _exists_error(dst: Path) -> FinesmithError:
    return FinesmithError(f"output file already exists: {dst} (delete it or choose another output path)")


def _output_path(src: Path, path: str | os.PathLike[str]) -> Path:
    dst = Path(path)
    if dst.resolve() == src.resolve() or (dst.exists() and os.path.samefile(dst, src)):
        raise FinesmithError(
            f"output is the same file as the input: {dst} "
            "(choose a different output path; redaction never overwrites its input)"
        )
    if dst.exists() or dst.is_symlink():
        raise _exists_error(dst)
    if not dst.parent.is_dir():
        raise FinesmithError(
            f"output directory does not exist: {dst.parent} (create it or choose another output path)"
        )
    return dst


def _io_error(action: str, path: Path, exc: OSError) -> FinesmithError:
    return FinesmithError(f"cannot {action} {path}: {exc.strerror} (check its permissions and free space)")


def scan_file(path: str | os.PathLike[str]) -> ScanReport:
    """Scan a file line by line; ``.jsonl`` string values are scanned inside the JSON.

    Raises ``FinesmithError`` if the file does not exist. The report holds kinds and
    line numbers only, never the values.
    """
    src = _input_path(path)
    try:
        return _process(src, None)
    except OSError as exc:
        raise _io_error("read", src, exc) from exc


def redact_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> ScanReport:
    """Write a redacted copy of ``src`` to ``dst`` and report what was replaced.

    ``.jsonl`` lines keep their structure and keys (string values are redacted);
    other files are redacted as plain text. Line endings are preserved. Raises
    ``FinesmithError`` if ``src`` is missing, ``dst`` is ``src`` or ``dst`` exists;
    ``dst`` is never left half-written.
    """
    source = _input_path(src)
    target = _output_path(source, dst)
    try:
        out = _open_text(target, "x")  # "x": never clobber a file created meanwhile
    except FileExistsError as exc:
        raise _exists_error(target) from exc
    except OSError as exc:
        raise _io_error("create", target, exc) from exc
    try:
        with out:
            return _process(source, out)
    except BaseException as exc:  # includes Ctrl-C: never leave a partial copy behind
        target.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _io_error("redact", source, exc) from exc
        raise
