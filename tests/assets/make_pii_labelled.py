"""Generate ``pii_labelled.jsonl``: labelled support/chat lines for the PII scanner.

Deterministic (fixed seed): ``python tests/assets/make_pii_labelled.py`` rewrites the
file byte for byte. Each line is ``{"text": ..., "labels": [{"kind", "value"}]}``.

Templates hold slots such as ``{EMAIL}`` (a labelled positive) or ``{VER4}`` (an
unlabelled look-alike that a naive scanner would flag). Values are built from
their own rules (Luhn, mod-97, numbering plans, token formats), never from the
scanner, so the file measures the scanner rather than mirrors it.
"""

from __future__ import annotations

import base64
import json
import random
import re
import string
import uuid
from pathlib import Path

SEED = 20240315
INSTANCES = 3  # each template is filled this many times with fresh values
OUT = Path(__file__).with_name("pii_labelled.jsonl")

rng = random.Random(SEED)
ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits
B64URL = ALNUM + "-_"


def digits(n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def chars(alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


# --- people -----------------------------------------------------------------

FIRST = """alice bob carlos dana elif farah gustav hana ivan julia kenji lena mateo nora omar
priya quentin rosa sven tariq uma victor wei ximena yusuf zoe""".split()
LAST = """smith garcia muller dubois rossi jansen novak tanaka okafor silva kowalski nguyen
larsen meyer oconnor haddad petrov moreau""".split()
DOMAINS = """example.com example.org example.net acme-corp.io northwind.de contoso.co.uk
mail.fabrikam.fr globex.com.au initech.nl support.umbrella.it hooli.dev""".split()


def name() -> str:
    return f"{rng.choice(FIRST).title()} {rng.choice(LAST).title()}"


def email() -> str:
    f, l, d = rng.choice(FIRST), rng.choice(LAST), rng.choice(DOMAINS)
    forms = [
        f"{f}.{l}@{d}",
        f"{f[0]}{l}@{d}",
        f"{f}+{rng.choice(['billing', 'test', 'news', 'ops'])}@{d}",
        f"{f}_{l}{digits(2)}@{d}",
        f"{l}.{f[0]}@eu.{d}",
        f"{f.title()}.{l.title()}@{d.title()}",
    ]
    return rng.choice(forms)


# --- phones -----------------------------------------------------------------


def phone_us() -> str:
    a = rng.choice(["212", "310", "415", "503", "617", "646", "702", "713", "808", "917"])
    e = rng.choice(["555", str(rng.randint(200, 999))])
    n = f"01{digits(2)}"
    forms = [
        f"({a}) {e}-{n}",
        f"{a}-{e}-{n}",
        f"{a}.{e}.{n}",
        f"+1 {a} {e} {n}",
        f"+1 ({a}) {e}-{n}",
        f"+1-{a}-{e}-{n}",
        f"1-800-{e}-{n}",
        f"{a} {e} {n}",
    ]
    return rng.choice(forms)


def pairs(n: int) -> str:
    return " ".join(digits(2) for _ in range(n))


def phone_eu() -> str:
    forms = [
        lambda: f"+44 20 7946 0{digits(3)}",
        lambda: f"+44 7700 900{digits(3)}",
        lambda: f"020 7946 0{digits(3)}",
        lambda: f"07700 900{digits(3)}",
        lambda: f"0161 496 0{digits(3)}",
        lambda: f"+44 (0)20 7946 0{digits(3)}",
        lambda: f"+49 30 {digits(8)}",
        lambda: f"+49 151 {digits(8)}",
        lambda: f"030 {digits(8)}",
        lambda: f"089 {digits(7)}",
        lambda: f"+33 1 {pairs(4)}",
        lambda: f"+33 6 {pairs(4)}",
        lambda: f"06 {pairs(4)}",
        lambda: "01." + ".".join(digits(2) for _ in range(4)),
        lambda: f"+31 20 {digits(3)} {digits(4)}",
        lambda: f"06 {digits(8)}",
        lambda: f"+353 1 {digits(3)} {digits(4)}",
        lambda: f"+34 912 {digits(3)} {digits(3)}",
        lambda: f"+39 02 {digits(4)} {digits(4)}",
        lambda: f"+41 44 {digits(3)} {digits(2)} {digits(2)}",
        lambda: f"+32 2 {digits(3)} {digits(2)} {digits(2)}",
        lambda: f"+46 8 {digits(3)} {digits(3)} {digits(2)}",
        lambda: f"0151/{digits(8)}",
        lambda: f"030/{digits(7)}",
        lambda: f"+44 (0) 20 7946 0{digits(3)}",
        lambda: f"0800 123 {digits(4)}",
    ]
    return rng.choice(forms)()


def phone_world() -> str:
    forms = [
        lambda: f"+61 2 {digits(4)} {digits(4)}",
        lambda: f"+91 98{digits(3)} {digits(5)}",
        lambda: f"+81 3-{digits(4)}-{digits(4)}",
        lambda: f"+55 11 9{digits(4)}-{digits(4)}",
        lambda: f"+4915{digits(9)}",
        lambda: f"+447700900{digits(3)}",
        lambda: f"+1{rng.choice(['415', '646', '312'])}555{digits(4)}",
    ]
    return rng.choice(forms)()


def phone() -> str:
    return rng.choice([phone_us, phone_eu, phone_world, phone_eu])()


# --- cards ------------------------------------------------------------------


def luhn_digit(partial: str) -> str:
    """The check digit that makes ``partial + digit`` pass Luhn."""
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:  # these positions are doubled once the check digit is appended
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def card_digits(valid: bool = True) -> str:
    prefix, length = rng.choice(
        [("4", 16), ("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16),
         ("34", 15), ("37", 15), ("6011", 16), ("3530", 16), ("4", 13), ("62", 19)]
    )  # fmt: skip
    partial = prefix + digits(length - len(prefix) - 1)
    check = luhn_digit(partial)
    if not valid:
        check = str((int(check) + rng.randint(1, 9)) % 10)
    return partial + check


def group_card(number: str, sep: str) -> str:
    if len(number) == 15:  # Amex 4-6-5
        return sep.join([number[:4], number[4:10], number[10:]])
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


def card(valid: bool = True) -> str:
    number = card_digits(valid)
    return rng.choice([number, group_card(number, " "), group_card(number, "-"), group_card(number, " ")])


# --- IBANs ------------------------------------------------------------------

IBAN_BBAN = {
    "DE": lambda: digits(18),
    "GB": lambda: rng.choice(["NWBK", "BARC", "HBUK", "LOYD"]) + digits(14),
    "FR": lambda: digits(23),
    "NL": lambda: rng.choice(["ABNA", "INGB", "RABO"]) + digits(10),
    "ES": lambda: digits(20),
    "IT": lambda: rng.choice("XABC") + digits(22),
    "BE": lambda: digits(12),
    "CH": lambda: digits(17),
    "AT": lambda: digits(16),
    "PL": lambda: digits(24),
    "IE": lambda: rng.choice(["AIBK", "BOFI"]) + digits(14),
    "SE": lambda: digits(20),
    "NO": lambda: digits(11),
    "DK": lambda: digits(14),
    "PT": lambda: digits(21),
    "FI": lambda: digits(14),
}


def iban_check(country: str, bban: str) -> str:
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{98 - int(numeric) % 97:02d}"


def iban(spaced: bool | None = None, valid: bool = True) -> str:
    country = rng.choice(sorted(IBAN_BBAN))
    bban = IBAN_BBAN[country]()
    check = iban_check(country, bban)
    if not valid:
        check = f"{(int(check) + rng.randint(1, 50)) % 100:02d}"
    compact = country + check + bban
    if spaced is None:
        spaced = rng.random() < 0.7
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4)) if spaced else compact


# --- IP addresses -----------------------------------------------------------


def ipv4() -> str:
    forms = [
        lambda: f"192.0.2.{rng.randint(1, 254)}",
        lambda: f"198.51.100.{rng.randint(1, 254)}",
        lambda: f"203.0.113.{rng.randint(1, 254)}",
        lambda: f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        lambda: f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        lambda: f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        lambda: rng.choice(["8.8.8.8", "1.1.1.1", "81.2.69.160", "34.117.59.81", "151.101.1.69"]),
    ]
    return rng.choice(forms)()


def hexgroup() -> str:
    return format(rng.randint(1, 0xFFFF), "x")


def ipv6() -> str:
    forms = [
        lambda: f"2001:db8::{hexgroup()}",
        lambda: f"2001:db8:{hexgroup()}:{hexgroup()}::{hexgroup()}",
        lambda: "2001:0db8:85a3:0000:0000:8a2e:0370:" + format(rng.randint(0, 0xFFFF), "04x"),
        lambda: f"fe80::{hexgroup()}:{hexgroup()}:{hexgroup()}:{hexgroup()}",
        lambda: f"2606:4700:{hexgroup()}::{hexgroup()}",
    ]
    return rng.choice(forms)()


# --- API keys and private keys ----------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt() -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = {"sub": digits(8), "name": name(), "iat": 1700000000 + rng.randint(0, 9999999)}
    return f"{header}.{b64url(json.dumps(payload).encode())}.{chars(B64URL, 43)}"


API_KEYS = {
    "AWS": lambda: rng.choice(["AKIA", "ASIA"]) + chars(UPPER_DIGITS, 16),
    "GITHUB": lambda: rng.choice(["ghp_", "gho_"]) + chars(ALNUM, 36),
    "GITHUB_PAT": lambda: f"github_pat_{chars(ALNUM, 22)}_{chars(ALNUM, 59)}",
    "SLACK": lambda: f"xox{rng.choice('bp')}-{digits(11)}-{digits(12)}-{chars(ALNUM, 24)}",
    "STRIPE": lambda: rng.choice(["sk_live_", "rk_live_", "sk_test_"]) + chars(ALNUM, 24),
    "OPENAI": lambda: rng.choice(["sk-", "sk-proj-"]) + chars(ALNUM, 48),
    "ANTHROPIC": lambda: "sk-ant-api03-" + chars(B64URL, 93) + "AA",
    "GOOGLE": lambda: "AIza" + chars(B64URL, 35),
    "HF": lambda: "hf_" + chars(string.ascii_letters, 34),
    "JWT": jwt,
    "BEARER": lambda: chars(ALNUM, rng.randint(32, 40)),
}


def pem_escaped() -> str:
    """A PEM block as it appears in .env files and JSON: one line, literal \\n escapes."""
    return pem().replace("\n", "\\n")


def ean13() -> str:
    body = rng.choice(["40", "41", "42", "43", "50", "54"]) + digits(10)
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body))
    return body + str((10 - total % 10) % 10)


