"""Redaction properties over random interactions: it never raises, leaves no injected
secret and no configured value in clear, keeps the event valid, and is idempotent."""

from __future__ import annotations

import copy
import hashlib
import hmac
import string
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.redaction import DETECTORS, build_redactor
from sidecar.redaction.detectors import Text, scanner
from sidecar.redaction.paths import compile_path, parse

KEY = b"property-test-hmac-key-0123456789"
SECRETS = [
    "jane.doe@example.com",
    "+1 415 555 0132",
    "4111 1111 1111 1111",
    "DE89370400440532013000",
    "078-05-1120",
    "203.0.113.42",
    "2001:db8::7334",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFU",
    "px_live_9fKq2LmZ8xVb4NcT7wRd",
    "sk-proj-Qw8eRt5yUi2oPa7sDf4gHj1kLz9xCv6bNm3",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
    "xoxb-1234567890-abcdefghijkl",
    "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3y\n-----END EC PRIVATE KEY-----",
]
# No example database: it would be a .hypothesis directory in the checkout.
PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# -- random interactions ----------------------------------------------------------------

plain_text = st.text(max_size=24)
# Spaces around the secret: random text glued to it could make it something else
# (a longer number, another word), which no detector should call a secret.
secret_text = st.builds(
    lambda before, secret, after: f"{before} {secret} {after}",
    plain_text, st.sampled_from(SECRETS), plain_text,
)
strings = st.one_of(plain_text, secret_text)
# Integers orjson can write, as the test itself dumps events (redaction takes any size).
integers = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = st.one_of(
    st.none(), st.booleans(), integers, st.floats(allow_nan=False, allow_infinity=False),
    strings,
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)
objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
# What the rules below name is mostly text, as real fields are, but any JSON value too.
named_values = st.one_of(strings, strings, json_values)


