"""Applying the rules to one event: in place, in order, on the receive path.

Rules that scan text (detectors, patterns) read the strings of the event, or of the part
under their path, joined by NUL into one text, so each detector looks through an event
once rather than once per string. Consecutive rules scanning the same part share one walk
of the event.

Every replacement is made so that redacting again changes nothing: a mask or an HMAC
tag already in a text is never matched again, and a value already hashed is not hashed
again.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.redaction import paths
from sidecar.redaction.detectors import DETECTORS, Detector, Text
from sidecar.redaction.rules import RedactionError, Rule, parse_rules

# What redaction writes: found again in a text, it is left alone, which makes redacting
# twice the same as redacting once.
_MARKERS = re.compile(r"\[REDACTED:[A-Za-z0-9_.-]+\]|hmac:[0-9a-f]{16}")

Span = tuple[int, int, str]  # start, end, the label a mask shows


@dataclass(frozen=True)
class Hit:
    """One replacement or removal: where and by which rule, never the value."""

    rule: str
    action: str
    path: str


def build_redactor(raw_rules: list[Any], hmac_key: bytes | None) -> Redactor:
    """Check every rule (raising RedactionError naming the first bad one) and compile them."""
    return Redactor(parse_rules(raw_rules, hmac_key=hmac_key), hmac_key)


class _Hmac:
    """HMAC-SHA256 with the key's padded blocks hashed once (RFC 2104): per value that
    leaves two hash copies instead of a whole ``hmac.new``, about twice as fast."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        block = hashlib.sha256().block_size
        if len(key) > block:
            key = hashlib.sha256(key).digest()
        key = key.ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def tag(self, data: bytes) -> str:
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return "hmac:" + outer.hexdigest()[:16]