def pem(kind: str | None = None) -> str:
    kind = kind or rng.choice(["RSA PRIVATE KEY", "EC PRIVATE KEY", "PRIVATE KEY", "ENCRYPTED PRIVATE KEY"])
    raw = base64.b64encode(rng.randbytes(rng.randint(150, 400))).decode()
    body = "\n".join(raw[i : i + 64] for i in range(0, len(raw), 64))
    return f"-----BEGIN {kind}-----\n{body}\n-----END {kind}-----"


# --- look-alikes (never labelled) -------------------------------------------


def n(lo: int, hi: int) -> str:
    return str(rng.randint(lo, hi))


def n2(lo: int, hi: int) -> str:
    return n(lo, hi).zfill(2)


NEGATIVES = {
    "VER4": lambda: f"{n(1, 12)}.{n(0, 9)}.{n(0, 20)}.{n(0, 200)}",
    "VER5": lambda: f"{n(1, 9)}.{n(0, 9)}.{n(0, 9)}.{n(0, 9)}.{n(0, 99)}",
    "SEMVER": lambda: f"{n(0, 9)}.{n(0, 30)}.{n(0, 20)}",
    "WINBUILD": lambda: f"10.0.{n(19041, 22631)}.{n(1000, 4000)}",
    "CHROME": lambda: f"{n(110, 125)}.0.{n(5000, 6400)}.{n(10, 200)}",
    "DATE": lambda: rng.choice(
        [f"2024-{n2(1, 12)}-{n2(1, 28)}", f"{n2(1, 28)}/{n2(1, 12)}/2024",
         f"{n2(1, 12)}/{n2(1, 28)}/2023", f"{n2(1, 28)}.{n2(1, 12)}.2024"]
    ),
    "TIMESTAMP": lambda: f"2024-{n2(1, 12)}-{n2(1, 28)}T{n2(0, 23)}:{n2(0, 59)}:{n2(0, 59)}Z",
    "TIME": lambda: rng.choice([f"{n2(0, 23)}:{n2(0, 59)}", f"{n2(0, 23)}:{n2(0, 59)}:{n2(0, 59)}"]),
    "ORDER": lambda: f"ORD-2024-{digits(6)}",
    "AMAZON_ORDER": lambda: f"{digits(3)}-{digits(7)}-{digits(7)}",
    "INVOICE": lambda: f"INV-{digits(5)}",
    "UPS": lambda: f"1Z{chars(UPPER_DIGITS, 6)}{digits(10)}",
    "USPS": lambda: "9400 " + " ".join(digits(4) for _ in range(4)) + " " + digits(2),
    "FEDEX": lambda: f"{digits(4)} {digits(4)} {digits(4)}",
    "BADCARD": lambda: card(valid=False),
    "BADCARD16": lambda: _bad16(),
    "SKU_PHONE": lambda: f"{n(200, 999)}-{n(200, 999)}-{digits(4)}",
    "SHA": lambda: chars("0123456789abcdef", 40),
    "SHORTSHA": lambda: chars("0123456789abcdef", rng.choice([7, 8, 12])),
    "UUID": lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
    "PRICE": lambda: rng.choice(
        [f"${n(1, 9)},{digits(3)}.{digits(2)}", f"€{n(1, 999)},{digits(2)}", f"£{n(1, 99)}.{digits(2)}",
         f"USD {n(10, 99)},{digits(3)}.00", f"{n(1, 9)} {digits(3)},00 €"]
    ),
    "ISBN13": lambda: rng.choice(
        ["978-3-16-148410-0", "978-0-306-40615-7", "978-1-4028-9462-6", "9780306406157"]
    ),
    "ISBN10": lambda: rng.choice(["0-306-40615-2", "0-19-852663-6", "1-4028-9462-7"]),
    "IMEI": lambda: _imei(),
    "MAC": lambda: ":".join(chars("0123456789abcdef", 2) for _ in range(6)),
    "HEXCOLOR": lambda: "#" + chars("0123456789abcdef", 6),
    "EPOCH": lambda: str(rng.randint(1_600_000_000, 1_750_000_000)),
    "EPOCH_MS": lambda: str(rng.randint(1_600_000_000_000, 1_750_000_000_000)),
    "FLOAT": lambda: f"0.{digits(16)}",
    "BADIBAN": lambda: iban(valid=False),
    "BIC": lambda: rng.choice(["DEUTDEFF", "COBADEFFXXX", "NWBKGB2L", "BNPAFRPPXXX", "INGBNL2A"]),
    "BADIP": lambda: rng.choice(
        [f"256.{n(0, 255)}.{n(0, 255)}.{n(0, 255)}", f"192.168.{n(0, 255)}.{n(256, 999)}", f"10.0.{n(0, 9)}"]
    ),
    "ZIP4": lambda: f"{n(10000, 99999)}-{digits(4)}",
    "LONGNUM": lambda: "1" + digits(rng.randint(19, 24)),
    "PORT": lambda: str(rng.choice([22, 443, 3000, 5432, 6379, 8000, 8080, 8443])),
    "EAN": lambda: ean13(),
    "B64": lambda: base64.b64encode(rng.randbytes(60)).decode(),
    "LICENSE": lambda: "-".join(chars(UPPER_DIGITS, 5) for _ in range(5)),
    "SECTION": lambda: f"{n(1, 9)}.{n(1, 9)}.{n(1, 9)}.{n(1, 9)}",
}


