"""Stage 2 as the receivers use it: the configured rules, credentials masked by default,
every hit counted by rule and action (never by value)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from sidecar.config import Config, ConfigError
from sidecar.logs import body_secrets, register_secret, text_secrets, unsearched_secrets
from sidecar.metrics import Metrics, Tally
from sidecar.redaction.detectors import SECRET_DETECTORS, Found, Text, scanner
from sidecar.redaction.raw_json import PLAIN_DETECTORS, mask_in_json
from sidecar.redaction.redactor import Hit, Redactor, build_redactor
from sidecar.redaction.rules import RedactionError, Rule

BUILTIN_SECRETS_RULE = "builtin-secrets"


BUILTIN_SECRETS = {"name": BUILTIN_SECRETS_RULE, "detectors": list(SECRET_DETECTORS),
                   "action": "mask"}


def read_hmac_key(config: Config) -> bytes | None:
    """The hash action's key: env PRECOGX_SIDECAR_REDACTION_HMAC_KEY, or the key file.

    Registered as a secret only once the rules accepted it (see build_stages): a short
    key refused as such would otherwise be masked in the very message refusing it, and
    in every word that holds it."""
    if config.redaction.hmac_key:
        return config.redaction.hmac_key.encode()
    path = config.redaction.hmac_key_file
    if not path:
        return None
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"redaction.hmac_key_file: cannot read {path}: {e.strerror}") from None
    if not key:
        raise ConfigError(f"redaction.hmac_key_file: {path} is empty")
    return key


# Every built-in credential detector needs one of the literals below in the text it
# matches. orjson escapes only quotes, backslashes and control characters, none of which
# occur in them, so a serialised event without any of them holds no credential: the walk
# over all its strings (most of the cost of redaction) can be skipped.
# They are grouped by one byte they hold, the rarest in prose and JSON: bytes.find of a
# single byte is a memchr, some fifty times faster than the regex engine's own scan
# (0.3 to 0.7 ns a byte: 34 us for the five groups over a 21 KB prompt), so in a long
# body the search jumps from one place the byte occurs to the next and tries the
# group's regex there only (17 us).
# The byte is held as an int: ``bytes in bytes`` first tries its operand as an int and
# formats (then drops) a TypeError, five times the cost of the memchr.
# Each group's regex is the shared byte, then what follows it in each detector's literal
# (if anything), then a lookbehind for the whole literal: most places the byte occurs
# are followed by none of them, and a character compared fails sooner than a lookbehind
# (a quarter off the "_" group's pass over JSON keys). Each detector's branch ends in an
# empty group of its own, so one pass over the body names every detector of the group it
# holds (the match's lastindex), rather than one search per detector. No byte is the
# group's byte in two literals (private_key's is the last dash of "-----BEGIN", not the
# first, which may end "sk-"; the first of "PuTTY-User-Key-File-"; the fourth of
# "---- BEGIN SSH2 "): a pass finds each literal at a byte of its own.
# tests/test_redaction_e2e.py keeps the literals and the detectors in step.
_Member = tuple[str, re.Pattern[bytes]]
_Group = tuple[int, re.Pattern[bytes], tuple[_Member, ...]]


def _group(byte: bytes, **tails: bytes) -> _Group:
    """``tails``: what follows the byte in each detector's literal, by detector."""
    branches = b"|".join(tail + b"()" for tail in tails.values())
    members = tuple((name, re.compile(byte + tail)) for name, tail in tails.items())
    return ord(byte), re.compile(byte + b"(?:" + branches + b")"), members


