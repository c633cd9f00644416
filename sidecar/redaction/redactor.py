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
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.redaction import detectors, paths
from sidecar.redaction.detectors import Text
from sidecar.redaction.rules import RedactionError, Rule, parse_rules

Markers = re.Pattern[str]


def markers_of(labels: Iterable[str], pseudonyms: bool) -> Markers:
    """What redaction writes, with the labels a redactor can write (its detectors' and its
    rules' names) and, if it hashes, its pseudonyms: found again in a text, it is left
    alone, which makes redacting twice the same as redacting once. Only those: a user's
    "[REDACTED:sk-proj-...]" is no marker, nor "hmac:4111111111111111" where nothing
    hashes, and what they hold is redacted."""
    names = "|".join(re.escape(label) for label in sorted(labels))
    hashed = r"|hmac:[0-9a-f]{16}" if pseudonyms else ""
    return re.compile(rf"\[REDACTED:(?:{names})\]{hashed}")


_WORDY = re.compile(r"[^\W_]")  # a letter or a digit

Span = tuple[int, int, str]  # start, end, the label a mask shows


@dataclass(frozen=True)
class Hit:
    """One replacement or removal: where and by which rule, never the value."""

    rule: str
    action: str
    path: str


def build_redactor(
    raw_rules: list[Any], hmac_key: bytes | None, alongside: Redactor | None = None
) -> Redactor:
    """Check every rule (raising RedactionError naming the first bad one) and compile them.
    ``alongside``: the redactor of the other rules of the same configuration, whose masks
    and pseudonyms are markers here too."""
    return Redactor(parse_rules(raw_rules, hmac_key=hmac_key), hmac_key, alongside)


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


def _is_marker(text: str, markers: Markers) -> bool:
    # A marker starts with "[" or "h": that rules out most strings before the regex.
    return text[:1] in "[h" and markers.fullmatch(text) is not None