def _with(fixed: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Random keys plus, often, the keys the rules below name."""
    return st.builds(lambda extra, named: {**extra, **named}, objects, fixed)


metadata = _with(st.fixed_dictionaries({}, optional={
    "customer_email": named_values, "ssn": named_values, "notes": named_values,
}))
tool_calls = st.lists(
    st.fixed_dictionaries(
        {"name": plain_text, "input": _with(st.fixed_dictionaries({}, optional={
            "account": named_values}))},
        optional={"output": json_values},
    ),
    min_size=1,
    max_size=3,
)
interactions = st.fixed_dictionaries(
    {
        "agentId": st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=16),
        "prompt": st.one_of(strings, objects),
        "response": st.one_of(strings, objects),
    },
    optional={
        "userId": st.one_of(strings, strings, integers, st.none()),
        "conversationId": strings,
        "metadata": metadata,
        "toolCalls": tool_calls,
    },
)

# -- rules --------------------------------------------------------------------------------

PATH_RULES: list[dict[str, Any]] = [
    {"name": "customer-email", "path": "metadata.customer_email", "action": "mask"},
    {"name": "user", "path": "userId", "action": "hash"},
    {"name": "ssn", "path": "metadata.ssn", "action": "remove"},
    {"name": "account", "path": "toolCalls[*].input.account", "action": "partial"},
]
EVERYTHING: list[dict[str, Any]] = [
    *PATH_RULES,
    {"name": "agent", "path": "agentId", "action": "hash"},
    {"name": "secrets", "detectors": list(DETECTORS), "action": "mask"},
    {"name": "notes", "path": "metadata.notes", "patterns": [r"[0-9]{3,}"],
     "action": "partial", "keep_last": 2},
    {"name": "conversation", "path": "conversationId", "detectors": ["email"],
     "action": "hash"},
    {"name": "tools", "path": "toolCalls[*].*", "action": "mask", "agent_ids": ["a", "b"]},
]


def tag(value: Any) -> str:
    data = value.encode() if isinstance(value, str) else orjson.dumps(
        value, option=orjson.OPT_SORT_KEYS)
    return "hmac:" + hmac.new(KEY, data, hashlib.sha256).hexdigest()[:16]


def partial(value: str, keep_last: int = 4) -> str:
    keep = min(keep_last, len(value) // 2)
    return "*" * (len(value) - keep) + value[len(value) - keep :]


def values_at(path: str, event: dict[str, Any]) -> list[Any]:
    return [slot[2] for slot in compile_path(parse(path))(event)]


def assert_valid(event: dict[str, Any]) -> None:
    assert isinstance(event["agentId"], str) and event["agentId"]
    assert isinstance(event["prompt"], str | dict)
    assert isinstance(event["response"], str | dict)


# -- properties ---------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(interactions, st.sampled_from(["mask", "partial", "hash"]))
def test_no_injected_secret_is_left(event: dict[str, Any], action: str) -> None:
    redactor = build_redactor(
        [{"name": "all", "detectors": list(DETECTORS), "action": action}], KEY
    )
    redactor.redact(event)
    blob = orjson.dumps(event)
    for secret in SECRETS:
        assert orjson.dumps(secret)[1:-1] not in blob, secret
    assert_valid(event)


DELIMITERS = st.sampled_from(
    [*" ,;:()[]{}<>\"'\n\t/|=!?*#`", "\r\n", ": ", "= ", ". ", ".\n", "\\n", "**"]
)


@PROPERTY_SETTINGS
@given(plain_text, DELIMITERS, st.sampled_from(SECRETS), DELIMITERS, plain_text)
def test_secrets_are_found_between_any_delimiters(
    before: str, opening: str, secret: str, closing: str, after: str
) -> None:
    event = {"agentId": "a", "prompt": f"{before}{opening}{secret}{closing}{after}",
             "response": ""}
    build_redactor([{"name": "all", "detectors": list(DETECTORS)}], KEY).redact(event)
    assert secret not in event["prompt"]


@PROPERTY_SETTINGS
@given(interactions)
def test_configured_paths_hold_no_clear_value(event: dict[str, Any]) -> None:
    original = copy.deepcopy(event)
    build_redactor(PATH_RULES, KEY).redact(event)

    before = values_at("metadata.customer_email", original)
    after = values_at("metadata.customer_email", event)
    assert after == [None if v is None else "[REDACTED:customer-email]" for v in before]

    before = values_at("userId", original)
    assert values_at("userId", event) == [None if v is None else tag(v) for v in before]

    assert values_at("metadata.ssn", event) == []

    before = values_at("toolCalls[*].input.account", original)
    expected = [
        v if v is None else partial(v) if isinstance(v, str) else "[REDACTED:account]"
        for v in before
    ]
    assert values_at("toolCalls[*].input.account", event) == expected
    assert_valid(event)


@PROPERTY_SETTINGS
@given(interactions)
def test_redaction_never_raises_and_keeps_the_event_valid(event: dict[str, Any]) -> None:
    hits = build_redactor(EVERYTHING, KEY).redact(event)
    assert_valid(event)
    assert event["agentId"].startswith("hmac:")
    blob = orjson.dumps(event)
    for secret in SECRETS:
        assert orjson.dumps(secret)[1:-1] not in blob, secret
        assert all(secret not in hit.path for hit in hits)


@PROPERTY_SETTINGS
@given(interactions, st.sampled_from([PATH_RULES, EVERYTHING, [
    {"name": "all", "detectors": list(DETECTORS), "action": "partial"},
    {"name": "hashed", "detectors": list(DETECTORS), "action": "hash"},
    {"name": "paths", "path": "metadata.*", "action": "partial"},
    {"name": "then-hash", "path": "metadata.*", "action": "hash"},
]]))
def test_redacting_twice_is_redacting_once(
    event: dict[str, Any], rules: list[dict[str, Any]]
) -> None:
    redactor = build_redactor(rules, KEY)
    redactor.redact(event)
    once = copy.deepcopy(event)
    assert redactor.redact(event) == []
    assert event == once


# Text near what the detectors look for: digits with separators, hex and colons, the
# letters of the credential prefixes, and the secrets themselves.
near_misses = st.lists(
    st.one_of(
        st.sampled_from(SECRETS),
        st.text("0123456789 .-()+", max_size=16),
        st.text("0123456789abcdefABCDEF:.", max_size=12),
        st.text("ghpousr_xoxbsk-KIASJey0123456789@.é\\n", max_size=12),
        plain_text,
    ),
    max_size=8,
).map("".join)


@PROPERTY_SETTINGS
@given(near_misses, st.permutations(list(DETECTORS)))
def test_a_scanner_finds_what_its_detectors_find(text: str, names: list[str]) -> None:
    """A rule runs the finders of all its detectors in one loop over one Text."""
    expected = [(s, e, name) for name in names for s, e in DETECTORS[name].find(text)]
    assert scanner(names)(Text(text)) == expected


def _strings_of(value: Any, top: bool = False) -> list[str]:
    """What the detectors read: strings, and integers as their digits."""
    if isinstance(value, str):
        return [value]
    if type(value) is int:
        return [str(value)]
    if isinstance(value, dict):
        return [s for k, v in value.items() if not (top and k == "agentId")
                for s in _strings_of(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings_of(v)]
    return []


@PROPERTY_SETTINGS
@given(interactions, st.sampled_from(["mask", "partial", "hash"]))
def test_each_string_is_redacted_as_if_alone(event: dict[str, Any], action: str) -> None:
    """The strings of an event are scanned joined: every match must land back in its own
    string, at its own place, whatever the strings before it."""
    rules = [{"name": "all", "detectors": list(DETECTORS), "action": action}]
    redactor = build_redactor(rules, KEY)
    before = _strings_of(event, top=True)
    expected = []
    for text in before:
        alone = {"agentId": "a", "prompt": text, "response": ""}
        redactor.redact(alone)
        expected.append(alone["prompt"])
    hits = redactor.redact(event)
    assert _strings_of(event, top=True) == expected
    assert len(hits) == sum(len(build_redactor(rules, KEY).redact(
        {"agentId": "a", "prompt": text, "response": ""})) for text in before)


# Value rules that share the objects they edit are applied together (one lookup of the
# object for all of them): in any order and mix, that must equal applying them one by one.
GROUPABLE_RULES: list[dict[str, Any]] = [
    {"name": "g-email", "path": "metadata.customer_email", "action": "hash"},
    {"name": "g-ssn", "path": "metadata.ssn", "action": "remove"},
    {"name": "g-notes", "path": "metadata.notes", "action": "partial", "keep_last": 3},
    {"name": "g-notes-2", "path": "metadata.notes", "action": "mask"},
    {"name": "g-user", "path": "userId", "action": "mask", "agent_ids": ["a"]},
    {"name": "g-conv", "path": "conversationId", "action": "hash"},
    {"name": "g-meta", "path": "metadata", "action": "remove", "agent_ids": ["b"]},
    {"name": "g-account", "path": "toolCalls[*].input.account", "action": "partial"},
    {"name": "g-name", "path": "toolCalls[*].name", "action": "hash", "agent_ids": ["b"]},
    {"name": "g-input-x", "path": "toolCalls[*].input.x", "action": "remove"},
    {"name": "g-any-ssn", "path": "metadata.*.ssn", "action": "mask"},
    {"name": "g-any-notes", "path": "metadata.*.notes", "action": "remove"},
    {"name": "g-tools", "path": "toolCalls[*]", "action": "remove", "agent_ids": ["c"]},
]


@PROPERTY_SETTINGS
@given(interactions, st.permutations(GROUPABLE_RULES).flatmap(
    lambda rules: st.integers(1, len(rules)).map(lambda n: rules[:n])),
    st.sampled_from(["a", "b", "c", "z"]))
def test_rules_applied_together_equal_rules_applied_one_by_one(
    event: dict[str, Any], rules: list[dict[str, Any]], agent: str
) -> None:
    event["agentId"] = agent
    alone = copy.deepcopy(event)
    # One configuration: each rule knows what the others write.
    together = build_redactor(rules, KEY)
    hits_alone = [
        hit for rule in rules for hit in build_redactor([rule], KEY, together).redact(alone)
    ]
    assert together.redact(event) == hits_alone
    assert event == alone


# Text around matches: marker-like pieces next to them, in and out of place.
_MARKER_PIECES = ["[REDACTED:x]", "[REDACTED:y]", "hmac:0123456789abcdef", "[REDACTED:", "hmac:",
                  "ab", " ", ":", "-"]


@PROPERTY_SETTINGS
@given(st.lists(st.sampled_from(_MARKER_PIECES), max_size=12).map("".join),
       st.lists(st.tuples(st.integers(0, 60), st.integers(1, 12)), max_size=8))
def test_matches_are_replaced_around_markers_as_the_plain_check_says(
    text: str, starts_lengths: list[tuple[int, int]]
) -> None:
    """The one-pass filter equals subtracting every marker from every merged span, keeping
    the pieces of a cut span that hold a letter or a digit."""
    import re

    from sidecar.redaction.redactor import markers_of, merged, to_replace

    known = markers_of(["x"], True)  # "[REDACTED:y]" is no marker of this redactor
    spans = [(start, start + length, "d") for start, length in starts_lengths]
    markers = [m.span() for m in known.finditer(text)]
    expected = []
    for start, end, label in merged(list(spans)):
        inside = [m for m in markers if start < m[1] and m[0] < end]
        if not inside:
            expected.append((start, end, label))
            continue
        cuts = [start, *(edge for m in inside for edge in m), end]
        for piece_start, piece_end in zip(cuts[::2], cuts[1::2], strict=True):
            piece_start = max(piece_start, start)
            if piece_start < piece_end and re.search(r"[^\W_]", text[piece_start:piece_end]):
                expected.append((piece_start, piece_end, label))
    assert to_replace(text, spans, known) == expected