_TRIGGERS: tuple[_Group, ...] = (
    _group(b"J", jwt=rb"(?<=eyJ)"),
    _group(b"_", precogx_key=rb"(?:live|test)_(?<=px_live_|px_test_)",
           aws_secret_key=rb"(?:access_key(?<=secret_access_key)|ACCESS_KEY(?<=SECRET_ACCESS_KEY))",
           github_token=rb"(?:(?<=gh[pousr]_)|pat_(?<=github_pat_))"),
    _group(b"-", openai_key=rb"(?<=sk-)", slack_token=rb"(?:(?<=xox[abeprs]-)|(?<=xapp-))",
           private_key=rb"(?:BEGIN(?<=-----BEGIN)|User-Key-File-(?<=PuTTY-User-Key-File-)"
                       rb"| BEGIN SSH2 (?<=---- BEGIN SSH2 ))"),
    _group(b"A", aws_access_key=rb"[KS]IA", aws_secret_key=rb"ccessKey(?<=[Ss]ecretAccessKey)"),
    # The slash after the host (which the detector needs too): each of its letters is
    # common in prose. JSON may write it "\/".
    _group(b"/", slack_webhook=rb"(?:(?<=hooks\.slack\.com/)|(?<=hooks\.slack\.com\\/))"),
)
# No literal starts more than this many bytes before its group's byte ("hooks.slack.com\"
# of slack_webhook).
_LEAD = 16
# Below this many bytes the regex engine's scan costs less than a call per place; and
# where two places lie closer than _GAP bytes, the rest is left to that scan too.
_HOP_FROM = 2048
_GAP = 512


def _search(data: bytes, byte: int, gate: re.Pattern[bytes], pos: int) -> re.Match[bytes] | None:
    """``gate.search(data, pos)`` for a gate that starts with ``byte``, by memchr."""
    if len(data) - pos < _HOP_FROM:
        return gate.search(data, pos)
    find, match = data.find, gate.match
    last = pos - _GAP
    while (pos := find(byte, pos)) != -1:
        if pos - last < _GAP:
            return gate.search(data, pos)
        m = match(data, pos)
        if m is not None:
            return m
        last = pos
        pos += 1
    return None


Detectors = tuple[str, ...]
BACKSLASH = ord("\\")


def _holds_unicode_escape(body: bytes) -> bool:
    # The memchr first: most bodies hold no backslash at all (and no ``bytes in bytes``,
    # see _TRIGGERS).
    return BACKSLASH in body and body.find(b"\\u") != -1


def secret_detectors_in(data: bytes) -> Detectors:
    """The credential detectors whose trigger literal ``data`` holds, in catalogue order:
    only they can find anything in it."""
    return secret_triggers_in(data)[0]


def secret_triggers_in(data: bytes) -> tuple[Detectors, int]:
    """As secret_detectors_in, and where a credential in ``data`` can start at the
    earliest: a little before the first of their literals (its length if none)."""
    found: list[str] = []
    first = len(data)
    for byte, gate, members in _TRIGGERS:
        if byte not in data:
            continue
        m = _search(data, byte, gate, 0)
        if m is not None and m.start() < first:
            first = m.start()
        named = 0
        while m is not None:
            name = members[m.lastindex - 1][0]  # type: ignore[operator]  # a branch matched
            if name in found:
                # A literal seen before: a body full of it must not cost a search per
                # copy. The others are looked for apiece, from here (none comes before).
                at = m.start()
                found += [other for other, regex in members
                          if other not in found and regex.search(data, at)]
                break
            found.append(name)
            named += 1
            if named == len(members):
                break
            m = _search(data, byte, gate, m.end())
    if not found:
        return (), first
    if len(found) > 1:
        found.sort(key=_CATALOGUE_ORDER.__getitem__)
    return tuple(found), max(0, first - _LEAD)


_CATALOGUE_ORDER = {name: i for i, name in enumerate(SECRET_DETECTORS)}