def _bad16() -> str:
    number = card_digits(valid=False)
    return group_card(number, " ") if rng.random() < 0.5 else number


def _imei() -> str:
    body = "35" + digits(12)
    return body + luhn_digit(body)


# Slot name -> (kind or None for look-alikes, generator)
SLOTS: dict[str, tuple[str | None, object]] = {
    "EMAIL": ("EMAIL", email),
    "PHONE": ("PHONE", phone),
    "PHONE_US": ("PHONE", phone_us),
    "PHONE_EU": ("PHONE", phone_eu),
    "PHONE_WORLD": ("PHONE", phone_world),
    "CARD": ("CREDIT_CARD", card),
    "IBAN": ("IBAN", iban),
    "IBAN_COMPACT": ("IBAN", lambda: iban(spaced=False)),
    "IPV4": ("IP_ADDRESS", ipv4),
    "IPV6": ("IP_ADDRESS", ipv6),
    "PEM": ("PRIVATE_KEY", pem),
    "PEM_SSH": ("PRIVATE_KEY", lambda: pem("OPENSSH PRIVATE KEY")),
    "PEM_ESCAPED": ("PRIVATE_KEY", pem_escaped),
    **{key: ("API_KEY", make) for key, make in API_KEYS.items()},
    **{key: (None, make) for key, make in NEGATIVES.items()},
    "NAME": (None, name),
}