def _canonical(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        # Integers beyond 64 bits, lone surrogates, more than 255 levels: still JSON.
        return _canonical_slowly(value).encode()


def _canonical_slowly(value: Any) -> str:
    """JSON with sorted keys, made without recursion (json.dumps would hit its limit)."""
    out: list[str] = []
    stack: list[tuple[bool, Any]] = [(False, value)]  # (is output text, item)
    while stack:
        is_text, item = stack.pop()
        if is_text:
            out.append(item)
        elif isinstance(item, dict):
            entries = sorted(item.items(), key=lambda entry: str(entry[0]))
            _push(stack, "{", [(json.dumps(str(k)) + ":", v) for k, v in entries], "}")
        elif isinstance(item, list):
            _push(stack, "[", [("", v) for v in item], "]")
        else:
            out.append(_scalar(item))
    return "".join(out)


def _push(
    stack: list[tuple[bool, Any]], opener: str, entries: list[tuple[str, Any]], closer: str
) -> None:
    # Last to first, so that they come off the stack in order.
    stack.append((True, closer))
    for i in range(len(entries) - 1, -1, -1):
        label, child = entries[i]
        stack.append((False, child))
        stack.append((True, ("," if i else "") + label))
    stack.append((True, opener))


def _scalar(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return str(value)
        except ValueError:  # more digits than Python turns into text
            return hex(value)
    try:
        return json.dumps(value)
    except TypeError:
        return json.dumps(repr(value))


def _partial(text: str, keep_last: int) -> str:
    # At most half of it: a value not much longer than keep_last would otherwise be
    # left (nearly) in clear.
    keep = min(keep_last, len(text) // 2)
    return "*" * (len(text) - keep) + text[len(text) - keep :]


_PLUS_ONE = (1).__add__


class _Strings:
    """The strings of (part of) an event, where each lives, and their joined text."""

    __slots__ = ("_joined", "_starts", "slots", "texts")

    def __init__(self, starts: list[paths.Slot]) -> None:
        self.slots: list[tuple[Any, Any, paths.Trail]] = []  # container, key, its trail
        self.texts: list[str] = []
        self._joined: Text | None = None
        self._starts: list[int] = []
        slots, texts = self.slots, self.texts
        # Iterative: a deeply nested event must not hit the recursion limit.
        stack: list[tuple[Any, paths.Trail]] = []
        for container, key, value, trail in starts:
            if isinstance(value, str):
                slots.append((container, key, trail))
                texts.append(value)
            elif isinstance(value, dict | list):
                stack.append((value, (trail, key)))
        while stack:
            node, trail = stack.pop()
            for key, value in node.items() if isinstance(node, dict) else enumerate(node):
                if isinstance(value, str):
                    slots.append((node, key, trail))
                    texts.append(value)
                elif isinstance(value, dict | list):
                    stack.append((value, (trail, key)))

    def joined(self) -> Text:
        if self._joined is None:
            self._joined = Text("\0".join(self.texts))
            self._starts = []
        return self._joined

    def split(self, spans: list[Span], found: dict[int, list[Span]]) -> None:
        """Spans in the joined text, filed by string and made relative to it."""
        if not self._starts:
            lengths = map(_PLUS_ONE, map(len, self.texts))  # each text and its NUL
            self._starts = list(itertools.accumulate(lengths, initial=0))
        starts = self._starts
        for start, end, label in spans:
            i = bisect.bisect_right(starts, start) - 1
            offset = starts[i]
            found.setdefault(i, []).append((start - offset, end - offset, label))

    def replace(self, i: int, text: str) -> None:
        container, key, _ = self.slots[i]
        container[key] = text
        self.texts[i] = text
        self._joined = None


def _merged(spans: list[Span]) -> list[Span]:
    """Overlapping spans as one (the union: never leave part of a match in clear)."""
    if len(spans) == 1:
        return spans
    spans.sort(key=lambda s: (s[0], -s[1]))
    merged = [spans[0]]
    for start, end, label in spans[1:]:
        last_start, last_end, last_label = merged[-1]
        if start < last_end:
            if end > last_end:
                merged[-1] = (last_start, end, last_label)
        else:
            merged.append((start, end, label))
    return merged


def _outside_markers(text: str, spans: list[Span]) -> list[Span]:
    if "[REDACTED:" not in text and "hmac:" not in text:
        return spans
    markers = [m.span() for m in _MARKERS.finditer(text)]
    return [s for s in spans if not any(s[0] < end and start < s[1] for start, end in markers)]


class _Step:
    """Rules applied together: one rule with only a path, or consecutive rules scanning
    text under the same path (or the whole event), which share one walk of it."""

    __slots__ = ("filtered", "locate", "rules", "scans_text")

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self.scans_text = rules[0].scans_text
        steps = rules[0].steps
        self.locate = paths.compile_path(steps) if steps is not None else None
        self.filtered = any(rule.agent_ids is not None for rule in rules)


def _plan(rules: list[Rule]) -> list[_Step]:
    groups: list[list[Rule]] = []
    for rule in rules:
        last = groups[-1][-1] if groups else None
        if last and rule.scans_text and last.scans_text and last.path == rule.path:
            groups[-1].append(rule)
        else:
            groups.append([rule])
    return [_Step(tuple(group)) for group in groups]


# Events repeat the same places, so Hits are reused rather than made for every event;
# the bound keeps events with ever new keys from growing the cache without end.
_HIT_CACHE_SIZE = 4096


class Redactor:
    def __init__(self, rules: list[Rule], hmac_key: bytes | None) -> None:
        """Compile already checked rules (see ``build_redactor``)."""
        if not hmac_key and any(rule.action == "hash" for rule in rules):
            raise RedactionError("a rule with action 'hash' needs an HMAC key")
        self.rules = rules
        self._hmac = _Hmac(hmac_key) if hmac_key else None
        self._plan = _plan(rules)
        # By identity: rules put together by hand (built-in plus configured) may share a name.
        self._detectors: dict[int, tuple[Detector, ...]] = {
            id(rule): tuple(DETECTORS[name] for name in rule.detectors) for rule in rules
        }
        self._hits: dict[tuple[str, str, paths.Trail, str | int], Hit] = {}

    def redact(self, event: dict[str, Any]) -> list[Hit]:
        """Apply every rule in order to ``event``, in place; what was replaced or removed."""
        hits: list[Hit] = []
        # Decided on the agentId as received: a rule hashing it must not switch off later ones.
        agent = event.get("agentId")
        agent = agent if isinstance(agent, str) else None
        for step in self._plan:
            rules = step.rules
            if step.filtered:
                rules = tuple(r for r in rules if r.agent_ids is None or agent in r.agent_ids)
                if not rules:
                    continue
            if step.scans_text:
                strings = _Strings(self._scan_starts(event, step))
                for rule in rules:
                    self._scan(rule, strings, hits)
            else:
                assert step.locate is not None
                self._apply_to_values(rules[0], step.locate(event), hits)
        return hits

    def describe(self) -> list[str]:
        return [_describe(rule) for rule in self.rules]

    def _hit(self, rule: Rule, trail: paths.Trail, key: str | int) -> Hit:
        cache_key = (rule.name, rule.action, trail, key)
        hit = self._hits.get(cache_key)
        if hit is None:
            if len(self._hits) >= _HIT_CACHE_SIZE:
                self._hits.clear()
            hit = self._hits[cache_key] = Hit(rule.name, rule.action, paths.render(trail, key))
        return hit

    # -- whole values at a path --------------------------------------------------------

    def _apply_to_values(self, rule: Rule, slots: list[paths.Slot], hits: list[Hit]) -> None:
        if rule.action == "remove":
            # Back to front, so deleting a list item leaves the indices still to come intact.
            for container, key, _, _ in reversed(slots):
                del container[key]
            hits += [self._hit(rule, trail, key) for _, key, _, trail in slots]
            return
        for container, key, value, trail in slots:
            new = self._new_value(rule, value)
            if new is not None:
                container[key] = new
                hits.append(self._hit(rule, trail, key))

    def _new_value(self, rule: Rule, value: Any) -> str | None:
        """The replacement of a whole value, None to leave it: null holds nothing to hide,
        and a value an earlier rule (or run) already replaced stays as it is."""
        if value is None or (isinstance(value, str) and _MARKERS.fullmatch(value)):
            return None
        if rule.action == "hash":
            return self._tag(_canonical(value))
        if rule.action == "partial" and isinstance(value, str):
            new = _partial(value, rule.keep_last)
        else:
            new = f"[REDACTED:{rule.name}]"
        return new if new != value else None

    def _tag(self, data: bytes) -> str:
        assert self._hmac is not None  # build_redactor refuses hash rules without a key
        return self._hmac.tag(data)

    # -- matches inside strings --------------------------------------------------------

    @staticmethod
    def _scan_starts(event: dict[str, Any], step: _Step) -> list[paths.Slot]:
        # agentId is never scanned: masking part of it would merge or split agents.
        if step.locate is None:
            return [(event, k, v, ()) for k, v in event.items() if k != "agentId"]
        return [s for s in step.locate(event) if s[0] is not event or s[1] != "agentId"]

    def _scan(self, rule: Rule, strings: _Strings, hits: list[Hit]) -> None:
        found: dict[int, list[Span]] = {}
        detectors = self._detectors[id(rule)]
        if detectors and strings.texts:
            text = strings.joined()
            spans = [(s, e, d.name) for d in detectors for s, e in d.find_in(text)]
            if spans:
                strings.split(spans, found)
        for regex in rule.regexes:
            for i, text_i in enumerate(strings.texts):
                for m in regex.finditer(text_i):
                    if m.end() > m.start():
                        found.setdefault(i, []).append((m.start(), m.end(), rule.name))
        for i, spans in found.items():
            self._rewrite(rule, strings, i, spans, hits)

    def _rewrite(
        self, rule: Rule, strings: _Strings, i: int, spans: list[Span], hits: list[Hit]
    ) -> None:
        text = strings.texts[i]
        pieces: list[str] = []
        position = 0
        replaced = 0
        for start, end, label in _outside_markers(text, _merged(spans)):
            match = text[start:end]
            new = self._replacement(rule, match, label)
            pieces += (text[position:start], new)
            position = end
            replaced += new != match
        if replaced:
            pieces.append(text[position:])
            strings.replace(i, "".join(pieces))
            _, key, trail = strings.slots[i]
            hits += [self._hit(rule, trail, key)] * replaced

    def _replacement(self, rule: Rule, match: str, label: str) -> str:
        if rule.action == "hash":
            return self._tag(match.encode("utf-8", "surrogatepass"))
        if rule.action == "partial":
            return _partial(match, rule.keep_last)
        return f"[REDACTED:{label}]"


def _describe(rule: Rule) -> str:
    what: list[str] = []
    if rule.detectors:
        noun = "detector" if len(rule.detectors) == 1 else "detectors"
        what.append(f"{noun} {', '.join(rule.detectors)}")
    if rule.patterns:
        noun = "pattern" if len(rule.patterns) == 1 else "patterns"
        what.append(f"{noun} {', '.join(f'/{p}/' for p in rule.patterns)}")
    if what:
        subject = f"{' and '.join(what)} in {rule.path or 'anywhere'}"
    else:
        subject = f"whole value at {rule.path}"
    action = rule.action
    if action == "partial":
        action = f"partial (keep last {rule.keep_last})"
    notes = []
    if rule.agent_ids is not None:
        notes.append(f"only agents {', '.join(sorted(rule.agent_ids))}")
    if rule.inline:
        notes.append("inline")
    line = f"{rule.name}: {subject} -> {action}"
    return f"{line} ({'; '.join(notes)})" if notes else line
