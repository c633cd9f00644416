"""Adversarial redaction: values in a row, at the edges of a string, between non-ASCII
text, CRLF, tabs and JSON escapes; the masking of request bodies against the walk; and
each leak these tests found, fixed."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.redaction import DETECTORS, build_redactor
from sidecar.redaction.stage import BUILTIN_SECRETS, RedactionStage

KEY = b"adversarial-test-hmac-key-0123456789"
SETTINGS = settings(
    max_examples=150, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
JWT = (
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)
PRIVATE_KEY = (
    "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3y\n-----END EC PRIVATE KEY-----"
)
PUTTY_KEY = (
    "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nPrivate-Lines: 1\n"
    "AAAAIGFzZGZhc2RmYXNkZg==\nPrivate-MAC: 5f1a2b3c4d5e6f70"
)

# Values each detector finds alone, in every way of writing them the detector supports.
VALUES: dict[str, list[str]] = {
    "email": ["jane.doe@example.com", "a+tag@mail.example.co.uk", "josé@bücher.de"],
    "phone": ["+1 415 555 0132", "+44 20 7946 0958", "(555) 123-4567", "555-123-4567",
              "555.123.4567", "1-800-555-1234", "+14155550132", "+33 1 23 45 67 89"],
    "credit_card": ["4111111111111111", "378282246310005", "6011111111111117",
                    "4111 1111 1111 1111", "4111-1111-1111-1111", "3782 822463 10005"],
    "iban": ["DE89 3704 0044 0532 0130 00", "DE89370400440532013000",
             "GB82 WEST 1234 5698 7654 32", "NO9386011117947", "FR1420041010050500013M02606",
             "BE68 5390 0754 7034", "NL91ABNA0417164300", "CH9300762011623852957",
             "SE4550000000058398257466", "BE68539007547034"],
    "us_ssn": ["078-05-1120", "123-45-6789"],
    "ipv4": ["10.0.0.1", "203.0.113.42", "255.255.255.255"],
    "ipv6": ["2001:db8::1", "fe80::1", "2001:0db8:85a3::8a2e:0370:7334", "::ffff:192.0.2.1"],
    "jwt": [JWT],
    "precogx_key": ["px_live_9fKq2LmZ8xVb4NcT7wRd"],
    "openai_key": ["sk-proj-Qw8eRt5yUi2oPa7sDf4gHj1kLz9xCv6bNm3"],
    "aws_access_key": ["AKIAIOSFODNN7EXAMPLE", "ASIAY34FZKBOKMUTVV7A"],
    "github_token": ["ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
                     "github_pat_11ABCDEFG0123456789_abcdefghijklmnop"],
    "slack_token": ["xoxb-1234567890-abcdefghijkl"],
    "private_key": [PRIVATE_KEY, PUTTY_KEY],
}
ALL_VALUES = [value for values in VALUES.values() for value in values]
SECRET_VALUES = [value for name, values in VALUES.items() if DETECTORS[name].secret
                 for value in values]

# One separator between two values: whitespace, ordinary punctuation, JSON escapes as
# text, non-ASCII punctuation and letters.
SEPARATORS = [
    " ", "  ", ", ", ",", ";", "; ", "\n", "\r\n", "\t", " | ", " / ", "\\n", "\\r\\n", "\\t",
    " and ", " é ", "\u00a0", "\u3000", "\uff0c", "\u3002", "\u2014", " \U0001f600 ",
]
# What may come before the first value and after the last one: nothing (the very start or
# end of the string), non-ASCII text, escapes, brackets, quotes, an ellipsis.
EDGES = ["", " ", "...", "é", "日本語 ", "\t", "\r\n", "\\n", "(", ")", '"', "'", "«", "»", "<",
         ">", "[", "]", "\u200b", "\ufeff", "\U0001f600", ": ", ". ", "\\t"]


def mask_all(text: str, detectors: list[str] | None = None, action: str = "mask") -> str:
    redactor = build_redactor(
        [{"name": "all", "detectors": detectors or list(DETECTORS), "action": action}], KEY
    )
    event = {"agentId": "a", "prompt": text, "response": ""}
    redactor.redact(event)
    prompt: str = event["prompt"]
    return prompt


def found(detector: str, text: str) -> list[str]:
    return [text[start:end] for start, end in DETECTORS[detector].find(text)]


def twice(text: str, action: str = "mask") -> tuple[str, str]:
    """The prompt after one redaction and after a second one."""
    redactor = build_redactor(
        [{"name": "all", "detectors": list(DETECTORS), "action": action}], KEY
    )
    event = {"agentId": "a", "prompt": text, "response": ""}
    redactor.redact(event)
    once = event["prompt"]
    redactor.redact(event)
    return once, event["prompt"]


def test_every_value_here_is_found_alone() -> None:
    for name, values in VALUES.items():
        for value in values:
            assert found(name, value) == [value], (name, value)


# -- several values in a row, at the edges of a string ------------------------------------

rows = st.tuples(
    st.sampled_from(EDGES),
    st.lists(st.tuples(st.sampled_from(ALL_VALUES), st.sampled_from(SEPARATORS)),
             min_size=1, max_size=5),
    st.sampled_from([*EDGES, "..."]),
)


def _join(row: tuple[str, list[tuple[str, str]], str]) -> tuple[str, list[str]]:
    before, items, after = row
    text = before + "".join(value + sep for value, sep in items[:-1]) + items[-1][0] + after
    return text, [value for value, _ in items]


@SETTINGS
@given(rows)
def test_values_in_a_row_are_all_redacted(row: tuple[str, list[tuple[str, str]], str]) -> None:
    text, values = _join(row)
    masked = mask_all(text)
    for value in values:
        assert value not in masked, (text, masked)


@SETTINGS
@given(rows, st.sampled_from(["mask", "hash"]))
def test_values_in_a_row_redacting_twice_is_redacting_once(
    row: tuple[str, list[tuple[str, str]], str], action: str
) -> None:
    text, _ = _join(row)
    once, again = twice(text, action)
    assert once == again


@SETTINGS
@given(st.sampled_from(ALL_VALUES), st.sampled_from(SEPARATORS), st.integers(2, 6))
def test_a_value_repeated_is_redacted_every_time(value: str, sep: str, times: int) -> None:
    masked = mask_all(sep.join([value] * times))
    assert value not in masked
    assert masked.count("[REDACTED:") == times


@pytest.mark.parametrize("value", ALL_VALUES)
def test_a_whole_string_that_is_one_value_is_one_mask(value: str) -> None:
    masked = mask_all(value)
    assert masked.startswith("[REDACTED:") and masked.endswith("]")
    assert masked.count("[REDACTED:") == 1


# Realistic lists and neighbours that the detectors get right today.
ROWS_FOUND = [
    ("ipv4", "range 10.0.0.1-10.0.0.254", ["10.0.0.1", "10.0.0.254"]),
    ("ipv4", "10.0.0.1\u201310.0.0.2", ["10.0.0.1", "10.0.0.2"]),
    ("ipv4", "10.0.0.1:8080,10.0.0.2:8080", ["10.0.0.1", "10.0.0.2"]),
    ("ipv4", "hosts: 10.0.0.1;10.0.0.2\t10.0.0.3\r\n", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
    ("phone", "call 555-123-4567 ext. 89", ["555-123-4567"]),
    ("phone", "+1 (415) 555-0132\r\n+1 (415) 555-0133", ["+1 (415) 555-0132",
                                                          "+1 (415) 555-0133"]),
    ("phone", "(555) 123-4567/(555) 123-4568", ["(555) 123-4567", "(555) 123-4568"]),
    ("phone", "555-123-4567, 555-123-4568, 555-123-4569",
     ["555-123-4567", "555-123-4568", "555-123-4569"]),
    ("phone", "+49 (0) 30 1234 5678", ["+49 (0) 30 1234 5678"]),
    ("phone", "+91 98765 43210", ["+91 98765 43210"]),
    ("us_ssn", "SSNs: 078-05-1120/123-45-6789", ["078-05-1120", "123-45-6789"]),
    ("us_ssn", "078-05-1120\r\n123-45-6789", ["078-05-1120", "123-45-6789"]),
    ("credit_card", "cards 4111111111111111,5500000000000004",
     ["4111111111111111", "5500000000000004"]),
    ("credit_card", "4111-1111-1111-1111/5500-0000-0000-0004",
     ["4111-1111-1111-1111", "5500-0000-0000-0004"]),
    ("credit_card", "4111 1111 1111 1111 5500 0000 0000 0004",
     ["4111 1111 1111 1111", "5500 0000 0000 0004"]),
    ("credit_card", "2024 4111111111111111", ["4111111111111111"]),
    ("iban", "IBAN DE89 3704 0044 0532 0130 00\r\nBIC COBADEFFXXX",
     ["DE89 3704 0044 0532 0130 00"]),
    ("iban", "CH9300762011623852957 CHF", ["CH9300762011623852957"]),
    ("iban", "GB82WEST12345698765432 GBP", ["GB82WEST12345698765432"]),
    ("iban", "AT61 1904 3002 3457 3201 EUR", ["AT61 1904 3002 3457 3201"]),
    ("iban", "DE89 3704 0044 0532 0130 00 DE89 3704 0044 0532 0130 00",
     ["DE89 3704 0044 0532 0130 00"] * 2),
    ("ipv6", "[2001:db8::1]:443,[2001:db8::2]:443", ["2001:db8::1", "2001:db8::2"]),
    ("ipv6", "fe80::1%eth0 and 2001:db8::1/64", ["fe80::1", "2001:db8::1"]),
    ("email", "mail: <jane@example.com>, <john@example.com>",
     ["jane@example.com", "john@example.com"]),
    ("email", "jane@example.com;john@example.com\r\n", ["jane@example.com", "john@example.com"]),
    ("email", "JANE@EXAMPLE.COM jane@例え.jp", ["JANE@EXAMPLE.COM", "jane@例え.jp"]),
    ("private_key", PRIVATE_KEY.replace("\n", "\r\n") + "\r\n" + PRIVATE_KEY,
     [PRIVATE_KEY.replace("\n", "\r\n"), PRIVATE_KEY]),
    ("private_key", "key: " + PRIVATE_KEY.replace("\n", "\\n") + "\\n",
     [PRIVATE_KEY.replace("\n", "\\n")]),
]


@pytest.mark.parametrize(("detector", "text", "expected"), ROWS_FOUND)
def test_realistic_rows_are_found(detector: str, text: str, expected: list[str]) -> None:
    assert found(detector, text) == expected
    masked = mask_all(text)
    for value in expected:
        assert value not in masked


# -- odd strings never make the walk raise ------------------------------------------------

odd_text = st.text(
    st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "\x00", "\r", "\\"])),
    max_size=30,
)
odd_strings = st.lists(st.one_of(odd_text, st.sampled_from(ALL_VALUES)), max_size=4).map(
    "".join
)


@SETTINGS
@given(odd_strings, odd_strings, st.sampled_from(["mask", "partial", "hash"]))
def test_lone_surrogates_and_nuls_never_make_the_walk_raise(
    prompt: str, inner: str, action: str
) -> None:
    redactor = build_redactor(
        [{"name": "all", "detectors": list(DETECTORS), "action": action}], KEY
    )
    event: dict[str, Any] = {"agentId": "a", "prompt": prompt,
                             "response": {"r": [inner, inner], "s": inner}}
    redactor.redact(event)
    assert isinstance(event["prompt"], str)


# -- masking in the request body against the walk ---------------------------------------

_BODY_PIECES = [
    *SECRET_VALUES, *SEPARATORS, "\\", '"', "\\b", "\\f", "\x08", "\x0c", "\x1f", "\u2028",
    "é", "\U0001f600", "[REDACTED:jwt]", "agentId", '"agentId":"', "sk-", "eyJ", "AKIA",
]
_body_texts = st.lists(st.sampled_from(_BODY_PIECES), max_size=6).map("".join)


@settings(max_examples=300, deadline=None, database=None)
@given(prompt=_body_texts, inner=_body_texts, key=_body_texts, indent=st.booleans())
def test_masking_values_in_a_row_in_the_body_redacts_as_the_walk(
    prompt: str, inner: str, key: str, indent: bool
) -> None:
    whole = build_redactor([BUILTIN_SECRETS], None)
    stage = RedactionStage(build_redactor([], None), whole)
    event: dict[str, Any] = {
        "agentId": "a", "prompt": prompt,
        "response": {"r": [inner, [inner]], key: inner, "m": {"agentId": inner}},
    }
    body = orjson.dumps(event, option=orjson.OPT_INDENT_2 if indent else 0)
    masked, secrets = stage.mask_body(body)
    stored = orjson.loads(masked)
    stage(stored, secrets)
    expected = copy.deepcopy(event)
    whole.redact(expected)
    assert stored == expected


def test_masking_in_a_hand_written_body_redacts_as_the_walk() -> None:
    """Bodies not written by orjson: spaces around colons, escaped slashes, CRLF."""
    whole = build_redactor([BUILTIN_SECRETS], None)
    stage = RedactionStage(build_redactor([], None), whole)
    key = VALUES["openai_key"][0]
    bodies = [
        '{ "agentId" : "a" ,\r\n "prompt" : "k ' + key + '\\/x" , "response" : "' + JWT + '"}',
        '{"agentId":"a","prompt":"{\\"agentId\\": \\"' + key + '\\"}","response":""}',
        '{"agentId":"a","prompt":"' + key + '\\r\\n' + key + '\\t' + key + '","response":""}',
        '{"agentId":"a","prompt":["' + key + '","\\\\n' + key + '"],"response":"\\"'
        + key + '\\""}',
    ]
    for body in bodies:
        masked, secrets = stage.mask_body(body.encode())
        stored = orjson.loads(masked)
        stage(stored, secrets)
        expected = orjson.loads(body)
        whole.redact(expected)
        assert stored == expected, body
        assert key not in orjson.dumps(stored).decode(), body


# -- leaks found by these tests and fixed -------------------------------------------------

CARD = "4111 1111 1111 1111"


@pytest.mark.parametrize("text", [
    f"PIN 1234 {CARD}",
    f"in 2024 {CARD}",
    f"zip 94105 {CARD}",
    f"call 555-123-4567 {CARD}",
    f"ssn 078-05-1120 {CARD}",
    f"amex 3782 822463 10005 {CARD}",
    f"4111111111111111 {CARD}",
    f"4111 1111 1111 1112 {CARD}",
    f"+44 20 7946 0958 {CARD}",
    f"DE89370400440532013000 {CARD}",
    f"2001:0db8:85a3::8a2e:0370:7334 {CARD}",
    f"ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 {CARD}",
])
def test_a_grouped_card_after_a_number_is_found(text: str) -> None:
    """The needle is first found in the neighbour's last digits; that candidate is refused,
    and the search must go on from its next group, not after all it read. (A neighbour
    that is a card itself is found too.)"""
    assert CARD in found("credit_card", text)


def test_a_card_after_an_international_phone_is_masked_whole() -> None:
    """The phone regex takes the card's first group (up to 15 digits); the card is still
    found, and the two spans are masked as one."""
    masked = mask_all(f"+1 415 555 0132 {CARD}")
    assert "1111 1111 1111" not in masked


@pytest.mark.parametrize(("text", "iban"), [
    ("SE4550000000058398257466 SEK", "SE4550000000058398257466"),
    ("PL61109010140000071219812874 PLN", "PL61109010140000071219812874"),
    ("AT611904300234573201 EUR", "AT611904300234573201"),
    ("IBAN BE68539007547034 BIC GEBABEBB", "BE68539007547034"),
    ("ES9121000418450200051332 BIC CAIXESBBXXX", "ES9121000418450200051332"),
    ("AT611904300234573201 10.0.0.1", "AT611904300234573201"),
    ("BE68539007547034 BE68539007547034", "BE68539007547034"),
])
def test_a_compact_iban_before_a_short_word_is_found(text: str, iban: str) -> None:
    """A compact IBAN whose length is a multiple of 4, then a space and a short word: the
    regex reads the word as one more group, which must not make the IBAN count as grouped."""
    assert iban in found("iban", text)


@pytest.mark.parametrize("text", [
    "BE68539007547034 DE89370400440532013000",
    "Ref. RF18 5390 0754 7034 DE89 3704 0044 0532 0130 00",
])
def test_an_iban_after_a_refused_candidate_is_found(text: str) -> None:
    assert found("iban", text)[-1].startswith("DE89")


@pytest.mark.parametrize("text", ["Connecting...10.0.0.1", "at 10.0.0.1...10.0.0.2 down"])
def test_an_ipv4_address_after_an_ellipsis_is_found(text: str) -> None:
    """The dot-and-digits tail is first read from the ellipsis' last dot; the address starts
    after it. (Right after a word, "notes.10.0.0.1" reads as a dotted name, as "x.1.2.3.4"
    in tests/test_redaction.py does.)"""
    assert found("ipv4", text)[0] == "10.0.0.1"


@pytest.mark.parametrize("text", [
    "jane@example.com(555) 123-4567",
    "10.0.0.1(555) 123-4567",
    "(555) 123-4567(555) 987-6543",
])
def test_a_phone_in_parentheses_right_after_a_match_is_masked_at_once(text: str) -> None:
    """Glued to the match before it, the phone is found once that match is masked: the
    string is looked at again in the same redaction."""
    once, again = twice(text)
    assert once == again


@pytest.mark.parametrize(("text", "address"), [
    ("host:::1", "::1"),
    ("ip:::ffff:10.0.0.1", "::ffff:10.0.0.1"),
])
def test_an_ipv6_address_starting_with_colons_after_a_label_is_found(
    text: str, address: str
) -> None:
    assert found("ipv6", text) == [address]


@pytest.mark.parametrize("text", ["fe80::1", "addr 2001:db8::1 up"])
def test_the_partial_action_on_an_ipv6_address_is_idempotent(text: str) -> None:
    """What partial keeps of "fe80::1" ("****::1") is an address again: the string is
    looked at again until nothing is left to find."""
    once, again = twice(text, "partial")
    assert once == again


class _CountedSearch:
    """A compiled regex whose searches are counted."""

    def __init__(self, regex: Any) -> None:
        self.regex, self.searches = regex, 0

    def search(self, text: str, pos: int = 0) -> Any:
        self.searches += 1
        return self.regex.search(text, pos)


def test_key_blocks_without_end_lines_look_for_one_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each first line without an end line searched the rest of the text for one: 20,000
    BEGIN lines in 640 KB took five seconds of CPU. Once none follows, none is looked for."""
    from sidecar.redaction import detectors

    counted = [(literal, first, _CountedSearch(end))
               for literal, first, end in detectors._KEY_BLOCKS]
    monkeypatch.setattr(detectors, "_KEY_BLOCKS", tuple(counted))
    text = "\0".join(["-----BEGIN RSA PRIVATE KEY-----", "PuTTY-User-Key-File-2: ssh-rsa"] * 500)
    spans = detectors.DETECTORS["private_key"].find(text)
    assert len(spans) == 1000  # every first line masked, each to the end of its string
    assert [end.searches for _, _, end in counted] == [1, 1, 0]  # no RFC 4716 block here


def test_events_nested_as_deep_as_json_goes_are_redacted_again_and_again() -> None:
    """The place of a hit is cached by its trail: the second event nested 1,000 levels
    deep compared two such trails and raised RecursionError (a 500 for the request)."""
    stage = RedactionStage(build_redactor([], KEY), build_redactor([BUILTIN_SECRETS], None))
    body = (b'{"agentId":"a","prompt":"p","response":"r","metadata":' + b'{"k":' * 1000
            + b'"' + PRIVATE_KEY.replace("\n", "\\n").encode() + b'"' + b"}" * 1001)
    for _ in range(2):
        masked, secrets = stage.mask_body(body)
        event = orjson.loads(masked)
        hits = stage(event, secrets)
        assert [hit.path.count(".k") for hit in hits] == [1000]
        node = event["metadata"]
        for _ in range(999):
            node = node["k"]
        assert node == {"k": "[REDACTED:private_key]"}
