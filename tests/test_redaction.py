"""Redaction: built-in detectors, paths, actions, rule order and every configuration error."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
from typing import Any

import orjson
import pytest

from sidecar.redaction import (
    DETECTORS,
    SECRET_DETECTORS,
    Hit,
    RedactionError,
    Redactor,
    build_redactor,
    paths,
)
from sidecar.redaction.detectors import Text, scanner

KEY = b"test-hmac-key-0123456789abcdef"
JWT = (
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)
PRIVATE_KEY = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA75fVn\nq1Wx2Zc\n"
    "-----END RSA PRIVATE KEY-----"
)
SSH2_KEY = (
    "---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----\nSubject: jane\nComment: \"rsa-key-20261124\"\n"
    "P2/56wAAAi4AAAA3aWYtbW9kbntzaWdue3JzYS1wa2NzMS1zaGExfSxlbmNyeXB0e3JzYS\n"
    "---- END SSH2 ENCRYPTED PRIVATE KEY ----"
)
PUTTY_KEY = (
    "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nComment: ed25519-key-20261124\n"
    "Public-Lines: 2\nAAAAC3NzaC1lZDI1NTE5AAAAIHd5\nx0NdmQ==\nPrivate-Lines: 1\n"
    "AAAAIGFzZGZhc2RmYXNkZg==\nPrivate-MAC: 5f1a2b3c4d5e6f708192a3b4c5d6e7f8"
)


def found(detector: str, text: str) -> list[str]:
    return [text[start:end] for start, end in DETECTORS[detector].find(text)]


def event(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"agentId": "agent-1", "prompt": "hello", "response": "hi"}
    base.update(fields)
    return base


def redact(rules: list[dict[str, Any]], ev: dict[str, Any]) -> list[Hit]:
    return build_redactor(rules, KEY).redact(ev)


def tag(value: str | bytes) -> str:
    data = value.encode() if isinstance(value, str) else value
    return "hmac:" + hmac.new(KEY, data, hashlib.sha256).hexdigest()[:16]


# -- detectors -------------------------------------------------------------------------

POSITIVES = [
    ("email", "mail jane.doe@example.com now", ["jane.doe@example.com"]),
    ("email", "a+tag@mail.example.co.uk.", ["a+tag@mail.example.co.uk"]),
    ("email", "<john_smith@x.io>", ["john_smith@x.io"]),
    ("email", "josé@bücher.de", ["josé@bücher.de"]),
    ("email", "a@b.co and c@d.org", ["a@b.co", "c@d.org"]),
    ("phone", "call +1 (415) 555-0132 today", ["+1 (415) 555-0132"]),
    ("phone", "+44 20 7946 0958", ["+44 20 7946 0958"]),
    ("phone", "+44 (0)20 7946 0958", ["+44 (0)20 7946 0958"]),
    ("phone", "tel:+14155550132", ["+14155550132"]),
    ("phone", "+33 1 23 45 67 89", ["+33 1 23 45 67 89"]),
    ("phone", "+1 415 555 0132 123456789", ["+1 415 555 0132"]),
    ("phone", " +1 415 555 0132 0A", ["+1 415 555 0132"]),
    ("phone", "(555) 123-4567", ["(555) 123-4567"]),
    ("phone", "555-123-4567", ["555-123-4567"]),
    ("phone", "555.123.4567", ["555.123.4567"]),
    ("phone", "call 555 123 4567.", ["555 123 4567"]),
    ("phone", "1-800-555-1234", ["1-800-555-1234"]),
    ("phone", "C++ 555-123-4567", ["555-123-4567"]),
    ("credit_card", "card 4111 1111 1111 1111 ok", ["4111 1111 1111 1111"]),
    ("credit_card", "4111-1111-1111-1111", ["4111-1111-1111-1111"]),
    ("credit_card", "4111111111111111", ["4111111111111111"]),
    ("credit_card", "5500 0000 0000 0004", ["5500 0000 0000 0004"]),
    ("credit_card", "amex 3782 822463 10005", ["3782 822463 10005"]),
    ("credit_card", "378282246310005", ["378282246310005"]),
    ("credit_card", "6011111111111117", ["6011111111111117"]),
    ("credit_card", "4111 1111 1111 1111 123 is the cvv", ["4111 1111 1111 1111"]),
    ("credit_card", "id,card\n7,4111111111111111", ["4111111111111111"]),
    # The first read as a 4-4-4-4-3 card, then cut back: the second is still found.
    ("credit_card", "4111 1111 1111 1111 4111 1111 1111 1111",
     ["4111 1111 1111 1111", "4111 1111 1111 1111"]),
    ("iban", "DE89 3704 0044 0532 0130 00", ["DE89 3704 0044 0532 0130 00"]),
    ("iban", "iban:DE89370400440532013000.", ["DE89370400440532013000"]),
    ("iban", "GB82 WEST 1234 5698 7654 32", ["GB82 WEST 1234 5698 7654 32"]),
    ("iban", "NO9386011117947", ["NO9386011117947"]),
    ("iban", "FR1420041010050500013M02606", ["FR1420041010050500013M02606"]),
    ("iban", "DE89 3704 0044 0532 0130 00 ABCD", ["DE89 3704 0044 0532 0130 00"]),
    ("us_ssn", "ssn 123-45-6789", ["123-45-6789"]),
    ("us_ssn", "078-05-1120.", ["078-05-1120"]),
    ("ipv4", "host 10.0.0.1", ["10.0.0.1"]),
    ("ipv4", "192.168.1.254:8080", ["192.168.1.254"]),
    ("ipv4", "dns is 8.8.8.8.", ["8.8.8.8"]),
    ("ipv4", "203.0.113.42/24", ["203.0.113.42"]),
    ("ipv6", "addr 2001:db8::1 up", ["2001:db8::1"]),
    ("ipv6", "fe80::1", ["fe80::1"]),
    ("ipv6", "::1", ["::1"]),
    ("ipv6", "2001:0db8:85a3::8a2e:0370:7334", ["2001:0db8:85a3::8a2e:0370:7334"]),
    ("ipv6", "2001:db8:85a3:0:0:8a2e:370:7334", ["2001:db8:85a3:0:0:8a2e:370:7334"]),
    ("ipv6", "::ffff:192.0.2.1.", ["::ffff:192.0.2.1"]),
    ("ipv6", "[fe80::1]:8080", ["fe80::1"]),
    ("ipv6", "id:2001:db8::7334 up", ["2001:db8::7334"]),
    ("ipv6", "at :2001:db8::7334: ok", ["2001:db8::7334"]),
    # A port written without brackets, or a word after a colon: the address before it.
    ("ipv6", "from 2001:db8::7334:50000 up", ["2001:db8::7334"]),
    ("ipv6", " 2001:db8::7334:0G", ["2001:db8::7334"]),
    ("ipv6", "id:2001:db8::7334:50000", ["2001:db8::7334"]),
    ("ipv6", "db8:::0", ["::0"]),  # after the label, as a whole, before any group is cut
    ("jwt", f"Bearer {JWT}", [JWT]),
    ("precogx_key", "key px_live_abcdefghijklmnop1234", ["px_live_abcdefghijklmnop1234"]),
    ("precogx_key", "px_test_0123456789abcdef", ["px_test_0123456789abcdef"]),
    # Underscores and dashes are part of the key: it was masked up to the first, or not
    # at all when fewer than 16 characters came before it.
    ("precogx_key", "px_live_abc_defghijklmnop-12", ["px_live_abc_defghijklmnop-12"]),
    ("openai_key", "sk-proj-Qw8eRt5yUi2oPa7sDf4gHj1kLz9xCv6bNm3",
     ["sk-proj-Qw8eRt5yUi2oPa7sDf4gHj1kLz9xCv6bNm3"]),
    ("openai_key", "OPENAI_API_KEY=sk-" + "a1" * 24, ["sk-" + "a1" * 24]),
    ("aws_access_key", "AKIAIOSFODNN7EXAMPLE", ["AKIAIOSFODNN7EXAMPLE"]),
    ("aws_access_key", "id=ASIAY34FZKBOKMUTVV7A;", ["ASIAY34FZKBOKMUTVV7A"]),
    ("github_token", "ghp_" + "aB3" * 12, ["ghp_" + "aB3" * 12]),
    ("github_token", "github_pat_11ABCDEFG0123456789_abcdefghijklmnop",
     ["github_pat_11ABCDEFG0123456789_abcdefghijklmnop"]),
    ("aws_secret_key", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     ["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]),
    ("aws_secret_key", "export AWS_SECRET_ACCESS_KEY='wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY'",
     ["wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"]),
    ("aws_secret_key", '{"AccessKeyId": "x", "SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfi'
     'CYEXAMPLEKEY"}', ["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]),
    ("aws_secret_key", "secretAccessKey:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY.",
     ["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]),
    ("slack_token", "xoxb-1234567890-abcdefghijkl", ["xoxb-1234567890-abcdefghijkl"]),
    ("slack_webhook", "post to https://hooks.slack.com/services/T0A1B2C3D/B0A1B2C3D/a1B2c3D4e5"
     " now", ["hooks.slack.com/services/T0A1B2C3D/B0A1B2C3D/a1B2c3D4e5"]),
    ("slack_webhook", "https://hooks.slack.com/triggers/T0A1B2C3D/1234567890/abcdef0123",
     ["hooks.slack.com/triggers/T0A1B2C3D/1234567890/abcdef0123"]),
    ("slack_token", "refresh xoxe-1-My0xLTEyMzQ1Njc4OTAxMi1hYmM",
     ["xoxe-1-My0xLTEyMzQ1Njc4OTAxMi1hYmM"]),
    ("slack_token", "app xapp-1-A0123456789-1234567890123-abcdef0123",
     ["xapp-1-A0123456789-1234567890123-abcdef0123"]),
    ("private_key", f"here:\n{PRIVATE_KEY}\nthanks", [PRIVATE_KEY]),
    ("private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXkt",
     ["-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXkt"]),
    ("private_key", f"my key:\n{PUTTY_KEY}\nwhy does it fail?", [PUTTY_KEY]),
    ("private_key", f"exported:\n{SSH2_KEY}\nok?", [SSH2_KEY]),
    # Cut before its MAC: the rest is key material.
    ("private_key", "PuTTY-User-Key-File-2: ssh-rsa\nEncryption: none\nPrivate-Lines: 1\n"
     "AAABAQCk", ["PuTTY-User-Key-File-2: ssh-rsa\nEncryption: none\nPrivate-Lines: 1\n"
                  "AAABAQCk"]),
]

NEGATIVES = [
    ("email", "@property\ndef name(self): ..."),
    ("email", "ping @alice about it"),
    ("email", "user@localhost"),
    ("email", "a@b"),
    ("email", "npm i react@18.2.0 and pkg@1.2.3"),
    ("email", "y = a.T@b.T"),
    ("email", "email me @ home"),
    ("phone", "order 123456 shipped"),
    ("phone", "on 2026-11-23"),
    ("phone", "in 2024 and 1999"),
    ("phone", "192.168.1.1"),
    ("phone", "version 1.2.3 and 10.4.12"),
    ("phone", "up +1.5%"),
    ("phone", "ISBN 978-3-16-148410-0"),
    ("phone", "ref 12345-123-4567"),
    ("phone", "4111 1111 1111 1111"),
    ("credit_card", "4111 1111 1111 1112"),
    ("credit_card", "4111111111111112"),
    ("credit_card", "ts 1732345678901"),
    ("credit_card", "id 41111111111111111111"),
    ("credit_card", "4111-1111 1111-1111"),
    ("credit_card", "x4111111111111111"),
    ("credit_card", "4111.1111.1111.1111"),
    ("iban", "DE89 3704 0044 0532 0130 01"),
    ("iban", "XX89370400440532013000"),
    ("iban", "DE8937040044053201300"),
    ("iban", "ABDE89370400440532013000"),
    ("us_ssn", "000-12-3456"),
    ("us_ssn", "666-12-3456"),
    ("us_ssn", "900-12-3456"),
    ("us_ssn", "123-00-4567"),
    ("us_ssn", "123-45-0000"),
    ("us_ssn", "123 45 6789"),
    ("us_ssn", "1123-45-6789"),
    ("us_ssn", "123-45-67890"),
    ("ipv4", "release v1.2.3.4.5"),
    ("ipv4", "1.2.3.4.5"),
    ("ipv4", "Mozilla/5.0 Chrome/120.0.6099.109 Safari"),
    ("ipv4", "256.1.1.1"),
    ("ipv4", "v1.2.3.4"),
    ("ipv4", "01.2.3.4"),
    ("ipv4", "version 2.4.1"),
    ("ipv6", "at 12:30:45"),
    ("ipv6", "std::vector<int>"),
    ("ipv6", "A::B"),
    ("ipv6", "mac 00:1A:2B:3C:4D:5E"),
    ("ipv6", "Foo::bar()"),
    # Fingerprints and key dumps: colon-hex runs of more than eight groups.
    ("ipv6", "SHA1 Fingerprint=2B:8F:1B:57:33:0D:BB:A2:D0:7A:6C:51:F7:0E:E9:0D:DA:B9:AD:8E"),
    ("ipv6", "MD5:16:27:ac:a5:76:28:2d:36:63:1b:56:4d:eb:df:a6:48"),
    ("ipv6", "    00:c3:5e:9a:3b:11:22:33:44:55:66:77:88:99:aa:"),
    ("jwt", "eyJhbGciOiJIUzI1NiJ9"),
    ("jwt", "x" + JWT),
    ("precogx_key", "px_test_key"),
    ("precogx_key", "px_live_short"),
    ("openai_key", "a task-based approach, risk-free"),
    ("openai_key", "sk-this-is-a-long-hyphenated-phrase-of-words"),
    ("openai_key", "ask-" + "a1" * 24),
    ("aws_access_key", "ASIAPACIFICREGIONSALESTEAM"),
    ("aws_access_key", "AKIAIOSFODNN7EXAMPLE1"),
    ("github_token", "ghp_short and though_that"),
    # Only the named value, of exactly 40 characters.
    ("aws_secret_key", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("aws_secret_key", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY1"),
    ("aws_secret_key", "aws_secret_access_key = short"),
    ("aws_secret_key", "secret_access_key is where the key goes: see the docs for it, ok"),
    ("slack_token", "xoxb-abc"),
    ("slack_webhook", "see https://hooks.slack.com/services/ for how to make one"),
    ("slack_webhook", "https://api.slack.com/services/T0A1B2C3D/B0A1B2C3D/a1B2c3D4e5"),
    ("slack_token", "xoxo-123456789012"),
    ("slack_token", "xapp-no-digits-here"),
    ("private_key", "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkq\n-----END PUBLIC KEY-----"),
    ("private_key", "PuTTYgen saves a PuTTY-User-Key-File-N: header, then the key"),
    ("private_key",
     "---- BEGIN SSH2 PUBLIC KEY ----\nAAAAB3NzaC1yc2E\n---- END SSH2 PUBLIC KEY ----"),
]


# Cases for the faster ways the finders take (an ASCII local part stripped rather than
# read by the regex, octets checked by one regex, colons paired before the seed regex,
# the lead of a token compared before the regex).
MORE_POSITIVES = [
    # The run read back over the ellipsis, and "...fe80::1" is no address.
    ("ipv6", "...fe80::1", ["fe80::1"]),
    # The regex ran on into a card number after it, whose dashes refused the IBAN.
    ("iban", "SE4550000000058398257466 4111-1111-1111-1111", ["SE4550000000058398257466"]),
    # URL-encoded text: the escape before a credential is no word it is glued to.
    ("openai_key", "cb?state=1&token%3Dsk-" + "a1" * 24, ["sk-" + "a1" * 24]),
    ("jwt", f"GET /x?auth=Bearer%20{JWT}", [JWT]),
    ("aws_access_key", "id%3DAKIAIOSFODNN7EXAMPLE%26x", ["AKIAIOSFODNN7EXAMPLE"]),
    ("credit_card", "card%3A4111%201111", []),  # split by escapes: not one number
    ("credit_card", "card%3A4111111111111111", ["4111111111111111"]),
    ("email", "éjane@example.com", ["éjane@example.com"]),
    ("email", "a\u00a0jane@example.com", ["jane@example.com"]),
    ("email", "(jane@example.com)", ["jane@example.com"]),
    ("email", "x" * 64 + "@example.com", ["x" * 64 + "@example.com"]),
    ("email", "..jane@example.com", ["jane@example.com"]),
    ("ipv4", "0.0.0.0 and 255.255.255.255", ["0.0.0.0", "255.255.255.255"]),
    ("ipv4", "10.0.0.1\x0010.0.0.2", ["10.0.0.1", "10.0.0.2"]),
    ("ipv4", "199.249.200.9", ["199.249.200.9"]),
    ("ipv6", "at 12:30:45, then 2001:db8::1", ["2001:db8::1"]),
    ("ipv6", "see\\b2001:db8::1 and\\f::1", ["2001:db8::1", "::1"]),
    ("ipv6", "a:b: c:d:e: 2001:db8::7334", ["2001:db8::7334"]),
    ("jwt", f"Jane J{JWT}", []),
    ("jwt", f"Jane {JWT}", [JWT]),
    ("github_token", "a_b gh_ ghx_ ghp_" + "aB3" * 12, ["ghp_" + "aB3" * 12]),
    ("iban", "GB82 WEST 1234 5698 7654 32", ["GB82 WEST 1234 5698 7654 32"]),
    ("iban", "NL91ABNA0417164300", ["NL91ABNA0417164300"]),
]

MORE_NEGATIVES = [
    ("email", "x" * 65 + "@example.com"),
    ("email", "..@example.com"),
    ("ipv4", "10.0.0.256"),
    ("ipv4", "1.2.3.04"),
    ("ipv4", "300.1.1.1"),
    ("ipv4", "x.1.2.3.4"),
    ("ipv6", "12:30:45 and 10:20"),
    ("iban", "NL91ABNA0417164301"),
]


@pytest.mark.parametrize(("detector", "text", "expected"), MORE_POSITIVES)
def test_detector_finds_more(detector: str, text: str, expected: list[str]) -> None:
    assert found(detector, text) == expected


@pytest.mark.parametrize(("detector", "text"), MORE_NEGATIVES)
def test_detector_leaves_more_near_misses(detector: str, text: str) -> None:
    assert found(detector, text) == []


def test_numeric_detectors_rule_out_a_text_without_digits() -> None:
    text = "no digits here: only words, a @ and (parens) + signs"
    assert not Text(text).has_digit
    assert Text("one 7").has_digit
    assert Text("٣ is not ASCII").has_digit is False
    for name, detector in DETECTORS.items():
        if detector.numeric:
            assert detector.find(text) == [], name


def test_the_scanner_finds_what_each_detector_finds() -> None:
    """A rule's scanner runs the finders of all its detectors in one loop: the same spans,
    labelled, by detector in the order named."""
    text = " ".join(t for _, t, _ in POSITIVES)
    names = ["phone", "email", "jwt", "credit_card", "iban", "ipv4", "ipv6", "us_ssn"]
    expected = [(s, e, n) for n in names for s, e in DETECTORS[n].find(text)]
    assert len(expected) > 20
    assert scanner(names)(Text(text)) == expected
    assert scanner(["ipv4", "email"])(Text("no digits a@b.co")) == [(10, 16, "email")]


@pytest.mark.parametrize(("detector", "text", "expected"), POSITIVES)
def test_detector_finds(detector: str, text: str, expected: list[str]) -> None:
    assert found(detector, text) == expected


@pytest.mark.parametrize(
    ("detector", "secret"),
    [("phone", "+1 415 555 0132"), ("credit_card", "4111 1111 1111 1111"),
     ("iban", "DE89370400440532013000"), ("us_ssn", "078-05-1120"), ("ipv4", "10.0.0.1"),
     ("ipv6", "2001:db8::1"), ("jwt", JWT), ("openai_key", "sk-" + "a1" * 24),
     ("aws_access_key", "AKIAIOSFODNN7EXAMPLE"), ("github_token", "ghp_" + "aB3" * 12),
     ("precogx_key", "px_live_abcdefghijklmnop1234")],
)
def test_an_escape_sequence_before_a_secret_does_not_hide_it(detector: str, secret: str) -> None:
    """Text holding escaped JSON ("Card:\\n4111...") glues a letter to the secret."""
    assert found(detector, f"Card:\\n{secret}\\t") == [secret]


@pytest.mark.parametrize(("detector", "text"), NEGATIVES)
def test_detector_leaves_near_misses(detector: str, text: str) -> None:
    assert found(detector, text) == []


def test_catalogue() -> None:
    assert list(DETECTORS) == [
        "email", "phone", "credit_card", "iban", "us_ssn", "ipv4", "ipv6", "jwt",
        "precogx_key", "openai_key", "aws_access_key", "aws_secret_key", "github_token",
        "slack_token", "slack_webhook", "private_key",
    ]
    assert SECRET_DETECTORS == (
        "jwt", "precogx_key", "openai_key", "aws_access_key", "aws_secret_key",
        "github_token", "slack_token", "slack_webhook", "private_key",
    )


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_no_detector_matches_across_strings(detector: str) -> None:
    """The strings of an event are scanned joined by NUL: no match may span two of them."""
    pieces = {
        "email": ("jane.doe", "@example.com"), "phone": ("555-123", "-4567"),
        "credit_card": ("4111 1111", " 1111 1111"), "iban": ("DE89 3704 0044", " 0532 0130 00"),
        "us_ssn": ("123-45", "-6789"), "ipv4": ("10.0", ".0.1"),
        "ipv6": ("2001:db8:85a3", ":0:0:8a2e:370:7334"),
        "jwt": (JWT[:30], JWT[30:]), "precogx_key": ("px_live_", "abcdefghijklmnop1234"),
        "openai_key": ("sk-proj-", "Qw8eRt5yUi2oPa7sDf4gHj1"),
        "aws_access_key": ("AKIAIOSF", "ODNN7EXAMPLE"), "github_token": ("ghp_", "aB3" * 12),
        "aws_secret_key": ("aws_secret_access_key = ", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        "slack_token": ("xoxb-", "1234567890-abcdefghijkl"),
        "slack_webhook": ("https://hooks.slack.com/services/", "T0A1B2C3D/B0A1B2C3D/a1B2c3D4"),
        "private_key": ("-----BEGIN RSA PRIVATE", " KEY-----\nabc"),
    }[detector]
    ev = event(prompt=pieces[0], response=pieces[1])
    assert redact([{"name": "r", "detectors": [detector]}], ev) == []
    assert (ev["prompt"], ev["response"]) == pieces


# -- paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "must not be empty"),
        ("a..b", "empty segment"),
        ("a.", "empty segment"),
        (".a", "empty segment"),
        ("a[0]", "[0] is not supported: only [*]"),
        ("a[", "bad segment"),
        ("[*].a", "must start with a field name or *"),
        ("a b", "bad segment"),
        ("a*b", "bad segment"),
        ("*x", "bad segment"),
    ],
)
def test_bad_path_syntax(path: str, message: str) -> None:
    with pytest.raises(paths.PathError, match=message.replace("[", r"\[").replace("*", r"\*")):
        paths.parse(path)


def test_paths_parse_into_steps() -> None:
    assert paths.parse("userId") == ("userId",)
    assert paths.parse("toolCalls[*].input.account_number") == (
        "toolCalls", "[*]", "input", "account_number"
    )
    assert paths.parse("metadata.*.ssn") == ("metadata", "*", "ssn")
    assert paths.parse("grid[*][*]") == ("grid", "[*]", "[*]")


def located(path: str, ev: dict[str, Any]) -> list[tuple[Any, str]]:
    locate = paths.compile_path(paths.parse(path))
    return [(value, paths.render(trail, key)) for _, key, value, trail in locate(ev)]


def test_path_matching() -> None:
    ev = event(
        userId="u1",
        metadata={"customer_email": "a@b.co", "x": {"ssn": "1"}, "y": {"ssn": "2"}, "z": 3},
        toolCalls=[{"input": {"account_number": "A1"}}, {"input": {}}, "not an object",
                   {"input": {"account_number": "A2"}}],
        grid=[[1, 2], [3]],
    )
    assert located("userId", ev) == [("u1", "userId")]
    assert located("metadata.customer_email", ev) == [("a@b.co", "metadata.customer_email")]
    assert located("toolCalls[*].input.account_number", ev) == [
        ("A1", "toolCalls[0].input.account_number"),
        ("A2", "toolCalls[3].input.account_number"),
    ]
    assert located("metadata.*.ssn", ev) == [("1", "metadata.x.ssn"), ("2", "metadata.y.ssn")]
    assert [p for _, p in located("grid[*][*]", ev)] == [
        "grid[0][0]", "grid[0][1]", "grid[1][0]"
    ]


def test_paths_of_names_and_wildcards_mixed() -> None:
    ev = event(
        a={"b": [{"c": {"d": 1}}, {"c": "no"}, "no", {"x": 1}, {"c": {"d": 2, "e": 3}}]},
        m={"k1": {"s": 1}, "k2": "no", "k3": [], "k4": {"t": 2}, "k5": {"s": {"s": 3}}},
    )
    assert located("a.b[*].c.d", ev) == [(1, "a.b[0].c.d"), (2, "a.b[4].c.d")]
    assert located("m.*.s", ev) == [(1, "m.k1.s"), ({"s": 3}, "m.k5.s")]
    assert located("m.*.s.s", ev) == [(3, "m.k5.s.s")]
    assert located("m.*", ev)[1] == ("no", "m.k2")
    assert located("a.b", ev)[0][1] == "a.b"
    assert located("a.b.c", ev) == []


def test_holder_of_a_path_of_names() -> None:
    ev = event(metadata={"a": {"b": "x"}, "s": "no"})
    hold = paths.holder(paths.parse("metadata.a.b"))
    assert hold is not None and hold(ev) is ev["metadata"]["a"]
    hold = paths.holder(paths.parse("metadata.s.b"))
    assert hold is not None and hold(ev) is None
    hold = paths.holder(paths.parse("userId"))
    assert hold is not None and hold(ev) is ev
    assert paths.holder(paths.parse("metadata.*.b")) is None
    assert paths.holder(paths.parse("toolCalls[*]")) is None
    assert paths.render(paths.names_trail(("metadata", "a")), "b") == "metadata.a.b"


@pytest.mark.parametrize(
    "path",
    ["nothing", "metadata.missing", "prompt.text", "metadata[*]", "toolCalls.name",
     "toolCalls[*].input.x", "userId.x"],
)
def test_missing_paths_and_wrong_types_select_nothing(path: str) -> None:
    ev = event(userId=7, metadata={"a": 1}, toolCalls=[{"input": "str"}])
    before = copy.deepcopy(ev)
    assert located(path, ev) == []
    assert redact([{"name": "r", "path": path, "action": "mask"}], ev) == []
    assert ev == before


# -- whole-value actions ---------------------------------------------------------------


def test_remove() -> None:
    ev = event(
        metadata={"ssn": "123-45-6789", "keep": 1},
        toolCalls=[{"name": "a", "secret": 1}, {"name": "b"}, {"name": "c", "secret": 2}],
    )
    hits = redact([
        {"name": "ssn", "path": "metadata.ssn", "action": "remove"},
        {"name": "secret", "path": "toolCalls[*].secret", "action": "remove"},
    ], ev)
    assert ev["metadata"] == {"keep": 1}
    assert ev["toolCalls"] == [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    assert hits == [
        Hit("ssn", "remove", "metadata.ssn"),
        Hit("secret", "remove", "toolCalls[0].secret"),
        Hit("secret", "remove", "toolCalls[2].secret"),
    ]


def test_remove_list_items_keeps_the_rest() -> None:
    ev = event(metadata={"tags": [{"pii": 1}, {"pii": 2}]}, toolCalls=[1, 2, 3])
    redact([{"name": "all", "path": "toolCalls[*]", "action": "remove"},
            {"name": "tags", "path": "metadata.tags", "action": "remove"}], ev)
    assert ev["toolCalls"] == [] and ev["metadata"] == {}


def test_rules_at_one_named_place() -> None:
    rules: list[dict[str, Any]] = [
        {"name": "gone", "path": "metadata.a.gone", "action": "remove"},
        {"name": "m", "path": "metadata.a.keep", "action": "mask", "agent_ids": ["agent-1"]},
        {"name": "o", "path": "metadata.a.keep", "action": "mask", "agent_ids": ["other"]},
        {"name": "p", "path": "metadata.b", "action": "partial"},
        {"name": "none", "path": "metadata.a.missing.x", "action": "mask"},
    ]
    ev = event(metadata={"a": {"gone": 1, "keep": "secret"}, "b": "0123456789"})
    hits = redact(rules, ev)
    assert ev["metadata"] == {"a": {"keep": "[REDACTED:m]"}, "b": "******6789"}
    assert hits == [Hit("gone", "remove", "metadata.a.gone"), Hit("m", "mask", "metadata.a.keep"),
                    Hit("p", "partial", "metadata.b")]
    assert redact(rules, ev) == []
    assert redact(rules, event(metadata="not an object")) == []


@pytest.mark.parametrize(
    "value", ["a@b.co", 42, 1.5, True, {"nested": ["x"]}, ["a", 1]]
)
def test_mask_replaces_any_json_value(value: Any) -> None:
    ev = event(metadata={"v": value})
    hits = redact([{"name": "v", "path": "metadata.v", "action": "mask"}], ev)
    assert ev["metadata"]["v"] == "[REDACTED:v]"
    assert hits == [Hit("v", "mask", "metadata.v")]


def test_null_is_left_alone() -> None:
    ev = event(metadata={"v": None})
    for action in ("mask", "partial", "hash"):
        assert redact([{"name": "v", "path": "metadata.v", "action": action}], ev) == []
    assert ev["metadata"] == {"v": None}


@pytest.mark.parametrize(
    ("value", "keep_last", "expected"),
    [
        ("DE89370400440532013000", 4, "******************3000"),
        ("secret", 2, "****et"),
        ("abcd", 4, "**cd"),  # at most half of the value in clear
        ("1234567", 4, "****567"),
        ("a", 4, "*"),
        ("secret", 0, "******"),
        (12345678, 4, "[REDACTED:p]"),
        ({"a": 1}, 4, "[REDACTED:p]"),
    ],
)
def test_partial(value: Any, keep_last: int, expected: str) -> None:
    ev = event(metadata={"v": value})
    rule: dict[str, Any] = {"name": "p", "path": "metadata.v", "action": "partial"}
    if keep_last != 4:
        rule["keep_last"] = keep_last
    redact([rule], ev)
    assert ev["metadata"]["v"] == expected


def test_hash_is_an_hmac_of_the_canonical_value() -> None:
    ev = event(userId="user-42", metadata={"o": {"b": 2, "a": [1, "x"]}, "n": 7})
    redact([{"name": "u", "path": "userId", "action": "hash"},
            {"name": "o", "path": "metadata.*", "action": "hash"}], ev)
    assert ev["userId"] == tag("user-42")
    assert ev["metadata"]["o"] == tag(b'{"a":[1,"x"],"b":2}')
    assert ev["metadata"]["n"] == tag(b"7")


def test_hash_is_stable_and_depends_on_the_key() -> None:
    rules = [{"name": "u", "path": "userId", "action": "hash"},
             {"name": "m", "path": "metadata.o", "action": "hash"}]
    a, b = event(userId="u", metadata={"o": {"x": 1, "y": 2}}), event(
        userId="u", metadata={"o": {"y": 2, "x": 1}})
    redact(rules, a)
    redact(rules, b)
    assert a == b
    c = event(userId="u")
    build_redactor(rules, b"another-key-0123456789").redact(c)
    assert c["userId"] != a["userId"]
    d = event(userId="v")
    redact(rules, d)
    assert d["userId"] != a["userId"]


def test_hmac_matches_the_standard_library_for_long_keys() -> None:
    long_key = bytes(range(100))
    ev = event(userId="u")
    build_redactor([{"name": "u", "path": "userId", "action": "hash"}], long_key).redact(ev)
    assert ev["userId"] == "hmac:" + hmac.new(long_key, b"u", hashlib.sha256).hexdigest()[:16]


def test_hash_of_values_orjson_cannot_write() -> None:
    ev = event(metadata={"big": 2**80, "odd": "\ud800"})
    hits = redact([{"name": "m", "path": "metadata.*", "action": "hash"}], ev)
    assert len(hits) == 2
    assert ev["metadata"]["big"] == tag(str(2**80))
    assert ev["metadata"]["odd"].startswith("hmac:")


def test_agent_id_may_be_hashed() -> None:
    ev = event()
    redact([{"name": "a", "path": "agentId", "action": "hash"}], ev)
    assert ev["agentId"] == tag("agent-1")


def test_prompt_and_response_may_be_masked() -> None:
    ev = event(response={"answer": "x", "sources": ["y"]})
    redact([{"name": "p", "path": "prompt", "action": "partial"},
            {"name": "r", "path": "response", "action": "mask"}], ev)
    assert ev["prompt"] == "***lo"
    assert ev["response"] == "[REDACTED:r]"


# -- detector and pattern rules ----------------------------------------------------------


def test_detectors_replace_only_the_match() -> None:
    ev = event(prompt="mail jane.doe@example.com or call 555-123-4567, thanks")
    hits = redact([{"name": "pii", "detectors": ["email", "phone"]}], ev)
    assert ev["prompt"] == "mail [REDACTED:email] or call [REDACTED:phone], thanks"
    assert hits == [Hit("pii", "mask", "prompt")] * 2


def test_detectors_look_everywhere_below_the_path_but_not_at_keys() -> None:
    ev = event(
        prompt={"text": "a@b.co", "history": [{"role": "user", "content": "c@d.org"}]},
        metadata={"jane@example.com": "value e@f.net", "n": 5, "ok": True},
        toolCalls=[{"name": "t", "input": {"to": ["g@h.io"]}, "output": "i@j.dev"}],
    )
    hits = redact([{"name": "e", "detectors": ["email"]}], ev)
    assert ev["prompt"] == {
        "text": "[REDACTED:email]",
        "history": [{"role": "user", "content": "[REDACTED:email]"}],
    }
    assert ev["metadata"] == {"jane@example.com": "value [REDACTED:email]", "n": 5, "ok": True}
    assert ev["toolCalls"] == [{"name": "t", "input": {"to": ["[REDACTED:email]"]},
                                "output": "[REDACTED:email]"}]
    assert sorted(h.path for h in hits) == [
        "metadata.jane@example.com", "prompt.history[0].content", "prompt.text",
        "toolCalls[0].input.to[0]", "toolCalls[0].output",
    ]


def test_detectors_under_a_path_leave_the_rest() -> None:
    ev = event(prompt="a@b.co", metadata={"notes": ["c@d.org"], "other": "e@f.net"})
    redact([{"name": "e", "path": "metadata.notes", "detectors": ["email"]}], ev)
    assert ev["prompt"] == "a@b.co"
    assert ev["metadata"] == {"notes": ["[REDACTED:email]"], "other": "e@f.net"}


def test_matches_in_every_string_land_in_their_place() -> None:
    """Matches are found in the joined strings and filed back by string: past the first
    string, past strings holding a NUL themselves, past agentId between the others."""
    ev = {"prompt": "a@b.co", "agentId": "x@y.co", "metadata": {"n": "\0\0", "m": "c@d.org"},
          "response": "say \0 e@f.net", "toolCalls": [{"o": ["g@h.io", "x", "i@j.dev"]}]}
    hits = redact([{"name": "e", "detectors": ["email"]}], ev)
    assert ev == {
        "prompt": "[REDACTED:email]", "agentId": "x@y.co",
        "metadata": {"n": "\0\0", "m": "[REDACTED:email]"}, "response": "say \0 [REDACTED:email]",
        "toolCalls": [{"o": ["[REDACTED:email]", "x", "[REDACTED:email]"]}],
    }
    assert [h.path for h in hits] == [  # each container's strings, then those in it
        "prompt", "response", "metadata.m", "toolCalls[0].o[0]", "toolCalls[0].o[2]",
    ]


def test_matches_under_a_path_land_in_their_place() -> None:
    ev = event(metadata={"a": "x a@b.co", "b": {"c": ["d@e.io", 1, "f@g.io"]}, "h": "i@j.io"})
    hits = redact([{"name": "e", "path": "metadata.*", "detectors": ["email"],
                    "action": "partial", "keep_last": 2},
                   {"name": "n", "path": "metadata.*", "patterns": ["x"]}], ev)
    assert ev["metadata"] == {"a": "[REDACTED:n] ****co", "b": {"c": ["****io", 1, "****io"]},
                              "h": "****io"}
    assert [h.path for h in hits] == [  # in the order read, rule by rule
        "metadata.a", "metadata.h", "metadata.b.c[0]", "metadata.b.c[2]", "metadata.a",
    ]


def test_detectors_never_touch_agent_id() -> None:
    ev = event(agentId="support@example.com", prompt="x@example.com")
    redact([{"name": "e", "detectors": ["email"]},
            {"name": "all", "path": "*", "detectors": ["email"]}], ev)
    assert ev["agentId"] == "support@example.com"
    assert ev["prompt"] == "[REDACTED:email]"


def test_detector_partial_and_hash() -> None:
    ev = event(prompt="card 4111 1111 1111 1111", response="mail jane@example.com")
    redact([{"name": "c", "detectors": ["credit_card"], "action": "partial"},
            {"name": "e", "detectors": ["email"], "action": "hash"}], ev)
    assert ev["prompt"] == "card ***************1111"
    assert ev["response"] == f"mail {tag('jane@example.com')}"


@pytest.mark.parametrize(("action", "expected"), [
    ("mask", "[REDACTED:credit_card]"),
    ("partial", "************1111"),
    ("hash", tag("4111111111111111")),
])
def test_detectors_read_integers_as_their_digits(action: str, expected: str) -> None:
    """A card number sent as a JSON number is a card number: its replacement is a string.
    Integers the detectors do not match stay integers; booleans and floats are no digits
    anyone types as a card."""
    ev = event(userId=4111111111111111,
               metadata={"card": 4111111111111111, "n": 5, "ok": True, "f": 4111111111111111.0},
               toolCalls=[{"name": "pay", "input": {"cards": [4111111111111111, 12]}}])
    hits = redact([{"name": "c", "detectors": ["credit_card"], "action": action}], ev)
    assert ev["userId"] == ev["metadata"]["card"] == expected
    assert ev["metadata"] == {"card": expected, "n": 5, "ok": True, "f": 4111111111111111.0}
    assert ev["toolCalls"][0]["input"]["cards"] == [expected, 12]
    assert sorted(h.path for h in hits) == ["metadata.card", "toolCalls[0].input.cards[0]",
                                            "userId"]
    assert redact([{"name": "c", "detectors": ["credit_card"], "action": action}], ev) == []


def test_a_path_limited_detector_reads_the_integer_at_its_path() -> None:
    ev = event(metadata={"card": 4111111111111111, "order": 4111111111111111})
    redact([{"name": "c", "path": "metadata.card", "detectors": ["credit_card"]},
            {"name": "p", "path": "metadata.order", "patterns": [r"^\d{16}$"]}], ev)
    assert ev["metadata"] == {"card": "[REDACTED:credit_card]", "order": "[REDACTED:p]"}


def test_overlapping_matches_are_replaced_as_one() -> None:
    ev = event(prompt="key -----BEGIN PRIVATE KEY-----\nx 10.0.0.1 a@b.co\n"
                      "-----END PRIVATE KEY----- end")
    hits = redact([{"name": "r", "detectors": ["private_key", "ipv4", "email"]}], ev)
    assert ev["prompt"] == "key [REDACTED:private_key] end"
    assert len(hits) == 1


def test_patterns() -> None:
    ev = event(prompt="orders ord-123456 and ord-654321", metadata={"ref": "ord-111111"})
    hits = redact([{"name": "orders", "patterns": [r"ord-\d{6}"]},
                   {"name": "refs", "path": "metadata", "patterns": [r"\d+"],
                    "action": "partial", "keep_last": 2}], ev)
    assert ev["prompt"] == "orders [REDACTED:orders] and [REDACTED:orders]"
    assert ev["metadata"] == {"ref": "[REDACTED:orders]"}
    assert [h.rule for h in hits] == ["orders"] * 3


def test_patterns_with_a_partial_action() -> None:
    ev = event(prompt="acct 0012345678.")
    redact([{"name": "acct", "patterns": [r"\b\d{10}\b"], "action": "partial"}], ev)
    assert ev["prompt"] == "acct ******5678."


def test_agent_ids_limit_a_rule() -> None:
    rules: list[dict[str, Any]] = [
        {"name": "h", "path": "agentId", "action": "hash"},
        {"name": "e", "detectors": ["email"], "agent_ids": ["app-1", "app-2"]},
    ]
    one, other = event(agentId="app-1", prompt="a@b.co"), event(agentId="app-3", prompt="a@b.co")
    redact(rules, one)
    redact(rules, other)
    # Decided on the agentId as received, although the first rule hashed it.
    assert one["prompt"] == "[REDACTED:email]"
    assert other["prompt"] == "a@b.co"


def test_rules_apply_in_order() -> None:
    account = "DE89370400440532013000"
    partial_first: list[dict[str, Any]] = [
        {"name": "acct", "path": "toolCalls[*].input.account", "action": "partial"},
        {"name": "pii", "detectors": ["iban"]},
    ]
    a = event(toolCalls=[{"input": {"account": account}}])
    redact(partial_first, a)
    assert a["toolCalls"][0]["input"]["account"] == "******************3000"
    b = event(toolCalls=[{"input": {"account": account}}])
    redact(list(reversed(partial_first)), b)
    assert b["toolCalls"][0]["input"]["account"] == "[REDACTED:iban]"


def test_redacting_twice_changes_nothing() -> None:
    rules = [
        {"name": "d", "detectors": list(DETECTORS), "action": "hash"},
        {"name": "u", "path": "userId", "action": "hash"},
        {"name": "p", "path": "userId", "action": "partial"},
        {"name": "m", "path": "metadata.*", "action": "mask"},
        {"name": "t", "patterns": [r"[a-z]+"], "action": "mask", "path": "toolCalls"},
    ]
    ev = event(prompt="a@b.co 4111 1111 1111 1111", userId="u-1", metadata={"a": 1},
               toolCalls=[{"name": "lookup"}])
    redactor = build_redactor(rules, KEY)
    redactor.redact(ev)
    once = copy.deepcopy(ev)
    assert redactor.redact(ev) == []
    assert ev == once


def test_deep_nesting_and_odd_values_do_not_raise() -> None:
    deep: Any = "a@b.co"
    for _ in range(5000):
        deep = [deep]
    ev = event(metadata={"deep": deep, "big": 2**100, "f": 1e308, "s": "\ud800@x.io", "": None})
    hits = redact([{"name": "e", "detectors": list(DETECTORS)},
                   {"name": "h", "path": "metadata.*", "action": "hash"}], ev)
    assert hits[0] == Hit("e", "mask", "metadata.deep" + "[0]" * 5000)


# -- hits and describe --------------------------------------------------------------------


def test_hits_never_hold_the_value() -> None:
    secrets = ["jane.doe@example.com", "4111 1111 1111 1111", "user-42", "s3cr3t-value"]
    ev = event(prompt=f"{secrets[0]} {secrets[1]}", userId=secrets[2],
               metadata={"token": secrets[3]}, toolCalls=[{"input": {"t": secrets[3]}}])
    hits = redact([
        {"name": "d", "detectors": list(DETECTORS), "action": "partial"},
        {"name": "u", "path": "userId", "action": "hash"},
        {"name": "t", "path": "metadata.token", "action": "remove"},
        {"name": "i", "path": "toolCalls[*].input.t", "action": "mask"},
    ], ev)
    assert len(hits) == 5
    for hit in hits:
        for secret in secrets:
            assert secret not in repr(hit)


def test_describe() -> None:
    redactor = build_redactor([
        {"name": "emails", "detectors": ["email"]},
        {"name": "secrets", "detectors": ["jwt", "openai_key"], "path": "metadata.*"},
        {"name": "orders", "patterns": [r"ord-\d{6}"], "action": "partial", "keep_last": 3,
         "agent_ids": ["b", "a"], "inline": True},
        {"name": "customer", "path": "metadata.customer_email", "action": "hash"},
    ], KEY)
    assert redactor.describe() == [
        "emails: detector email in anywhere -> mask",
        "secrets: detectors jwt, openai_key in metadata.* -> mask",
        r"orders: pattern /ord-\d{6}/ in anywhere -> partial (keep last 3) "
        "(only agents a, b; inline)",
        "customer: whole value at metadata.customer_email -> hash",
    ]
    assert [rule.inline for rule in redactor.rules] == [False, False, True, False]


def test_rules_put_together_by_hand_may_repeat_names() -> None:
    builtin = build_redactor([{"name": "x", "detectors": ["jwt"]}], None).rules
    configured = build_redactor([{"name": "x", "detectors": ["email"], "action": "hash"}],
                                KEY).rules
    ev = event(prompt=f"{JWT} a@b.co")
    hits = Redactor([*builtin, *configured], KEY).redact(ev)
    assert ev["prompt"] == f"[REDACTED:jwt] {tag('a@b.co')}"
    assert hits == [Hit("x", "mask", "prompt"), Hit("x", "hash", "prompt")]


def test_a_redactor_refuses_hash_rules_without_a_key() -> None:
    rules = build_redactor([{"name": "u", "path": "userId", "action": "hash"}], KEY).rules
    with pytest.raises(RedactionError, match="needs an HMAC key"):
        Redactor(rules, None)


# -- configuration errors -------------------------------------------------------------------

ERRORS: list[tuple[Any, str]] = [
    ("not a list", "redaction.rules: must be a list of tables"),
    (["x"], "redaction.rules[0]: must be a table, got a string"),
    ({"path": "userId"}, "redaction.rules[0]: name is required"),
    ({"name": "a b", "path": "userId"}, "name must be a non-empty string of A-Z a-z 0-9 _ . -"),
    ({"name": 5, "path": "userId"}, "got 5"),
    ({"name": "", "path": "userId"}, "name must be a non-empty string"),
    ({"name": "r", "path": "userId", "detector": ["email"]},
     "(name 'r'): unknown key 'detector' (known: name, path, detectors, patterns, action, "
     "keep_last, agent_ids, inline)"),
    ({"name": "r"}, "needs at least one of path, detectors or patterns"),
    ({"name": "r", "detectors": []}, "needs at least one of path, detectors or patterns"),
    ({"name": "r", "path": 3}, "path must be a string, got 3"),
    ({"name": "r", "path": "a..b"}, "path 'a..b': empty segment"),
    ({"name": "r", "path": "toolCalls[0].x"}, "[0] is not supported: only [*]"),
    ({"name": "r", "path": ""}, "path must not be empty"),
    ({"name": "r", "path": "metadata."}, "empty segment"),
    ({"name": "r", "detectors": "email"}, "detectors must be a list of strings, got 'email'"),
    ({"name": "r", "detectors": ["emial"]},
     "(name 'r'): unknown detector 'emial' (known: email, phone, credit_card, iban"),
    ({"name": "r", "patterns": [1]}, "patterns must be a list of strings"),
    ({"name": "r", "patterns": ["ord-("]},
     "patterns[0] 'ord-(' is not a valid regex: missing ), unterminated subpattern"),
    ({"name": "r", "patterns": ["a{99999999999}"]},
     "is not a valid regex: the repetition number is too large"),
    ({"name": "r", "patterns": ["(" * 3000 + "a" + ")" * 3000]},
     "'((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((("
     "...' is not a valid regex: nested too deeply"),
    ({"name": "r", "patterns": ["ok", "a*"]}, "patterns[1] 'a*' can match the empty string"),
    ({"name": "r", "patterns": [r"\b"]}, "can match the empty string"),
    ({"name": "r", "patterns": ["(a+)+$"]}, "exponential time on some texts (a repeat inside"),
    ({"name": "r", "patterns": ["(a*)*b"]}, "exponential time"),
    ({"name": "r", "patterns": ["(.*)*x"]}, "exponential time"),
    ({"name": "r", "patterns": [r"(\w+\s?)+$"]}, "exponential time"),
    ({"name": "r", "patterns": ["(a|a)*b"]}, "alternatives that can match the same text"),
    ({"name": "r", "patterns": [r"(ab|a.c)+!"]}, "alternatives that can match the same text"),
    ({"name": "r", "path": "userId", "action": "redact"},
     "unknown action 'redact' (known: remove, mask, partial, hash)"),
    ({"name": "r", "path": "userId", "action": 1}, "action must be a string"),
    ({"name": "r", "path": "userId", "action": "partial", "keep_last": -1},
     "keep_last must be >= 0, got -1"),
    ({"name": "r", "path": "userId", "action": "partial", "keep_last": "4"},
     "keep_last must be an integer"),
    ({"name": "r", "path": "userId", "action": "partial", "keep_last": True},
     "keep_last must be an integer"),
    ({"name": "r", "path": "userId", "keep_last": 2},
     "keep_last is only used by action 'partial', not 'mask'"),
    ({"name": "r", "path": "userId", "agent_ids": []}, "agent_ids must list non-empty agent ids"),
    ({"name": "r", "path": "userId", "agent_ids": [""]}, "agent_ids must list non-empty"),
    ({"name": "r", "path": "userId", "agent_ids": "a"}, "agent_ids must be a list of strings"),
    ({"name": "r", "path": "userId", "inline": "yes"}, "inline must be true or false"),
    ({"name": "r", "detectors": ["email"], "action": "remove"},
     "removing part of a text is ambiguous"),
    ({"name": "r", "patterns": ["x"], "action": "remove"}, "removing part of a text is ambiguous"),
    ({"name": "r", "path": "prompt", "action": "remove"},
     "path 'prompt' selects prompt, which PrecogX requires"),
    ({"name": "r", "path": "response", "action": "remove"}, "selects response"),
    ({"name": "r", "path": "*", "action": "remove"}, "path '*' selects agentId"),
    ({"name": "r", "path": "agentId", "action": "remove"}, "only action 'hash' may change it"),
    ({"name": "r", "path": "agentId", "action": "mask"},
     "'mask' would turn every agent into the same one"),
    ({"name": "r", "path": "agentId", "action": "partial"}, "only action 'hash' may change it"),
    ({"name": "r", "path": "*", "action": "mask"}, "selects agentId"),
    ({"name": "r", "path": "*", "action": "hash"}, "selects metadata, which must stay an object"),
    ({"name": "r", "path": "metadata", "action": "mask"},
     "selects metadata, which must stay an object: use remove, or a path inside it such as "
     "'metadata.*'"),
    ({"name": "r", "path": "toolCalls", "action": "partial"},
     "selects toolCalls, which must stay a list"),
    ({"name": "r", "path": "agentId", "detectors": ["email"]}, "do not scan agentId"),
]


@pytest.mark.parametrize(("raw", "message"), ERRORS)
def test_configuration_errors(raw: Any, message: str) -> None:
    raw_rules = raw if not isinstance(raw, dict) else [raw]
    with pytest.raises(RedactionError) as info:
        build_redactor(raw_rules, KEY)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    if isinstance(raw, dict) and isinstance(raw.get("name"), str) and raw["name"] == "r":
        assert text.startswith("redaction.rules[0] (name 'r'): ")


def test_errors_name_the_rule_index() -> None:
    with pytest.raises(RedactionError) as info:
        build_redactor([{"name": "ok", "path": "userId"},
                        {"name": "emails", "detectors": ["emial"]}], KEY)
    assert str(info.value).startswith("redaction.rules[1] (name 'emails'): unknown detector")


def test_duplicate_names() -> None:
    with pytest.raises(RedactionError, match=r"redaction.rules\[2\] \(name 'a'\): duplicate "
                                             r"name \(also redaction.rules\[0\]\)"):
        build_redactor([{"name": "a", "path": "x"}, {"name": "b", "path": "y"},
                        {"name": "a", "path": "z"}], KEY)


def test_hash_needs_a_key_of_sixteen_bytes() -> None:
    rule = [{"name": "u", "path": "userId", "action": "hash"}]
    for key in (None, b""):
        with pytest.raises(RedactionError) as info:
            build_redactor(rule, key)
        assert "PRECOGX_SIDECAR_REDACTION_HMAC_KEY or redaction.hmac_key_file" in str(info.value)
    with pytest.raises(RedactionError, match="at least 16 bytes") as info:
        build_redactor(rule, b"short-secret")
    assert "short-secret" not in str(info.value)
    assert build_redactor([{"name": "m", "path": "userId"}], None).rules


@pytest.mark.parametrize(
    "raw",
    [
        {"name": "a.b_c-1", "path": "agentId", "action": "hash"},
        {"name": "r", "path": "prompt", "action": "mask"},
        {"name": "r", "path": "prompt.text", "action": "remove"},
        {"name": "r", "path": "metadata", "action": "remove"},
        {"name": "r", "path": "toolCalls", "action": "remove"},
        {"name": "r", "path": "metadata.*", "action": "mask"},
        {"name": "r", "path": "*", "detectors": ["email"]},
        {"name": "r", "patterns": [r"\w+(?:\.\w+)*@", r"(?:[a-z0-9-]+\.)+[a-z]{2,}",
                                   r"(?:\d{1,3}\.){3}\d{1,3}", r"(?:foo|bar)+", r"(a++)+",
                                   r"(?i)secret=\S+"]},
        {"name": "r", "detectors": ["email"], "inline": True, "agent_ids": ["x"]},
    ],
)
def test_accepted_rules(raw: dict[str, Any]) -> None:
    assert build_redactor([raw], KEY).rules[0].name == raw["name"]


def test_a_pseudonym_lookalike_is_one_only_where_a_rule_hashes() -> None:
    """Text written like a pseudonym is left alone only by a configuration that writes
    pseudonyms: elsewhere the card in "hmac:4111111111111111" is masked."""
    cards = {"name": "cards", "detectors": ["credit_card"], "action": "mask"}
    hashes = {"name": "ids", "path": "userId", "action": "hash"}
    for rules, kept in (([cards], False), ([cards, hashes], True)):
        event = {"agentId": "a", "prompt": "card hmac:4111111111111111", "response": ""}
        build_redactor(rules, KEY).redact(event)
        assert ("4111111111111111" in event["prompt"]) is kept



@pytest.mark.parametrize("holder", [
    {"output": ["-----BEGIN RSA PRIVATE KEY-----", "MIIEowIBAAKCAQEAkeymaterial0", "xyz1",
                "-----END RSA PRIVATE KEY-----"]},
    {"head": "-----BEGIN PRIVATE KEY-----", "body": "MIIEvQIBADANkeymaterial0",
     "tail": "-----END PRIVATE KEY----- thanks"},
    # Sibling objects and lists were read last first: the END line came before BEGIN.
    {"parts": [{"o": "-----BEGIN RSA PRIVATE KEY-----"}, {"o": "MIIEowIBAAKCAQEAkeymaterial0"},
               {"o": "xyz1"}, {"o": "-----END RSA PRIVATE KEY-----"}]},
    {"lines": [["-----BEGIN RSA PRIVATE KEY-----"], ["MIIEowIBAAKCAQEAkeymaterial0"], ["xyz1"],
               ["-----END RSA PRIVATE KEY-----"]]},
])
def test_a_private_key_split_across_strings_is_masked_whole(holder: dict[str, Any]) -> None:
    """Only the BEGIN line was masked: the key's body, in the strings after it, stayed."""
    redactor = build_redactor([{"name": "s", "detectors": ["private_key"]}], None)
    e = event(toolCalls=[holder])
    redactor.redact(e)
    text = orjson.dumps(e).decode()
    assert "keymaterial" not in text and "xyz1" not in text and "END" not in text
    if "thanks" in str(holder):
        assert "thanks" in text  # what follows the END line is no key
    assert redactor.redact(e) == []  # and redacting again changes nothing