class RedactionStage:
    def __init__(
        self, rules: Redactor, secrets: Redactor | None = None, metrics: Metrics | None = None
    ) -> None:
        self.rules = rules
        self.secrets = secrets
        # Per set of credential detectors a body can hold, made on first use: the rule
        # narrowed to them (each detector skipped saves a search through every string of
        # the event), and their finder for the body's text.
        self._narrowed: dict[Detectors, tuple[Redactor, Callable[[Text], list[Found]]]] = {}
        # Masking in the body is the credential rule's own work only while that rule is
        # the built-in one: detectors anywhere, masked, for every agent.
        self._in_body = secrets is not None and [
            (rule.name, rule.action, rule.path, rule.patterns, rule.agent_ids)
            for rule in secrets.rules
        ] == [(BUILTIN_SECRETS_RULE, "mask", None, (), None)]
        self._tallies: Mapping[tuple[str, str], Tally] = {}
        if metrics is not None:
            # One series per rule and action from the start: a dashboard shows zeros.
            self._tallies = {
                (rule.name, rule.action):
                    metrics.tally(metrics.redactions.labels(rule.name, rule.action))
                for rule in self.all_rules
            }

    def _narrowed_to(self, names: Detectors) -> tuple[Redactor, Callable[[Text], list[Found]]]:
        """The credential rule as given, keeping only the detectors named; their finder."""
        narrowed = self._narrowed.get(names)
        if narrowed is None:
            assert self.secrets is not None
            kept = (
                replace(rule, detectors=tuple(d for d in rule.detectors if d in names))
                for rule in self.secrets.rules
            )
            rules = [rule for rule in kept if rule.scans_text]
            redactor = Redactor(rules, None, self.secrets)
            narrowed = self._narrowed[names] = (redactor, scanner(names))
        return narrowed

    @property
    def all_rules(self) -> list[Rule]:
        return [*(self.secrets.rules if self.secrets else ()), *self.rules.rules]

    def describe(self) -> list[str]:
        return [*(self.secrets.describe() if self.secrets else ()), *self.rules.describe()]

    def mask_body(self, body: bytes) -> tuple[bytes, Detectors | None]:
        """The body without the sidecar's own secrets, then as ``_mask_credentials``."""
        return self._mask_credentials(without_own_secrets(body))

    def _mask_credentials(self, body: bytes) -> tuple[bytes, Detectors | None]:
        """The request body to parse, with the credentials in it masked where that can be
        done in its text (see raw_json), and the credential detectors still to run on each
        of its events: decided once for all of them, or None to decide per event.

        Only a \\u escape can hide a trigger literal in raw JSON (no other escape
        produces one of their characters); with one, each event is checked after parsing.
        """
        if self.secrets is None or _holds_unicode_escape(body):
            return body, None
        names, start = secret_triggers_in(body)
        if not names or not self._in_body or not PLAIN_DETECTORS.issuperset(names):
            return body, names
        try:
            text = body.decode()
        except UnicodeDecodeError:
            return body, names  # not JSON either: parsing refuses it
        if len(text) != len(body):
            # Some characters took more than a byte: count those before ``start`` (the
            # one it may cut in two is left out, and searched).
            start = len(body[:start].decode(errors="ignore"))
        masked = mask_in_json(text, self._narrowed_to(names)[1], start)
        if masked is None:
            return body, names
        text, count = masked
        if not count:
            return body, ()
        if self._tallies:
            self._tallies[BUILTIN_SECRETS_RULE, "mask"].count += count
        return text.encode(), ()

    def applies(self, possible_secrets: Detectors | None) -> bool:
        """Whether any rule can change an event of a body the pre-check decided on."""
        if self.rules.rules:
            return True
        return self.secrets is not None and possible_secrets != ()

    def __call__(
        self, event: dict[str, Any], possible_secrets: Detectors | None = None
    ) -> list[Hit]:
        hits = self.apply(event, possible_secrets)
        self.count(hits)
        return hits

    def apply(self, event: dict[str, Any], possible_secrets: Detectors | None = None) -> list[Hit]:
        """Redact ``event`` in place without counting: safe in another thread."""
        hits: list[Hit] = []
        if self.secrets is not None:
            if possible_secrets is None:
                possible_secrets = _possible_secrets_of(event)
            if possible_secrets:
                hits += self._narrowed_to(possible_secrets)[0].redact(event)
        if self.rules.rules:
            hits += self.rules.redact(event)
        return hits

    def count(self, hits: list[Hit]) -> None:
        """In the event loop's thread only: the tallies are plain integers."""
        tallies = self._tallies
        if tallies:
            for hit in hits:
                tallies[hit.rule, hit.action].count += 1

    async def off_the_loop(
        self, items: list[dict[str, Any]], possible_secrets: Detectors | None
    ) -> list[Hit]:
        """Redact ``items`` in a worker thread, then count; the hits. Some detectors take
        up to about a second per MiB of adversarial text (e-mail on "a@a@...", IPv6 on
        ":: :: ..."), and so may an operator's pattern: in a thread, the event loop takes
        the GIL back every switch interval and keeps answering other requests meanwhile."""
        def apply_all() -> list[Hit]:
            return [hit for item in items for hit in self.apply(item, possible_secrets)]

        hits = await asyncio.to_thread(apply_all)
        self.count(hits)
        return hits


