"""Credentials masked in a request body's JSON text, before the body is parsed.

The plain detectors (see ``Detector.plain``) find in the text of a JSON document without
``\\u`` escapes just what they find in its strings. Masking their matches there spares
the credential rule its walk: collecting every string of the event, joining them and
rewriting the one that held the match (on a 2 KB event, about a third of the rule's cost).

Two places the walk treats apart cannot be told apart cheaply in the text: object keys
(never scanned) and agentId values (the top-level one is never scanned; a nested one is).
A match in either leaves the whole body to the walk, as does a match glued to more text,
which the walk looks at again once the match is masked.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.redaction.detectors import DETECTORS, Found, Text
from sidecar.redaction.redactor import is_glued, mask, merged

PLAIN_DETECTORS = frozenset(name for name, detector in DETECTORS.items() if detector.plain)

_SPACE = " \t\n\r"  # JSON's whitespace
_AGENT_ID_KEY = '"agentId"'


def mask_in_json(
    text: str, find: Callable[[Text], list[Found]], start: int = 0
) -> tuple[str, int] | None:
    """``text``, a JSON document without ``\\u`` escapes, with every match of ``find``
    (plain detectors only) masked as the credential rule masks it, and how many were;
    None if a match lies in a key or in an agentId value, or is glued to more text.
    ``start``: none of their matches starts before it.

    What an earlier redaction wrote needs no search here (the rule's to_replace reads
    the whole text for it): a plain match holds no "[", ":" or "]", so one touching a
    mask or a pseudonym lies in its label or its hex digits, glued to them or to the
    colon, and leaves the body to the walk."""
    spans = merged(find(Text(text, start)))
    if not spans:
        return text, 0
    pieces: list[str] = []
    position = 0
    closing = -1  # the quote closing the string that holds the last match
    for start, end, label in spans:
        if is_glued(text, start, end):
            return None
        # Each string is looked at once, however many matches it holds: a long prompt
        # full of keys must not be searched back to its start for every one of them.
        if start > closing:
            closing = _quote(text, end, forward=True)
            if closing < 0 or not _plain_value(text, start, closing):
                return None
        pieces += (text[position:start], mask(label))
        position = end
    pieces.append(text[position:])
    return "".join(pieces), len(spans)


def _plain_value(text: str, start: int, closing: int) -> bool:
    """Whether the string holding ``start`` and closed at ``closing`` is a value other
    than an agentId.

    Plain matches hold no quote, and outside strings JSON has no letters but those of
    true, false and null: every match lies inside a string.
    """
    if text.startswith(":", _after_space(text, closing + 1)):
        return False  # an object key
    opening = _quote(text, start, forward=False)
    if opening < 0:
        return False
    colon = _before_space(text, opening) - 1
    if colon < 0 or text[colon] != ":":
        return True  # an array item, or the whole document
    key_end = _before_space(text, colon)
    key_start = key_end - len(_AGENT_ID_KEY)
    return not (
        key_start >= 0 and text.startswith(_AGENT_ID_KEY, key_start)
        and not _escaped(text, key_start)
    )


def _quote(text: str, i: int, *, forward: bool) -> int:
    """The first unescaped quote from ``i`` on (or before ``i``, looking back); -1 if none."""
    while True:
        q = text.find('"', i) if forward else text.rfind('"', 0, i)
        if q < 0 or not _escaped(text, q):
            return q
        i = q + 1 if forward else q


def _escaped(text: str, i: int) -> bool:
    """Whether the character at ``i`` follows an odd number of backslashes."""
    backslashes = 0
    while i - backslashes > 0 and text[i - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def _after_space(text: str, i: int) -> int:
    """Where the whitespace starting at ``i`` ends."""
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


def _before_space(text: str, i: int) -> int:
    """Where the whitespace ending at ``i`` starts."""
    while i > 0 and text[i - 1] in _SPACE:
        i -= 1
    return i