def key_lines(seed: str, length: int, width: int = 64) -> list[str]:
    """``length`` characters of base64, as a key block wraps them at ``width``."""
    data = b"".join(hashlib.sha512(f"{seed}{i}".encode()).digest() for i in range(length // 64 + 1))
    text = base64.b64encode(data).decode()[:length]
    return [text[i:i + width] for i in range(0, length, width)]


@pytest.mark.parametrize("lines", [
    ["-----BEGIN RSA PRIVATE KEY-----", *key_lines("rsa", 300)],
    ["-----BEGIN RSA PRIVATE KEY-----", *key_lines("blank", 128), "", *key_lines("lines", 72)],
    ["-----BEGIN OPENSSH PRIVATE KEY-----", *key_lines("openssh", 280, width=70)],
    ["-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED", "DEK-Info: AES-128-CBC,0A1B",
     "", "\n".join(key_lines("encrypted", 192))],
    # The public part of an ed25519 .ppk ends in a line of four characters (letters only,
    # nearly one time in two).
    ["PuTTY-User-Key-File-3: ssh-ed25519", "Encryption: none", "Comment: ed25519-key",
     "Public-Lines: 2", *key_lines("public", 64), "sTuv", "Private-Lines: 1",
     *key_lines("private", 48)],
    ["-----BEGIN PGP PRIVATE KEY BLOCK-----", "Version: GnuPG v2", "",
     *key_lines("pgp", 200), "=AbCd"],
])
def test_a_private_key_cut_before_its_end_line_is_masked_in_the_strings_that_follow(
    lines: list[str],
) -> None:
    """A key whose lines are list items, cut before its end line: only the first line's
    string was masked, and the key's body, in the strings after it, stayed in clear."""
    redactor = build_redactor([{"name": "s", "detectors": ["private_key"]}], None)
    after = ["Thanks", "thanks, that is all", *key_lines("after", 64)]
    e = event(toolCalls=[{"output": [*lines, *after]}])
    redactor.redact(e)
    output = e["toolCalls"][0]["output"]
    assert output[: len(lines)] == ["[REDACTED:private_key]" if line else "" for line in lines]
    # The first string that cannot be a line of the key ends it: the rest is left.
    assert output[len(lines):] == after
    assert redactor.redact(e) == []


@pytest.mark.parametrize("after", [
    {"response": "Thanks"}, {"response": "OK"}, {"response": "Acknowledgements"},
    {"response": "", "userId": 12345, "sessionId": "s42"},
    {"response": "ok", "metadata": {"max_tokens": 512, "region": "eu1", "model": "gpt4o"}},
    {"response": "Okay", "userId": "user42"},  # a last line, then no line of a key
])
@pytest.mark.parametrize("key", [
    "-----BEGIN OPENSSH PRIVATE KEY-----",  # cut right after its first line
    "\n".join(["-----BEGIN RSA PRIVATE KEY-----", *key_lines("cut", 320)]),
])
def test_a_cut_private_key_leaves_the_fields_after_it_alone(
    key: str, after: dict[str, Any],
) -> None:
    """Empty strings, numbers and short words read as lines of the key: one cut key in the
    prompt masked the response, the ids and the metadata."""
    redactor = build_redactor([{"name": "s", "detectors": ["private_key"]}], None)
    e = event(prompt=f"my key: {key}", **after)
    before = copy.deepcopy(e)
    redactor.redact(e)
    assert e["prompt"] == "my key: [REDACTED:private_key]"
    if after["response"] == "Okay" and "\n" in key:  # a last line for all it can tell
        before["response"] = "[REDACTED:private_key]"
    assert {**e, "prompt": None} == {**before, "prompt": None}


def test_a_cut_private_key_is_masked_across_containers_in_document_order() -> None:
    """Read breadth first, a sibling object's string comes between a key's first line and
    the list of its other lines, and ends the run."""
    redactor = build_redactor([{"name": "s", "detectors": ["private_key"]}], None)
    e = event(metadata={"key": {"h": "-----BEGIN RSA PRIVATE KEY-----",
                                "l": key_lines("nested", 132)},
                        "node": {"title": "Sign"}})
    redactor.redact(e)
    assert e["metadata"] == {"key": {"h": "[REDACTED:private_key]",
                                     "l": ["[REDACTED:private_key]"] * 3},
                             "node": {"title": "Sign"}}


def test_the_strings_after_a_cut_private_key_are_followed_so_far() -> None:
    """An event of a key's first line and half a million strings that look like key
    lines cost seconds of CPU in masking: a run of strings is followed for as long as the
    longest keys are."""
    from sidecar.redaction.detectors import _MAX_KEY_STRINGS

    redactor = build_redactor([{"name": "s", "detectors": ["private_key"]}], None)
    lines = key_lines("long", 64 * (_MAX_KEY_STRINGS + 10))
    e = event(toolCalls=[{"output": ["-----BEGIN RSA PRIVATE KEY-----", *lines]}])
    redactor.redact(e)
    output = e["toolCalls"][0]["output"]
    assert set(output[: _MAX_KEY_STRINGS + 1]) == {"[REDACTED:private_key]"}
    assert output[_MAX_KEY_STRINGS + 1:] == lines[_MAX_KEY_STRINGS:]


def test_a_private_key_without_its_end_line_is_masked_past_a_nul_in_its_string() -> None:
    """The strings of an event are joined by NUL for the scan: a NUL inside the string
    read as its end, and what followed it stayed in clear."""
    redactor = build_redactor([{"name": "s", "detectors": ["private_key"]}], None)
    e = event(prompt="-----BEGIN RSA PRIVATE KEY-----\nMIIEow\0keymaterial0\nxyz1",
              response="an e-mail a@b.io\0 after a NUL")
    redactor.redact(e)
    assert e["prompt"] == "[REDACTED:private_key]"
    assert e["response"] == "an e-mail a@b.io\0 after a NUL"  # the rest left as it was
    assert redactor.redact(e) == []