TEMPLATES = """
# ---- EMAIL
Hi, please send the invoice to {EMAIL} instead of my old address.
From: {NAME} <{EMAIL}>
Can you CC {EMAIL} and {EMAIL} on this ticket?
my email is {EMAIL} thanks!!
User {EMAIL} cannot reset their password (error 403) since {DATE}.
Contact: {EMAIL} | Plan: Pro | Seats: 25 | Renewal: {DATE}
The reply-to header was set to <{EMAIL}>, which bounced.
Link in the footer: mailto:{EMAIL}?subject=Refund%20request
Login failed for {EMAIL} at {TIMESTAMP} from {IPV4}.
Please remove {EMAIL} from the mailing list, they left the company.
Hey team, {NAME} here ({EMAIL}). The export still fails on v{SEMVER}.
{"user": {"email": "{EMAIL}", "plan": "team", "created": "{TIMESTAMP}"}}
row 42: {NAME},{EMAIL},{DATE},{PRICE}
Forwarding from {EMAIL}: "the dashboard shows {PRICE} but I paid less"
# ---- PHONE
You can reach me at {PHONE} after 5pm.
Call-back number: {PHONE}
Customer phone {PHONE_US}, prefers SMS over email.
Our office line is {PHONE_US} (ext. 204) if the mobile is off.
Tel: {PHONE_EU} / Fax: {PHONE_EU}
Please call {PHONE} or {PHONE} if it's urgent.
{PHONE_US} called three times today about order {ORDER}.
WhatsApp: {PHONE_WORLD}
The number on file is {PHONE}; the new one is {PHONE}.
Rückruf bitte unter {PHONE_EU}, ich bin bis 18 Uhr erreichbar.
Merci de me rappeler au {PHONE_EU} demain matin.
Driver said he'd call {PHONE_US} when the parcel {UPS} is at the gate.
Hotline {PHONE_WORLD} is not reachable from abroad.
emergency contact: {NAME}, {PHONE}
Festnetz {PHONE_EU}, mobil {PHONE_EU}.
Mobile {PHONE_US}. Landline {PHONE_EU}.
# ---- CREDIT_CARD
I was charged twice on my card {CARD}.
Please refund to the original card, {CARD}, not store credit.
payment_method: {CARD} exp 09/27
Can you update billing to {CARD}? Expiry 11/26, the old one expired.
The checkout form rejected {CARD} but my bank says it's fine.
Card used for order {ORDER}: {CARD}
Dispute: transaction of {PRICE} on {CARD} on {DATE}.
The customer read out {CARD} over the phone, please purge the recording.
Card: {CARD} / CVV 123 / name on card {NAME}
Two cards on the account: {CARD} (expired) and {CARD}.
# ---- IBAN
Please wire the refund to IBAN {IBAN}.
Bank details: {IBAN} (BIC {BIC})
My IBAN is {IBAN_COMPACT}
Account holder: {NAME}, IBAN: {IBAN}
Überweisung bitte auf {IBAN}, danke!
The SEPA mandate lists {IBAN} but payments go to {IBAN} now.
Refund of {PRICE} should go to {IBAN} per invoice {INVOICE}.
# ---- IP_ADDRESS
Login attempts from {IPV4} were blocked by the WAF.
The server at {IPV4}:{PORT} times out since the update to {SEMVER}.
Please allowlist {IPV4}/32 for our office.
curl http://{IPV4}:8080/health returns 502
ssh deploy@{IPV4} -p 2222 hangs after the banner.
Our egress IPs are {IPV4}, {IPV4} and {IPV4}.
IPv6 client {IPV6} hit the rate limit at {TIME}.
listen [{IPV6}]:443 ssl; is in our nginx.conf
ping {IPV4} works but DNS lookups fail.
X-Forwarded-For: {IPV4}, {IPV4}
Node {IPV4} rejoined the cluster after the restart.
The VPN assigns {IPV4} to the client; gateway is {IPV4}.
Traffic from {IPV6} spiked at {TIMESTAMP}.
DNS A record for api.example.com now points to {IPV4} (was {IPV4}).
See {IPV4} (primary) and {IPV4} (replica) in the runbook.
# ---- API_KEY
export AWS_ACCESS_KEY_ID={AWS}
I accidentally pasted my token {GITHUB} in the public issue, can you delete it?
GITHUB_TOKEN={GITHUB_PAT}
SLACK_BOT_TOKEN={SLACK}
stripe.api_key = "{STRIPE}"
OPENAI_API_KEY={OPENAI} stopped working yesterday
https://maps.googleapis.com/maps/api/geocode/json?address=Berlin&key={GOOGLE}
huggingface-cli login --token {HF}
Authorization: Bearer {BEARER}
curl -H 'Authorization: Bearer {JWT}' https://api.example.com/v1/me
the session cookie is {JWT} if that helps debugging
Our CI logs printed {AWS} and {STRIPE}, please rotate both.
config.yaml has token: {HF} and model revision {SHORTSHA}
ANTHROPIC_API_KEY={ANTHROPIC}
{"slack_token": "{SLACK}", "channel": "#alerts", "since": "{DATE}"}
# ---- PRIVATE_KEY
Here is the key I'm using:\n{PEM}\nIt fails with 'invalid format'.
{PEM}
deploy key (please rotate it): {PEM}
cat ~/.ssh/id_ed25519 gives:\n{PEM_SSH}
The helm values contain tls.key: "{PEM}" and tls.crt (cert attached)
PRIVATE_KEY="{PEM_ESCAPED}"
{"type": "service_account", "private_key": "{PEM_ESCAPED}", "client_email": "{EMAIL}"}
ssh-add says "invalid format" for this one:\n\n{PEM_SSH}\n\nany idea?
# ---- look-alikes only
The app version {VER4} crashes on startup.
Please upgrade to v{VER4} or later.
Firmware {VER4} fixed the Wi-Fi drop.
Build {VER5} is the nightly from {DATE}.
Release {VER4}-beta is out, changelog attached.
We upgraded from {VER4} to {VER4} and nothing changed.
pip install package=={VER4} fails on Python {SEMVER}.
Windows {WINBUILD}, Chrome {CHROME}
The ticket was opened on {DATE} at {TIME} and closed {TIMESTAMP}.
Order {ORDER} shipped on {DATE} via UPS {UPS}.
USPS tracking {USPS} shows delivered.
FedEx tracking number {FEDEX} is stuck in Memphis.
Amazon order # {AMAZON_ORDER} arrived damaged.
Invoice {INVOICE} for {PRICE} is due on {DATE}.
The card number {BADCARD} was rejected as invalid.
Reference: {BADCARD16}
SKU {SKU_PHONE} is out of stock until {DATE}.
Part number: {SKU_PHONE} (replacement hinge)
Fixed in commit {SHA}, see PR #4821.
Bisected to {SHORTSHA}; reverting {SHORTSHA} fixes it.
Request id {UUID} failed at {TIMESTAMP}.
trace_id={UUID} span_id={SHORTSHA}
Total: {PRICE} incl. VAT, shipping {PRICE}.
The book (ISBN {ISBN13}) and the old edition (ISBN {ISBN10}) both show as missing.
IMEI {IMEI} is blacklisted by the carrier.
Device MAC {MAC} cannot join the network.
Brand colour is {HEXCOLOR}, not {HEXCOLOR}.
created_at: {EPOCH}, updated_at: {EPOCH_MS}
loss={FLOAT} lr=0.0003 step=1200
Our IBAN check says {BADIBAN} is invalid - typo?
BIC {BIC} is correct, the IBAN is still pending.
Config had 'host: {BADIP}', which is not a valid address.
Ship to 500 Main St, Springfield, ZIP {ZIP4}.
Account reference {LONGNUM} appears on the statement.
Meeting moved to {DATE} {TIME}; dial-in code 482 913.
The log line was '{TIMESTAMP} INFO worker-3 done in 1.234s'.
Port {PORT} is open; the health check hits /v1/status every 30 s.
As described in section {SECTION} of the SLA, credits apply after 4 h.
EAN {EAN} and {EAN} are the same product in two colours.
The avatar came back as data:image/png;base64,{B64} and broke the layout.
Licence key {LICENSE} says it is already activated.
The import grew the table by +10 000 000 rows overnight.
Total 1 234 567 items indexed at {TIME}, {VER4} of the indexer.
"""