def _partial(text: str, keep_last: int) -> str:
    # At most half of it: a value not much longer than keep_last would otherwise be
    # left (nearly) in clear.
    keep = min(keep_last, len(text) // 2)
    return "*" * (len(text) - keep) + text[len(text) - keep :]


_START, _END = operator.itemgetter(0), operator.itemgetter(1)
_CONTAINERS = (dict, list)


class _Strings:
    """The strings of (part of) an event, where each lives, and their joined text."""

    __slots__ = ("_joined", "_nuls", "slots", "texts")

    def __init__(self, event: dict[str, Any], located: list[paths.Slot] | None) -> None:
        """The strings of ``event`` but agentId, or of the ``located`` slots in it."""
        self.slots: list[tuple[Any, Any, paths.Trail]] = []  # container, key, its trail
        self.texts: list[str] = []
        self._joined: Text | None = None
        self._nuls: list[int] = []  # where the NUL after each string is, once needed
        # Bound once: this loop visits every value of the event.
        add_slot, add_text = self.slots.append, self.texts.append
        # Iterative: a deeply nested event must not hit the recursion limit. Depth first,
        # each container's strings then the containers in it, in order (what a container
        # holds is pushed in reverse): what one string continues (a private key whose lines
        # are the items of a list, fields of objects in one) comes after it.
        stack: list[tuple[Any, paths.Trail]] = []
        push = stack.append
        key: Any
        if located is None:
            for key, value in event.items():
                if isinstance(value, str):
                    if key != "agentId":
                        add_slot((event, key, ()))
                        add_text(value)
                elif isinstance(value, _CONTAINERS) and key != "agentId":
                    push((value, ((), key)))
                elif type(value) is int:
                    add_slot((event, key, ()))
                    add_text(str(value))
        else:
            for container, key, value, trail in located:
                if isinstance(value, str):
                    add_slot((container, key, trail))
                    add_text(value)
                elif isinstance(value, _CONTAINERS):
                    push((value, (trail, key)))
                elif type(value) is int:
                    add_slot((container, key, trail))
                    add_text(str(value))
        stack.reverse()
        while stack:
            node, trail = stack.pop()
            inner: list[tuple[Any, paths.Trail]] | None = None
            for key, value in node.items() if isinstance(node, dict) else enumerate(node):
                if isinstance(value, str):
                    add_slot((node, key, trail))
                    add_text(value)
                elif isinstance(value, _CONTAINERS):
                    if inner is None:
                        inner = [(value, (trail, key))]
                    else:
                        inner.append((value, (trail, key)))
                elif type(value) is int:  # a card number sent as a JSON number
                    add_slot((node, key, trail))
                    add_text(str(value))
            if inner is not None:
                inner.reverse()
                stack += inner

    def joined(self) -> Text:
        if self._joined is None:
            text = "\0".join(self.texts)
            if text.count("\0") >= len(self.texts):
                text = "\0".join(map(_without_nul, self.texts))
            self._joined = Text(text)
            self._nuls = []
        return self._joined

    def split(self, spans: list[Span], found: dict[int, list[Span]]) -> None:
        """Spans in the joined text, filed by string and made relative to it."""
        # Most spans lie in the first string (the prompt, of a whole event): where the
        # others start is worked out only when a span lies beyond it.
        first = len(self.texts[0])
        for start, end, label in spans:
            if start < first:
                found.setdefault(0, []).append((start, end, label))
                continue
            if not self._nuls:
                lengths = map(len, self.texts)
                self._nuls = [n + i for i, n in enumerate(itertools.accumulate(lengths))]
            # A span lies in the string after the last NUL before it (never on a NUL).
            i = bisect.bisect_left(self._nuls, start)
            offset = self._nuls[i - 1] + 1
            found.setdefault(i, []).append((start - offset, end - offset, label))

    def replace(self, i: int, text: str) -> tuple[Any, paths.Trail]:
        """Put ``text`` in place of string ``i``; its key and its container's trail."""
        container, key, trail = self.slots[i]
        container[key] = text
        self.texts[i] = text
        self._joined = None
        return key, trail


def _without_nul(text: str) -> str:
    """``text`` as scanned: a NUL in it would read as the end of the string (a private
    key without an END line masked only up to it); another character of the same length
    there ends every match just as well."""
    return text.replace("\0", "\ufffd")


def merged(spans: list[Span]) -> list[Span]:
    """Overlapping spans as one (the union: never leave part of a match in clear)."""
    if len(spans) == 1:
        return spans
    # By start, the longest first, else in the order found: two stable sorts by C key
    # functions cost less than one by a Python one.
    spans.sort(key=_END, reverse=True)
    spans.sort(key=_START)
    merged: list[Span] = []
    last_end = -1
    for span in spans:
        if span[0] < last_end:
            if span[1] > last_end:
                last_end = span[1]
                last = merged[-1]
                merged[-1] = (last[0], last_end, last[2])
        else:
            merged.append(span)
            last_end = span[1]
    return merged


def _outside_markers(text: str, spans: list[Span], markers_in: Markers) -> list[Span]:
    """The spans without what an earlier redaction wrote inside or across them (found by
    ``markers_in``): a match holding a marker (a rule's pattern over a line with a masked
    key in it) is replaced around it, never skipped. Of a span cut by markers, pieces
    without a letter or digit are left: they hold nothing, and replacing them would make
    a second run differ."""
    # Every marker holds a colon: one memchr rules most texts out.
    if ":" not in text or ("[REDACTED:" not in text and "hmac:" not in text):
        return spans
    markers = [m.span() for m in markers_in.finditer(text)]
    # Both in order and apart (spans merged): one pass over each, however many there are.
    kept: list[Span] = []
    i = 0
    for start, end, label in spans:
        while i < len(markers) and markers[i][1] <= start:
            i += 1
        if i == len(markers) or end <= markers[i][0]:
            kept.append((start, end, label))
            continue
        position = start
        j = i
        while j < len(markers) and markers[j][0] < end:
            if _WORDY.search(text, position, markers[j][0]):
                kept.append((position, markers[j][0], label))
            position = max(position, markers[j][1])
            j += 1
        if position < end and _WORDY.search(text, position, end):
            kept.append((position, end, label))
    return kept


def to_replace(text: str, spans: list[Span], markers: Markers) -> list[Span]:
    """The matches found in ``text`` as they are replaced, in order: overlapping ones as
    one, with what an earlier redaction wrote cut out of them (see _outside_markers)."""
    return _outside_markers(text, merged(spans), markers)


# What a detector's check may read as part of a match next to it (a word, a number, an
# e-mail local part, an IPv6 run, a phone number's "(555)").
_GLUE = frozenset("_-+.@%:(")
# Glued matches are rare, and each look again replaces at least one more and leaves
# fewer characters that could match (a partial replacement stars at least half of its);
# a bound all the same.
MAX_RESCANS = 8


def is_glued(text: str, start: int, end: int) -> bool:
    """Whether the text right before or after ``text[start:end]`` could belong to a match."""
    for c in text[start - 1 : start] if start else "", text[end : end + 1]:
        if c and (c.isalnum() or c in _GLUE):
            return True
    return False


def mask(label: str) -> str:
    return f"[REDACTED:{label}]"


# Events repeat the same places, so Hits are reused rather than made for every event;
# the bound keeps events with ever new keys from growing the cache without end.
_HIT_CACHE_SIZE = 4096

HitOf = Callable[[paths.Trail, Any], Hit]
# One step of the plan: applies its rules to an event (given its agentId as received),
# adding what it replaced or removed to the hits.
Step = Callable[[dict[str, Any], str | None, list[Hit]], None]
# One rule scanning the strings of a step: rewrites them, adding its hits.
Scan = Callable[["_Strings", list[Hit]], None]


def _hit_of(rule: Rule) -> HitOf:
    """The Hit of ``rule`` at a place, one per place (see _HIT_CACHE_SIZE)."""
    cache: dict[tuple[paths.Trail, Any], Hit] = {}

    def hit(trail: paths.Trail, key: Any) -> Hit:
        place = (trail, key)
        try:
            found = cache.get(place)
        except RecursionError:
            # A trail is as deep as the string in the event (orjson reads 1,024 levels),
            # and two equal ones are compared level by level: past the recursion limit
            # the second event as deep as the first failed with a 500.
            return Hit(rule.name, rule.action, paths.render(trail, key))
        if found is None:
            if len(cache) >= _HIT_CACHE_SIZE:
                cache.clear()
            found = cache[place] = Hit(rule.name, rule.action, paths.render(trail, key))
        return found

    return hit


def _groups(rules: list[Rule]) -> list[tuple[Rule, ...]]:
    """Consecutive rules that share one walk of the event: rules scanning text under the
    same path (or the whole event), or rules replacing values of the same objects (paths
    that differ only in their last name). Any other rule stands alone."""
    groups: list[list[Rule]] = []
    for rule in rules:
        if groups and _share_a_walk(groups[-1][-1], rule):
            groups[-1].append(rule)
        else:
            groups.append([rule])
    return [tuple(group) for group in groups]


def _share_a_walk(a: Rule, b: Rule) -> bool:
    if a.scans_text or b.scans_text:
        return a.scans_text and b.scans_text and a.path == b.path
    holder = _holder_steps(a)
    return holder is not None and holder == _holder_steps(b)


def _holder_steps(rule: Rule) -> paths.Steps | None:
    """The path to the objects holding the last name of a rule's path; None if it ends in
    a wildcard (or the rule has no path)."""
    steps = rule.steps
    if steps is None or steps[-1] in (paths.ANY_KEY, paths.ANY_ITEM):
        return None
    return steps[:-1]


def _last_name(rule: Rule) -> str:
    assert rule.steps is not None
    return rule.steps[-1]


NewValue = Callable[[Any], str | None]
# What one rule of a group does to an object holding its last name: that name, the new
# value (None: remove), its Hit at a holder's trail, the agents it is limited to.
Edit = tuple[str, NewValue | None, HitOf, frozenset[str] | None]
# The same, once the holder's trail is known: the Hit itself.
Plan = list[tuple[str, NewValue | None, Hit, frozenset[str] | None]]


def _plan(edits: list[Edit], trail: paths.Trail) -> Plan:
    return [(name, new_value, hit(trail, name), agents) for name, new_value, hit, agents in edits]


def _apply(holder: dict[str, Any], plan: Plan, agent: str | None, hits: list[Hit]) -> None:
    """Each rule of ``plan`` to the object holding its name, in order. One loop without
    a call per rule: a group's rules mostly find nothing to do in a given event."""
    for name, new_value, hit, agents in plan:
        if name not in holder or (agents is not None and agent not in agents):
            continue
        if new_value is None:
            del holder[name]
        else:
            new = new_value(holder[name])
            if new is None:
                continue
            holder[name] = new
        hits.append(hit)


def _at_holder(
    hold: Callable[[dict[str, Any]], Any], edits: list[Edit], trail: paths.Trail
) -> Step:
    """Rules whose paths are names only, under one object: found once for all of them."""
    plan = _plan(edits, trail)

    def at_holder(event: dict[str, Any], agent: str | None, hits: list[Hit]) -> None:
        holder = hold(event)
        if holder is not None:
            _apply(holder, plan, agent, hits)

    return at_holder


def _at_holders(locate: paths.Locator, edits: list[Edit]) -> Step:
    """Rules whose paths hold wildcards before their last name (``locate`` selecting only
    the objects among what they lead to): the objects holding that name found once for
    all of them, then the rules applied to each in turn. Each holder's plan is made once
    per place (see _HIT_CACHE_SIZE), like the Hits it holds."""
    plans: dict[paths.Trail, Plan] = {}

    def at_holders(event: dict[str, Any], agent: str | None, hits: list[Hit]) -> None:
        for _, key, holder, trail in locate(event):
            place = (trail, key)
            plan = plans.get(place)
            if plan is None:
                if len(plans) >= _HIT_CACHE_SIZE:
                    plans.clear()
                plan = plans[place] = _plan(edits, place)
            _apply(holder, plan, agent, hits)

    return at_holders


def _at_slots(rule: Rule, locate: paths.Locator, new_value: NewValue | None) -> Step:
    """A rule whose path ends in a wildcard: every slot it selects (``new_value`` None:
    removed)."""
    hit = _hit_of(rule)
    agents = rule.agent_ids

    def at_slots(event: dict[str, Any], agent: str | None, hits: list[Hit]) -> None:
        if agents is not None and agent not in agents:
            return
        slots = locate(event)
        if new_value is None:
            # Back to front, so deleting a list item leaves the indices still to come intact.
            for container, key, _, _ in reversed(slots):
                del container[key]
            hits += [hit(trail, key) for _, key, _, trail in slots]
            return
        for container, key, value, trail in slots:
            new = new_value(value)
            if new is not None:
                container[key] = new
                hits.append(hit(trail, key))

    return at_slots


class Redactor:
    def __init__(
        self, rules: list[Rule], hmac_key: bytes | None, alongside: Redactor | None = None
    ) -> None:
        """Compile already checked rules (see ``build_redactor``)."""
        hashes = any(rule.action == "hash" for rule in rules)
        if not hmac_key and hashes:
            raise RedactionError("a rule with action 'hash' needs an HMAC key")
        self.rules = rules
        self.labels = {*detectors.DETECTORS, *(rule.name for rule in rules)}
        self.pseudonyms = hashes
        if alongside is not None:
            self.labels |= alongside.labels
            self.pseudonyms |= alongside.pseudonyms
        self.markers = markers_of(self.labels, self.pseudonyms)
        self._hmac = _Hmac(hmac_key) if hmac_key else None
        # Each rule compiled into closures once, so that applying it decides nothing that
        # the rule alone decides. By identity: rules put together by hand (built-in plus
        # configured) may share a name.
        self._steps: list[Step] = [
            self._text_step(group) if group[0].scans_text else self._value_step(group)
            for group in _groups(rules)
        ]

    def redact(self, event: dict[str, Any]) -> list[Hit]:
        """Apply every rule in order to ``event``, in place; what was replaced or removed."""
        hits: list[Hit] = []
        # Decided on the agentId as received: a rule hashing it must not switch off later ones.
        agent = event.get("agentId")
        agent = agent if isinstance(agent, str) else None
        for step in self._steps:
            step(event, agent, hits)
        return hits

    def describe(self) -> list[str]:
        return [_describe(rule) for rule in self.rules]

    def _tag(self, data: bytes) -> str:
        assert self._hmac is not None  # build_redactor refuses hash rules without a key
        return self._hmac.tag(data)

    # -- whole values at a path --------------------------------------------------------

    def _value_step(self, rules: tuple[Rule, ...]) -> Step:
        first = rules[0]
        assert first.steps is not None
        parents = _holder_steps(first)
        if parents is None:
            return _at_slots(first, paths.compile_path(first.steps), self._new_value(first))
        edits: list[Edit] = [
            (_last_name(rule), self._new_value(rule), _hit_of(rule), rule.agent_ids)
            for rule in rules
        ]
        hold = paths.holder(first.steps)
        if hold is not None:
            return _at_holder(hold, edits, paths.names_trail(parents))
        return _at_holders(paths.compile_path(parents, dict), edits)

    def _new_value(self, rule: Rule) -> NewValue | None:
        """The replacement of a whole value, None to leave it: null holds nothing to hide,
        and a value an earlier rule (or run) already replaced stays as it is. None for a
        rule that removes. One function per action: this runs for every value a rule
        selects, so it decides nothing the rule already decided."""
        if rule.action == "remove":
            return None
        markers = self.markers
        if rule.action == "hash":
            assert self._hmac is not None  # build_redactor refuses hash rules without a key
            tag = self._hmac.tag

            def hashed(value: Any) -> str | None:
                if value is None or (isinstance(value, str) and _is_marker(value, markers)):
                    return None
                return tag(_canonical(value))

            return hashed
        if rule.action == "partial":
            keep_last, marker = rule.keep_last, mask(rule.name)

            def partial(value: Any) -> str | None:
                if isinstance(value, str):
                    new = None if _is_marker(value, markers) else _partial(value, keep_last)
                    return None if new == value else new
                return None if value is None else marker

            return partial
        marker = mask(rule.name)

        def masked(value: Any) -> str | None:
            if value is None or value == marker:
                return None
            return None if isinstance(value, str) and _is_marker(value, markers) else marker

        return masked

    # -- matches inside strings --------------------------------------------------------

    def _text_step(self, rules: tuple[Rule, ...]) -> Step:
        steps = rules[0].steps
        locate = paths.compile_path(steps) if steps is not None else None
        scans = [(rule.agent_ids, self._scan(rule)) for rule in rules]

        def scan_all(event: dict[str, Any], agent: str | None, hits: list[Hit]) -> None:
            strings: _Strings | None = None
            for agents, scan in scans:
                if agents is not None and agent not in agents:
                    continue
                if strings is None:
                    strings = _Strings(event, _located(event, locate))
                scan(strings, hits)

        return scan_all

    def _scan(self, rule: Rule) -> Scan:
        find = detectors.scanner(rule.detectors) if rule.detectors else None
        regexes, name = rule.regexes, rule.name
        rewrite = self._rewrite(rule)

        def pattern_matches(text: str) -> list[Span]:
            return [
                (m.start(), m.end(), name)
                for regex in regexes for m in regex.finditer(text) if m.end() > m.start()
            ]

        def matches(text: str) -> list[Span]:
            spans = find(Text(_without_nul(text))) if find is not None else []
            return spans + pattern_matches(text) if regexes else spans

        def scan(strings: _Strings, hits: list[Hit]) -> None:
            found: dict[int, list[Span]] = {}
            if find is not None and strings.texts:
                spans = find(strings.joined())
                if spans:
                    strings.split(spans, found)
            if regexes:
                for i, text_i in enumerate(strings.texts):
                    spans = pattern_matches(text_i)
                    if spans:
                        found.setdefault(i, []).extend(spans)
            for i, spans in found.items():
                # A match glued to more text hid what that text is glued to; once it is
                # replaced, the text may hold another match (redacting twice must change
                # nothing), so the string is looked at again.
                for _ in range(MAX_RESCANS):
                    if not rewrite(strings, i, spans, hits):
                        break
                    spans = matches(strings.texts[i])

        return scan

    def _rewrite(self, rule: Rule) -> Callable[[_Strings, int, list[Span], list[Hit]], bool]:
        """Replace the spans in string i; whether the string may now hold another match:
        a replaced one was glued to more text, or kept some of its own (``partial``: the
        last characters of "fe80::1" are an address again)."""
        replacement = self._replacement(rule)
        hit = _hit_of(rule)
        keeps_text = rule.action == "partial"
        markers = self.markers

        def rewrite(strings: _Strings, i: int, spans: list[Span], hits: list[Hit]) -> bool:
            text = strings.texts[i]
            pieces: list[str] = []
            position = 0
            replaced = 0
            glued = False
            for start, end, label in to_replace(text, spans, markers):
                match = text[start:end]
                new = replacement(match, label)
                pieces += (text[position:start], new)
                position = end
                if new != match:
                    replaced += 1
                    glued = glued or keeps_text or is_glued(text, start, end)
            if replaced:
                pieces.append(text[position:])
                key, trail = strings.replace(i, "".join(pieces))
                hits += [hit(trail, key)] * replaced
            return glued

        return rewrite

    def _replacement(self, rule: Rule) -> Callable[[str, str], str]:
        """What a match becomes, given it and the label a mask shows."""
        if rule.action == "hash":
            tag = self._tag
            return lambda match, _: tag(match.encode("utf-8", "surrogatepass"))
        if rule.action == "partial":
            keep_last = rule.keep_last
            return lambda match, _: _partial(match, keep_last)
        return lambda _, label: mask(label)


def _located(event: dict[str, Any], locate: paths.Locator | None) -> list[paths.Slot] | None:
    # agentId is never scanned: masking part of it would merge or split agents.
    if locate is None:
        return None
    return [s for s in locate(event) if s[0] is not event or s[1] != "agentId"]


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