OWN_SECRET_MASK = b"[REDACTED:sidecar_secret]"
OWN_SECRET_MASK_TEXT = OWN_SECRET_MASK.decode()


def without_own_secrets(body: bytes) -> bytes:
    """``body`` with the sidecar's API key, tokens and HMAC key masked, whatever the
    configuration: a user pasting the ingest token into a chat must not put it on disk."""
    for secret in body_secrets():
        # One scan: without a match, replace hands back the body itself, no copy.
        body = body.replace(secret, OWN_SECRET_MASK)
    return body


def text_without_own_secrets(text: str) -> str:
    """As without_own_secrets, for text already decoded (a form's fields: encoded, a
    base64 token's "+", "/" and "=" hid it from the search in the raw body)."""
    for secret in text_secrets():
        if secret in text:
            text = text.replace(secret, OWN_SECRET_MASK_TEXT)
    return text


_ASCII_ESCAPE = re.compile(rb"\\u00[0-7]")


def _hides_characters(body: bytes) -> bool:
    """Whether an escape in ``body`` can stand for a character of a secret: "\\u" for any,
    "\\/", '\\"' and "\\\\" only for a secret holding that character ('\\"' is in many
    answers, in no token made as README says)."""
    secrets = text_secrets()
    if b"\\u" in body and (
        _ASCII_ESCAPE.search(body) is not None or not all(s.isascii() for s in secrets)
    ):
        # Python's json.dumps writes every "é" as "\\u00e9": only an escape of an ASCII
        # character can stand for one of a secret made of them.
        return True
    return any(b"\\" + c.encode() in body for c in '/"\\' if any(c in s for s in secrets))


def escaped_own_secrets_out(body: bytes, doc: Any) -> None:
    """The sidecar's secrets masked in a parsed JSON document, keys included, where the
    body's bytes may have hidden them: JSON may write "/" as "\\/" (PHP does by default)
    and any character as "\\u....". Only for a body holding such an escape: the search in
    its bytes (without_own_secrets) saw everything else. ("\\n" and the other escapes of
    control characters, in most answers, hide nothing: no secret holds one.)"""
    if not text_secrets():
        return
    escaped = BACKSLASH in body and _hides_characters(body)
    # A secret with a character JSON may need to escape (or all digits) is not searched
    # in the bytes at all: when the body holds it as it is, walk too.
    if not escaped and not any(secret in body for secret in unsearched_secrets()):
        return
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in list(node):
                masked = text_without_own_secrets(key)
                if masked != key:
                    node[masked] = node.pop(key)
            entries: Iterable[tuple[Any, Any]] = list(node.items())
        elif isinstance(node, list):
            entries = enumerate(node)
        else:
            continue
        for slot, value in entries:
            if isinstance(value, str):
                node[slot] = text_without_own_secrets(value)
            elif isinstance(value, dict | list):
                stack.append(value)



def _possible_secrets_of(event: dict[str, Any]) -> Detectors:
    try:
        return secret_detectors_in(orjson.dumps(event))
    except orjson.JSONEncodeError:  # nested past the 255 levels orjson writes: all of them
        return SECRET_DETECTORS


def build_stages(
    config: Config, metrics: Metrics | None = None
) -> tuple[RedactionStage, RedactionStage]:
    """Every rule (for what is stored), and the ``inline`` ones (for what Dify's model sees).

    The operator's rules are checked on their own, so an error names their index. The
    built-in credential rule runs first.
    """
    key = read_hmac_key(config)
    try:
        # Every stage leaves alone what any rule of the configuration writes.
        rules = build_redactor(config.redaction.rules, key)
        secrets = build_redactor([BUILTIN_SECRETS], None, rules)
    except RedactionError as e:
        raise ConfigError(str(e)) from None
    if key:
        register_secret(key.decode("utf-8", "replace"))
    inline = Redactor([rule for rule in rules.rules if rule.inline], key, rules)
    return (
        RedactionStage(rules, secrets if config.redaction.mask_secrets else None, metrics),
        RedactionStage(inline),
    )