# Fixed, hand-written look-alikes and mixed lines: (text, labels).
FIXED: list[tuple[str, list[tuple[str, str]]]] = [
    ("Clone it with git clone git@github.com:acme/widgets.git and run make.", []),
    ("The retina asset is logo@2x.png, the normal one logo.png.", []),
    ("@maria can you take this one? @devops FYI", []),
    ("npm i lodash@4.17.21 fixed the prototype pollution warning.", []),
    ("Mail goes to user@localhost in the dev container.", []),
    ("Write to support at example dot com, not to me directly.", []),
    ("We use scikit-learn (sk-learn) 1.4.2 for the baseline.", []),
    ("Put your key in AWS_ACCESS_KEY_ID=AKIAXXXXXXXXXXXXXXXX and never commit it.", []),
    ("STRIPE_KEY=sk_live_xxxxxxxxxxxxxxxxxxxxxxxx (placeholder in the docs)", []),
    ("Send the header Authorization: Bearer <token> with every request.", []),
    ("Use Authorization: Bearer YOUR_ACCESS_TOKEN_HERE in Postman.", []),
    ("Bearer authentication is required for the /v2 endpoints.", []),
    ("The file starts with -----BEGIN PUBLIC KEY----- so it is the public half.", []),
    ("-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBaMQswCQYDVQQGEwJJ\n-----END CERTIFICATE-----", []),
    ("std::vector<int> crashes when resized inside the loop.", []),
    ("Use arr[1::2] to take every other element.", []),
    ("Ruby constant lookup Foo::Bar::Baz is failing after the upgrade.", []),
    ("Coordinates 40.7128, -74.0060 are outside the delivery area.", []),
    ("Growth was +12.5% QoQ, churn -0.8%.", []),
    ("Version 1.2.3.4 of the agent is deprecated.", []),
    ("Requires libfoo >= 2.4.1.0 and bar ~= 3.0.0.1", []),
    ("Kernel 5.15.0.91 and driver 535.104.05 installed.", []),
    ("The error code is 0x80070005 (access denied).", []),
    ("Sort code 20-00-00, account 55779911 (UK domestic).", []),
    ("SSN fields like 078-05-1120 must never be collected.", []),
    ("Between 9:00 and 17:30 CET, Mon-Fri.", []),
    ("Room 204, building 3, floor 2.", []),
    ("Serial number: 0402 1234 5678 on the back label.", []),
    ("order no. 030 1234 5678 was split into two parcels.", []),
    ("Dates like 05 06 2024 in the CSV are ambiguous.", []),
    ("Our API rate limit is 1000 requests per 60 seconds.", []),
    ("Docker image sha256:9fceb02d0ae598e95dc970b74767f19372d61af8a3e4b2c1d0e9f8a7b6c5d4e3 pulled.", []),
    ("The MAC 00:1A:2B:3C:4D:5E and time 10:30:45 are in the log.", []),
    ("Python 3.11.4 on macOS 14.2.1, pip 23.3.1", []),
    ("Delivery window 21.5.2024 - 24.5.2024, slot 08:00-12:00.", []),
    ("Screen resolution 2560x1440 at 144 Hz, model XG27AQ-555-1234.", []),
    ("Backup ran at 2024-03-15 02:00:00 and took 00:42:17.", []),
    ("Bump numpy from 1.26.4.0 to 2.0.0.1 in requirements.", []),
    ("Order ORD-2024-001234 and ORD-2024-001235 were merged.", []),
    ("The EAN 4006381333931 is printed under the barcode.", []),
    # mixed positives and look-alikes
    ("Ticket #48213 from jane.doe@example.com: app v2.3.1.4 crashes on 2024-03-15, call me on +44 20 7946 0958.",
     [("EMAIL", "jane.doe@example.com"), ("PHONE", "+44 20 7946 0958")]),
    ("Server 10.0.0.12 runs build 4.2.0.1; the client 192.168.1.20 on version 1.2.3.4 fails.",
     [("IP_ADDRESS", "10.0.0.12"), ("IP_ADDRESS", "192.168.1.20")]),
    ("Card 4111 1111 1111 1111 was declined; the order ORD-2024-004411 is on hold.",
     [("CREDIT_CARD", "4111 1111 1111 1111")]),
    ("Payout to DE89 3704 0044 0532 0130 00 of €1.299,00 on 15/03/2024.",
     [("IBAN", "DE89 3704 0044 0532 0130 00")]),
    ("Reach +1 (415) 555-0132 or admin@example.org; backup host 2001:db8::1.",
     [("PHONE", "+1 (415) 555-0132"), ("EMAIL", "admin@example.org"), ("IP_ADDRESS", "2001:db8::1")]),
    ("ssh root@203.0.113.7 then run ./deploy.sh --version 3.1.4.1",
     [("IP_ADDRESS", "203.0.113.7")]),
    ("AWS example key AKIAIOSFODNN7EXAMPLE appears in our docs and in prod config.",
     [("API_KEY", "AKIAIOSFODNN7EXAMPLE")]),
    ("Call me at 020 7946 0958 24/7 if the node at 10.1.2.3 goes down.",
     [("PHONE", "020 7946 0958"), ("IP_ADDRESS", "10.1.2.3")]),
    ("My new number is 06 12 34 56 78 and my IBAN FR14 2004 1010 0505 0001 3M02 606.",
     [("PHONE", "06 12 34 56 78"), ("IBAN", "FR14 2004 1010 0505 0001 3M02 606")]),
    ("Stripe test card 4242424242424242, exp 12/34, CVC 123, zip 94105.",
     [("CREDIT_CARD", "4242424242424242")]),
    ("Amex 3782 822463 10005 was charged USD 1,250.00 for ORD-2024-000987.",
     [("CREDIT_CARD", "3782 822463 10005")]),
    ("GB82 WEST 1234 5698 7654 32 is the account for UK refunds.",
     [("IBAN", "GB82 WEST 1234 5698 7654 32")]),
    ("Loopback 127.0.0.1 works, the LAN address 192.168.0.15 does not.",
     [("IP_ADDRESS", "127.0.0.1"), ("IP_ADDRESS", "192.168.0.15")]),
    ("tel:+4930123456789 is in the signature of bob@northwind.de",
     [("PHONE", "+4930123456789"), ("EMAIL", "bob@northwind.de")]),
    # hard cases, labelled before the scanner ever saw them
    ("Please call me on 07911 123456 tomorrow.", [("PHONE", "07911 123456")]),
    ("My number changed to +49 (0)30 901820.", [("PHONE", "+49 (0)30 901820")]),
    ("Fax +33 (0)1 42 68 53 00", [("PHONE", "+33 (0)1 42 68 53 00")]),
    ("US support: 1 (800) 555-0175, EU support: +31 20 794 0000",
     [("PHONE", "1 (800) 555-0175"), ("PHONE", "+31 20 794 0000")]),
    ("Text me: 415.555.0123!", [("PHONE", "415.555.0123")]),
    ("Phone: +1-212-555-0147 x 33", [("PHONE", "+1-212-555-0147")]),
    ("Call 555-0199 and ask for Dave.", [("PHONE", "555-0199")]),
    ("Ticket INC0012345 opened; callback 0044 20 7946 0321", [("PHONE", "0044 20 7946 0321")]),
    ("patient DOB 04/07/1985, phone 212-555-0198", [("PHONE", "212-555-0198")]),
    ("Reach out to J.Smith@Company-Mail.com or jsmith@company.mail.example.com.",
     [("EMAIL", "J.Smith@Company-Mail.com"), ("EMAIL", "jsmith@company.mail.example.com")]),
    ("email: o'brien@example.ie", [("EMAIL", "o'brien@example.ie")]),
    ('Send to "Max Mustermann" <max.mustermann@beispiel.de>', [("EMAIL", "max.mustermann@beispiel.de")]),
    ("Server IPs 10.0.0.1-10.0.0.9 are reserved.", [("IP_ADDRESS", "10.0.0.1"), ("IP_ADDRESS", "10.0.0.9")]),
    ("nslookup returned 2a03:2880:f12f:83:face:b00c:0:25de", [("IP_ADDRESS", "2a03:2880:f12f:83:face:b00c:0:25de")]),
    ("IPv4 1.1.1.1 and IPv6 2606:4700:4700::1111 are Cloudflare DNS",
     [("IP_ADDRESS", "1.1.1.1"), ("IP_ADDRESS", "2606:4700:4700::1111")]),
    ("Firmware v3.2.0.15 for the 192.168.0.1 router", [("IP_ADDRESS", "192.168.0.1")]),
    ("Card number: 5555 5555 5555 4444 (Mastercard test)", [("CREDIT_CARD", "5555 5555 5555 4444")]),
    ("Visa 4012888888881881 declined", [("CREDIT_CARD", "4012888888881881")]),
    ("Diners 3056 930902 5904", [("CREDIT_CARD", "3056 930902 5904")]),
    ("Discover 6011 0009 9013 9424", [("CREDIT_CARD", "6011 0009 9013 9424")]),
    ("My card 4111 1111 1111 1112 keeps failing", []),
    ("IBAN: NL91ABNA0417164300", [("IBAN", "NL91ABNA0417164300")]),
    ("iban be68 5390 0754 7034", [("IBAN", "be68 5390 0754 7034")]),
    ("CH93 0076 2011 6238 5295 7", [("IBAN", "CH93 0076 2011 6238 5295 7")]),
    ("Zahlung an AT61 1904 3002 3457 3201 erhalten", [("IBAN", "AT61 1904 3002 3457 3201")]),
    ("token ghp_16C7e42F292c6912E7710c838347Ae178B4a", [("API_KEY", "ghp_16C7e42F292c6912E7710c838347Ae178B4a")]),
    ("x-api-key: AIzaSyA-1234567890abcdefghijklmnopqrstu", [("API_KEY", "AIzaSyA-1234567890abcdefghijklmnopqrstu")]),
    ("Slack token xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
     [("API_KEY", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx")]),
    ("Authorization: bearer 4f3c2a1b-9d8e-4c7b-a6f5-3e2d1c0b9a87", [("API_KEY", "4f3c2a1b-9d8e-4c7b-a6f5-3e2d1c0b9a87")]),
    ("-----BEGIN OPENSSH PRIVATE KEY----- b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW -----END OPENSSH PRIVATE KEY-----",
     [("PRIVATE_KEY", "-----BEGIN OPENSSH PRIVATE KEY----- b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW -----END OPENSSH PRIVATE KEY-----")]),
    ("Chrome 124.0.6367.91 on Windows 11 22H2", []),
    ("Meet at 10.30 on 15.03., room 3.", []),
    ("Order 112-4567890-1234567 and tracking 1Z 999 AA1 01 2345 678 4", []),
    ("price went from 1.299,00 to 1.199,00 after the promo", []),
    ("Lot 0345 2211 9 expires 2025-06", []),
    ("Interest rate 0.0425, account 0012 3456 7890", []),
]

SLOT = re.compile(r"\{([A-Z0-9_]+)\}")


def fill(template: str) -> dict:
    labels: list[dict[str, str]] = []

    def one(match: re.Match[str]) -> str:
        kind, make = SLOTS[match.group(1)]
        value = make()
        if kind:
            labels.append({"kind": kind, "value": value})
        return value

    text = SLOT.sub(one, template.replace("\\n", "\n"))
    return {"text": text, "labels": labels}


def build() -> list[dict]:
    templates = [t for t in TEMPLATES.strip().splitlines() if t and not t.startswith("#")]
    rows = [fill(t) for t in templates for _ in range(INSTANCES)]
    rows += [{"text": text, "labels": [{"kind": k, "value": v} for k, v in labels]} for text, labels in FIXED]
    rng.shuffle(rows)
    return rows


def main() -> None:
    rows = build()
    with OUT.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} lines to {OUT}")


if __name__ == "__main__":
    main()
