"""Built-in detectors: precise finders of personal data and credentials inside text.

A detector maps a text to the ``(start, end)`` spans it finds. Detectors run over every
string of every event, so none of them lets the regex engine crawl the whole text:
Python's engine tries a leading character class such as ``[0-9]`` at every position
(about 7 ns a character), while ``str.find`` skips through text for a literal. So each
finder first looks for a literal *needle* that every match contains, and only then runs
its regex from there. The numeric detectors look for their needles in a *shape* of the
text, made once per text, in which every ASCII digit is ``0``, every capital ``A``, every
small letter ``a`` and each of `` .-`` is ``-``: there ``000-000-0000`` is one literal for
all the ways of writing ``555 123-4567``. The checks a regex cannot express cheaply (Luhn,
mod 97, octet ranges, boundaries, which separator it really was) run in Python on the few
candidates.

No character class here matches NUL, so no span crosses the NUL that joins the strings of
one event into a single text.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Span = tuple[int, int]

_SHAPE_TABLE = bytes.maketrans(
    (string.digits + string.ascii_uppercase + string.ascii_lowercase + " .-").encode(),
    b"0" * 10 + b"A" * 26 + b"a" * 26 + b"---",
)
# Shape bytes of characters that glue a candidate into a longer word.
_SHAPE_WORD = frozenset(b"0Aa_")
_DIGIT = ord("0")
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "_-")
_ALNUM = frozenset(string.ascii_letters + string.digits)
_ANY_DIGIT = re.compile("[0-9]")
_HEX_DIGITS = frozenset(string.hexdigits)


class Text:
    """A text being scanned, with its shape made at most once for all detectors.

    ``start``: no match of a credential detector starts before it (the request body's
    pre-check saw none of their literals there). A hint: finders may search from it, or
    ignore it."""

    __slots__ = ("_shape", "start", "text")

    def __init__(self, text: str, start: int = 0) -> None:
        self.text = text
        self.start = start
        self._shape: bytes | None = None

    @property
    def shape(self) -> bytes:
        if self._shape is None:
            # 'replace' turns each non-ASCII character into one '?': indices stay aligned.
            self._shape = self.text.encode("ascii", "replace").translate(_SHAPE_TABLE)
        return self._shape

    @property
    def has_digit(self) -> bool:
        """Whether the text holds an ASCII digit, which every numeric detector needs.

        Ten memchr cost less than the shape, which a text without digits never needs.
        """
        text = self.text
        # A loop, not any(): a generator costs more than the searches here.
        for digit in string.digits:  # noqa: SIM110
            if digit in text:
                return True
        return False


Finder = Callable[[Text], list[Span]]
# Checks of a candidate: given the text (and for the numeric detectors its shape) and
# where the regex matched, the span to keep, or None. They take the text rather than a
# Text: a property lookup costs as much as a few comparisons, and they run on every
# candidate.
TextCheck = Callable[[str, int, int], Span | None]
ShapeCheck = Callable[[str, bytes, int, int], Span | None]


@dataclass(frozen=True)
class Detector:
    name: str
    finders: tuple[Finder, ...]
    secret: bool = False
    # Every match holds an ASCII digit: a text without any is ruled out at once.
    numeric: bool = False
    # Every match is made of letters, digits and "_-." only, which JSON never escapes, and
    # its checks read "\n" before it as an escape: in the text of a JSON document without
    # \u escapes it finds just what it finds in the document's strings (see raw_json).
    plain: bool = False

    def find(self, text: str) -> list[Span]:
        return self.find_in(Text(text))

    def find_in(self, text: Text) -> list[Span]:
        if self.numeric and not text.has_digit:
            return []
        if len(self.finders) == 1:
            return self.finders[0](text)
        spans: list[Span] = []
        for finder in self.finders:
            spans += finder(text)
        return spans


def _in_text(
    needle: str, pattern: str, check: TextCheck, *, back: int = 0, gate: str = "", lead: str = "",
    token: bool = False,
) -> Finder:
    """Matches of ``pattern`` where ``needle`` occurs ``back`` characters into them.

    ``gate`` is a rare character of the needle: ``in`` rules a text out faster than ``find``.
    ``lead`` is what the matches start with, when the needle comes after it: comparing
    it rules most needles out for less than the regex call costs.
    ``token``: the check refuses a match glued to a word before it, so such a needle is
    passed over before the regex runs. Where every needle of a long run fails the regex
    (``eyJ`` repeated), each would otherwise read the run to its end: quadratic time.
    """
    regex = re.compile(pattern)
    lead_end = len(lead) - back

    def find(t: Text) -> list[Span]:
        text = t.text
        if gate and gate not in text:
            return []
        spans: list[Span] = []
        i = text.find(needle, t.start + back)
        while i >= 0:
            start = i - back
            skip = (lead and text[start : i + lead_end] != lead) or (
                token and _glued_to_token(text, start)
            )
            m = None if skip else regex.match(text, start)
            if m is None:
                i = text.find(needle, i + 1)
                continue
            end = m.end()
            span = check(text, start, end)
            if span is not None:
                spans.append(span)
            i = text.find(needle, max(i + 1, end + back))
        return spans

    return find


def _in_shape(needle: bytes, pattern: bytes, check: ShapeCheck) -> Finder:
    """Matches of ``pattern`` in the shape, each starting with ``needle``."""
    regex = re.compile(pattern)
    # A match refused by its check is passed over whole when it is one run of digits: a
    # match starting inside it would be glued to the digits before it (a long digit run
    # holds no card). Otherwise a match may start in its next group ("in 2024 4111 1111
    # 1111 1111" is first read as 2024-4111-1111-1111-111).
    skip_refused = needle.strip(b"0") == b""

    def find(t: Text) -> list[Span]:
        shape, text = t.shape, t.text
        spans: list[Span] = []
        i = shape.find(needle)
        while i >= 0:
            m = regex.match(shape, i)
            if m is None:
                i = shape.find(needle, i + 1)
                continue
            end = m.end()
            span = check(text, shape, i, end)
            if span is not None:
                spans.append(span)
                # A check may keep less than the regex read ("4111 1111 1111 1111 4111 ..."
                # read as one 4-4-4-4-3 card): the next match may start after what it kept.
                end = max(span[1], i + 1)
            elif not skip_refused:
                end = i + 1
            i = shape.find(needle, end)
        return spans

    return find


def _after_escape(text: str, start: int) -> bool:
    """``\\n4111...`` in text holding escaped JSON, ``%3Dsk-...`` or ``Bearer%20eyJ...`` in
    a URL-encoded one: the characters before belong to the escape, not to a word."""
    if start >= 2 and text[start - 2] == "\\" and text[start - 1] in "ntrbf":
        return True
    return (
        start >= 3 and text[start - 3] == "%"
        and text[start - 2] in _HEX_DIGITS and text[start - 1] in _HEX_DIGITS
    )


def _glued_to_token(text: str, start: int) -> bool:
    """Whether what starts at ``start`` continues a token (a word, or ``-``/``_``)."""
    return start > 0 and text[start - 1] in _TOKEN_CHARS and not _after_escape(text, start)


def _glued_before(text: str, shape: bytes, start: int) -> bool:
    return start > 0 and shape[start - 1] in _SHAPE_WORD and not _after_escape(text, start)


def _isolated(text: str, shape: bytes, start: int, end: int, joiners: str) -> bool:
    """Not glued to a word, nor to more digits across a joiner (``v1.2.3.4.5``, ``1-2``)."""
    if start > 0:
        if shape[start - 1] in _SHAPE_WORD and not _after_escape(text, start):
            return False
        if text[start - 1] in joiners and start > 1 and shape[start - 2] == _DIGIT:
            return False
    if end < len(shape):
        if shape[end] in _SHAPE_WORD:
            return False
        if text[end] in joiners and end + 1 < len(shape) and shape[end + 1] == _DIGIT:
            return False
    return True


# -- e-mail --------------------------------------------------------------------------

_MAX_LOCAL = 64
# The local part read backwards from the '@' (Python's regexes cannot look back a variable
# length cheaply); \w also admits non-ASCII letters ("josé").
_LOCAL_REVERSED = re.compile(rf"[\w.%+-]{{1,{_MAX_LOCAL + 1}}}")
# Labels of letters, digits and inner hyphens, then a TLD of letters: "a@b", "user@localhost"
# and "pkg@1.2.3" have none.
_DOMAIN = re.compile(r"(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,63}(?![\w-])")


_LOCAL_ASCII = string.ascii_letters + string.digits + "_.%+-"


def _local_start(text: str, at: int) -> int | None:
    before = text[max(0, at - _MAX_LOCAL - 1) : at]
    # The characters of a local part, if all ASCII, are stripped faster than the regex
    # reads them; a non-ASCII letter before them may be one more (\w), for the regex.
    rest = before.rstrip(_LOCAL_ASCII)
    if rest and not rest[-1].isascii():
        m = _LOCAL_REVERSED.match(before[::-1])
        length = 0 if m is None else m.end()
    else:
        length = len(before) - len(rest)
    # No local part: an '@' after a space is a decorator or a mention, not an address.
    if not length or length > _MAX_LOCAL:
        return None
    start = at - length
    while text[start] == ".":
        start += 1
    return start if start < at else None


# An '@' and the domain after it, found by the regex engine: text full of '@' without a
# domain ("a@a@a@...") is passed over in C, not '@' by '@' in Python. (A domain holds no
# '@', so no '@' is skipped by going on after a domain.)
_AT_DOMAIN = re.compile("@" + _DOMAIN.pattern)


def _find_emails(t: Text) -> list[Span]:
    text = t.text
    if "@" not in text:
        return []
    spans: list[Span] = []
    for m in _AT_DOMAIN.finditer(text):
        start = _local_start(text, m.start())
        if start is not None:
            spans.append((start, m.end()))
    return spans


# -- phone numbers -------------------------------------------------------------------

_MIN_PHONE_DIGITS, _MAX_PHONE_DIGITS = 7, 15  # E.164 allows at most 15


def _international_phone(text: str, shape: bytes, start: int, end: int) -> Span | None:
    if _glued_before(text, shape, start):
        return None
    digits = shape.count(b"0", start, end)
    # Too many digits, or glued to a word: what follows the phone number ("... 0132 123456",
    # "... 0132 0A") was taken for more of it; drop whole groups from the end rather than
    # the phone number with them.
    while digits > _MAX_PHONE_DIGITS or (end < len(shape) and shape[end] in _SHAPE_WORD):
        end = shape.rfind(b"-", start, end)
        if end < 0:
            return None
        digits = shape.count(b"0", start, end)
    return (start, end) if digits >= _MIN_PHONE_DIGITS else None


def _national_phone(text: str, shape: bytes, start: int, end: int) -> Span | None:
    # After "+1 " or "+44 (0)" it is the rest of an international number, found as such.
    plus = text.rfind("+", max(0, start - 8), start)
    if plus >= 0 and shape[plus + 1] == _DIGIT and not shape[plus + 1 : start].strip(b"0-()"):
        return None
    # "1-800-555-1234": the trunk prefix belongs to the number.
    trunk = start - 2
    if (
        trunk >= 0
        and text[trunk] == "1"
        and text[start - 1] in " .-"
        and text[trunk - 1 : trunk] != "+"
        and _isolated(text, shape, trunk, end, ".-+")
    ):
        return trunk, end
    return (start, end) if _isolated(text, shape, start, end, ".-+") else None


# -- credit cards ----------------------------------------------------------------------

# Every second digit from the right is doubled; the digits of the double always add up to
# one digit, so a translation does it (of bytes: a str translation goes through a dict).
_LUHN_DOUBLE = bytes.maketrans(b"0123456789", b"0246813579")


def _luhn(digits: str) -> bool:
    ascii_digits = digits.encode()
    summed = ascii_digits[-1::-2] + ascii_digits[-2::-2].translate(_LUHN_DOUBLE)
    return (sum(summed) - 48 * len(summed)) % 10 == 0


def _card(text: str, shape: bytes, start: int, end: int) -> Span | None:
    # Major networks start with 2-6; excluding 1 also spares 13-digit millisecond timestamps.
    if text[start] not in "23456" or not _isolated(text, shape, start, end, ".-"):
        return None
    digits = text[start:end]
    if not digits.isdigit():
        # One separator throughout, a space or a dash.
        separator = text[start + 4]
        digits = digits.replace(separator, "")
        if separator == "." or not digits.isdigit():
            return None
    return (start, end) if _luhn(digits) else None


def _grouped_card(text: str, shape: bytes, start: int, end: int) -> Span | None:
    span = _card(text, shape, start, end)
    # A 4-4-4-4 card followed by " 123" matched as a 19-digit 4-4-4-4-3 one.
    if span is None and end - start == 23:
        span = _card(text, shape, start, end - 4)
    return span


# -- IBAN -----------------------------------------------------------------------------

_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18,
    "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


# For the mod-97 check letters count as two-digit numbers, A = 10 to Z = 35.
_IBAN_DIGITS = str.maketrans({c: str(10 + i) for i, c in enumerate(string.ascii_uppercase)})
_COUNTRY_DIGITS = {country: country.translate(_IBAN_DIGITS) for country in _IBAN_LENGTHS}


def _iban(text: str, shape: bytes, start: int, end: int) -> Span | None:
    length = _IBAN_LENGTHS.get(text[start : start + 2])
    if length is None or _glued_before(text, shape, start):
        return None
    # Written in groups when a space follows the first four: a space further on may only
    # be the one before the next word ("SE45 5000 ..." vs "SE4550000000058398257466 SEK").
    grouped = text[start + 4 : start + 5] == " "
    # The regex may run on into what follows ("... 0130 00 ABCD", a card number after
    # it): only the country's length counts, and it must end where a group does.
    cut = start + length + ((length - 1) // 4 if grouped else 0)
    written = text[start:cut]
    if cut > end or "-" in written or "." in written:
        return None
    code = written.replace(" ", "")
    if len(code) != length or (cut < len(text) and shape[cut] in _SHAPE_WORD):
        return None
    # Moved to the end, the country code becomes digits too; most account numbers are
    # digits already, which spares the (slow, one to two characters) translation.
    bban = code[4:]
    if not bban.isdigit():
        bban = bban.translate(_IBAN_DIGITS)
    number = bban + _COUNTRY_DIGITS[code[:2]] + code[2:4]
    return (start, cut) if int(number) % 97 == 1 else None


# -- US social security numbers ------------------------------------------------------


def _us_ssn(text: str, shape: bytes, start: int, end: int) -> Span | None:
    if text[start + 3] != "-" or text[start + 6] != "-":
        return None
    area, group, serial = text[start : start + 3], text[start + 4 : start + 6], text[end - 4 : end]
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return None
    return (start, end) if _isolated(text, shape, start, end, ".-") else None


# -- IP addresses ----------------------------------------------------------------------


# An octet, 0 to 255 without a leading zero; four of them are an address.
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def _ipv4(text: str, shape: bytes, dot: int, end: int) -> Span | None:
    """The regex matched from the first dot; the first octet is the (up to three) digits
    just before it."""
    before = shape[max(0, dot - 3) : dot]
    start = dot - (len(before) - len(before.rstrip(b"0")))
    if start == dot or not _isolated(text, shape, start, end, "."):
        return None
    return (start, end) if _IPV4.fullmatch(text, start, end) else None


# Dots are too common for a needle; the regex engine's own search for a leading literal
# character is the fastest way here.
_IPV4_TAIL = re.compile(r"\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")


def _find_ipv4(t: Text) -> list[Span]:
    shape = t.shape
    # Every match holds a digit, a dot and a digit: ruled out by one search of the shape.
    if b"0-0" not in shape:
        return []
    text = t.text
    spans: list[Span] = []
    position = 0
    while (m := _IPV4_TAIL.search(text, position)) is not None:
        dot, position = m.span()
        span = _ipv4(text, shape, dot, position)
        if span is not None:
            spans.append(span)
        elif dot == 0 or shape[dot - 1] not in _SHAPE_WORD:
            # "Connecting...10.0.0.1": the tail began at a dot of the text before the
            # address, which starts after it. (After a word, as in "x.1.2.3.4", it is a
            # dotted name, not an address.)
            position = dot + 1
    return spans


_V6_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:")
_V6_TAIL = re.compile(r"[0-9A-Fa-f:.]*")
_V6_CHARS = frozenset(string.hexdigits + ":.")
_MAX_V6_RUN = 64
_MAX_V6_ADDRESS = 45  # "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"


def _ipv6_run(text: str, colon: int) -> Span:
    """The run of hex digits, colons and dots around a colon."""
    start = colon
    while start > 0 and text[start - 1] in _V6_CHARS and colon - start < _MAX_V6_RUN:
        start -= 1
    if _after_escape(text, start + 1):
        start += 1  # "\b2001:db8::1": the b (a hex digit) belongs to the escape
    while text[start] == "." and start < colon:
        start += 1  # "...fe80::1": an address has dots only in its IPv4 tail
    tail = _V6_TAIL.match(text, colon)
    return start, tail.end() if tail else colon


def _ipv6_address(text: str, start: int, end: int) -> bool:
    candidate = text[start:end]
    # A time such as 12:30:45 has neither "::" nor the six or more colons of a full
    # address; and a digit: "A::B" is C++, not an address. (Cheapest first: this runs
    # for every time of day in a log.)
    if len(candidate) > _MAX_V6_ADDRESS or ("::" not in candidate and candidate.count(":") < 6):
        return False
    if _ANY_DIGIT.search(candidate) is None:
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _ipv6_in(text: str, start: int, end: int) -> Span | None:
    # The sentence's full stop or the colon of "addr 2001:db8::1: up" is not part of it.
    while end > start and text[end - 1] == ".":
        end -= 1
    if text[end - 2 : end] != "::" and text[end - 1 : end] == ":":
        end -= 1
    if end < len(text) and text[end] in _TOKEN_CHARS:
        # Glued to a word after it: only what comes before its last colon may be an
        # address ("2001:db8::7334:0G", an address, a colon, a word).
        end = max(text.rfind(":", start, end), start)
    if not _ANY_DIGIT.search(text, start, end):
        return None  # see _ipv6_address
    alone = not _glued_to_token(text, start)
    # After a label or a colon: "ip:2001:db8::1" (the "d:" of "id:" is hex), ":2001:db8::1".
    # "host:::1": the address after the label may itself start with "::".
    label_end = text.find(":", start, end)
    # Then the same without the run's last group: "2001:db8::7334:50000" (an address and
    # a port without brackets) is no address as a whole. One group only: a fingerprint
    # ("2B:8F:1B:...", 20 groups) must not give up its first eight.
    for stop in (end, text.rfind(":", start, end)):
        if alone and _ipv6_address(text, start, stop):
            return start, stop
        if 0 <= label_end < stop and _ipv6_address(text, label_end + 1, stop):
            return label_end + 1, stop
    return None


def _find_ipv6(t: Text) -> list[Span]:
    text = t.text
    spans: list[Span] = []
    colon = text.find(":")
    while colon != -1:
        # A seed is a colon, at most four hex digits and a colon: looking for the next
        # colon first rules out most colons (of times, labels, URLs) without the regex.
        after = text.find(":", colon + 1)
        if after == -1:
            break
        if after - colon > 5 or not _V6_SEED.match(text, colon):
            colon = after
            continue
        start, end = _ipv6_run(text, colon)
        # What _ipv6_in weighs lies in the run: a run without "::" and with fewer than
        # six colons (a time of day in a log) holds no address.
        if "::" in text[start:end] or text.count(":", start, end) >= 6:
            span = _ipv6_in(text, start, end)
            if span is not None:
                spans.append(span)
        colon = text.find(":", max(end, colon + 1))
    return spans


# -- credentials -----------------------------------------------------------------------


def _token_start(text: str, start: int, end: int) -> Span | None:
    """A credential starts a token: ``task-based`` holds no ``sk-`` key."""
    return None if _glued_to_token(text, start) else (start, end)


def _token_with_digit(text: str, start: int, end: int) -> Span | None:
    """Generated keys hold a digit; ``sk-some-long-hyphenated-phrase`` does not."""
    if _ANY_DIGIT.search(text, start, end) is None:
        return None
    return _token_start(text, start, end)


def _whole(_: str, start: int, end: int) -> Span | None:
    return start, end


def _alnum_token(text: str, start: int, end: int) -> Span | None:
    if start > 0 and text[start - 1] in _ALNUM and not _after_escape(text, start):
        return None
    return None if end < len(text) and text[end] in _ALNUM else (start, end)


_B64URL = "[A-Za-z0-9_-]"
# Key blocks: the literal that starts one, the regex confirming its first line there,
# and the line that ends it. PuTTY's .ppk holds the header, the public and private lines,
# then the MAC of them all.
_KEY_BLOCKS = (
    ("-----BEGIN", re.compile(r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"),
     re.compile(r"-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----")),
    ("PuTTY-User-Key-File-", re.compile(r"PuTTY-User-Key-File-[0-9]+:"),
     re.compile(r"Private-MAC:[ \t]*[0-9a-fA-F]+")),
    # RFC 4716, as ssh.com's tools and PuTTYgen's export write private keys.
    ("---- BEGIN SSH2 ", re.compile(r"---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----"),
     re.compile(r"---- END SSH2 ENCRYPTED PRIVATE KEY ----")),
)
# Where the lines of a key block cut before its end line are separate strings, the
# strings after its first line are read for as long as each holds lines of it (see
# _KeyRun): the headers of PEM, PGP armour, PuTTY and RFC 4716, base64 lines all as long
# as the first, the shorter last line of a run, PGP's checksum line, blank lines.
_KEY_HEADER = re.compile(
    r"(?:Proc-Type|DEK-Info|Version|Comment|Subject|Hash|Charset|MessageID|Encryption"
    r"|Public-Lines|Private-Lines|Key-Derivation|Argon2-[A-Za-z]+):"
)
_BASE64_LINE = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_KEY_LIKE = re.compile(r"[0-9+/=]")  # a line of a key (not a word) holds one of them
_PGP_CHECKSUM = re.compile(r"=[A-Za-z0-9+/]{4}")
# A 4096-bit RSA key takes some 50 lines, a PGP key block some 100: no longer run of
# strings is followed, which bounds the work an event of many short strings can cause.
_MAX_KEY_STRINGS = 512


class _KeyRun:
    """The lines of a key block read so far: whether the next one can belong to it.

    A base64 run's lines are all as long as its first (64 or 70 characters), but for a
    shorter last one that completes its base64 (a length divisible by 4): a word or a
    number after a key's last full line is no part of it. Lines of 16 characters or more
    hold a digit, "+", "/" or "=", but for a first one of 40 or more (a line of a key
    lacks them all one time in 30 at 16 characters, one in 4,000 at 40). A header
    starts a new run (PuTTY's private lines follow its public ones)."""

    __slots__ = ("ended", "length", "width")

    def __init__(self) -> None:
        self.width = 0  # of the run's lines; 0 before its first
        self.length = 0  # base64 characters in the run
        self.ended = False  # by its last line

    def takes(self, line: str) -> bool:
        if not line:  # in no key's base64, but in a list split from its text
            return True
        if _KEY_HEADER.match(line):
            self.width = self.length = 0
            self.ended = False
            return True
        if self.ended:
            return _PGP_CHECKSUM.fullmatch(line) is not None
        if _BASE64_LINE.fullmatch(line) is None or line.isdigit():
            return False
        if not self.width:
            if len(line) < 16 or (len(line) < 40 and _KEY_LIKE.search(line) is None):
                return False
            self.width = len(line)
        elif len(line) > self.width:
            return False
        elif len(line) < self.width:
            if (self.length + len(line)) % 4 or (
                len(line) >= 16 and _KEY_LIKE.search(line) is None
            ):
                return False
            self.ended = True
            return True
        self.length += len(line)
        return True


def _find_private_keys(t: Text) -> list[Span]:
    """From a key block's first line to the end line that follows, across the strings of
    the text (an event holding the key's lines as items of a list, or as fields): one span
    per string on the way, since no span crosses the NUL that joins them. Without an end
    line (a truncated paste), the rest of the first line's string is key material, and so
    are the strings after it that hold lines of the block (see _KeyRun)."""
    text = t.text
    if "G" not in text and "Y" not in text:  # see _in_text's gate
        return []
    spans: list[Span] = []
    for literal, first_line, end_line in _KEY_BLOCKS:
        i = text.find(literal)
        ends = True  # whether an end line may follow: once none does, none is looked for
        while i >= 0:
            first = first_line.match(text, i)
            if first is None:
                i = text.find(literal, i + 1)
                continue
            first_line_end = first.end()
            end = end_line.search(text, i) if ends else None
            ends = end is not None
            stop = end.end() if end is not None else _key_lines_end(text, i, first_line_end)
            start = i
            while (nul := text.find("\0", start, stop)) >= 0:
                if nul > start:  # an empty string holds nothing to mask
                    spans.append((start, nul))
                start = nul + 1
            spans.append((start, stop))
            i = text.find(literal, stop)
    return spans


def _key_lines_end(text: str, i: int, first_line_end: int) -> int:
    """The end of the string holding ``i``, the first line of a key block without its end
    line, or of the last string after it that holds lines of the block (see _KeyRun)."""
    stop = text.find("\0", i)
    if stop < 0:
        return len(text)
    run = _KeyRun()
    # The rest of the first line is its own (PuTTY's key type).
    if not all(run.takes(line.strip()) for line in text[first_line_end:stop].splitlines()[1:]):
        return stop  # the block ended in its string
    end = stop
    for _ in range(_MAX_KEY_STRINGS):
        if end == len(text):
            break
        start = end + 1
        nul = text.find("\0", start)
        end = len(text) if nul < 0 else nul
        taken = 0
        for line in text[start:end].splitlines() or [""]:
            if not run.takes(line := line.strip()):
                break
            taken += line != ""
        else:
            if taken:
                stop = end  # blank strings are passed over, and kept only inside the block
            continue
        # A string whose first lines belong to the block is masked whole (the block ends
        # in it).
        return end if taken else stop
    return stop


_AWS_SECRET = re.compile(
    r"(?:secret_access_key|SECRET_ACCESS_KEY|[Ss]ecretAccessKey)"
    r"[\"']?[ \t]{0,3}[:=][ \t]{0,3}[\"']?(?P<key>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
)


def _find_aws_secret_keys(t: Text) -> list[Span]:
    """The value after an AWS secret access key's name (only the value is masked)."""
    text = t.text
    if "ccess" not in text and "CCESS" not in text:
        return []
    return [m.span("key") for m in _AWS_SECRET.finditer(text, t.start)]


# -- the catalogue ---------------------------------------------------------------------


def _detector(
    name: str, *finders: Finder, secret: bool = False, numeric: bool = False,
    plain: bool = False,
) -> Detector:
    return Detector(name, finders, secret, numeric, plain)


_ALL = (
    _detector("email", _find_emails),
    _detector(
        "phone",
        _in_shape(b"+", rb"\+0{1,3}(?:-?(?:\(0{1,4}\)|0{1,6})){1,7}", _international_phone),
        _in_shape(b"(000)", rb"\(000\)-?000-0000", _national_phone),
        _in_shape(b"000-000-0000", rb"000-000-0000", _national_phone),
        numeric=True,
    ),
    _detector(
        "credit_card",
        _in_shape(b"0000000000000", rb"0000000000000(?:0{0,6})", _card),
        # 4-4-4-1..4 and 4-4-4-4-3, then 4-6-5 and 4-6-4 (Amex, Diners).
        _in_shape(b"0000-0000-0000", rb"0000-0000-0000-0{1,4}(?:-000)?", _grouped_card),
        _in_shape(b"0000-000000-0000", rb"0000-000000-0{4,5}", _card),
        numeric=True,
    ),
    _detector(
        "iban",
        _in_shape(b"AA00", rb"AA00(?:-?[A0]{4}){2,7}(?:-?[A0]{1,4})?", _iban),
        numeric=True,
    ),
    _detector("us_ssn", _in_shape(b"000-00-0000", rb"000-00-0000", _us_ssn), numeric=True),
    _detector("ipv4", _find_ipv4, numeric=True),
    _detector("ipv6", _find_ipv6),
    _detector(
        "jwt",
        _in_text(
            "J",
            # Possessive: no class here holds the dot, so giving back never helps.
            rf"eyJ{_B64URL}{{2,}}+\.{_B64URL}{{2,}}+\.{_B64URL}*+",
            _token_start,
            back=2,
            lead="ey",
            token=True,
        ),
        secret=True,
        plain=True,
    ),
    _detector(
        "precogx_key",
        # "_" and "-" too: a key holding one was masked up to it, or not at all.
        _in_text("px_", r"px_(?:live|test)_[A-Za-z0-9_-]{16,}", _token_start, gate="_"),
        secret=True,
        plain=True,
    ),
    _detector(
        "openai_key",
        _in_text(
            "sk-", r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}", _token_with_digit, gate="k"
        ),
        secret=True,
        plain=True,
    ),
    _detector(
        "aws_access_key",
        _in_text("AKIA", r"AKIA[A-Z0-9]{16}", _alnum_token, gate="K"),
        _in_text("ASIA", r"ASIA[A-Z0-9]{16}", _alnum_token, gate="S"),
        secret=True,
        plain=True,
    ),
    # The secret that goes with an access key: 40 characters no format tells apart from
    # other base64, so only where its name says what it is (credentials file, env, the
    # API's and SDKs' JSON, pasted as text).
    _detector("aws_secret_key", _find_aws_secret_keys, secret=True),
    _detector(
        "github_token",
        _in_text("_", r"gh[pousr]_[A-Za-z0-9]{36,}", _token_start, back=3, lead="gh"),
        _in_text("github_pat_", r"github_pat_[A-Za-z0-9_]{22,}", _token_start, gate="_"),
        secret=True,
        plain=True,
    ),
    _detector(
        "slack_token",
        # Bot, user, app-config, refresh (xoxe-) and app-level (xapp-) tokens.
        _in_text("xox", r"xox[abeprs]-[A-Za-z0-9-]{8,}[A-Za-z0-9]", _token_with_digit, gate="x"),
        _in_text("xapp-", r"xapp-[A-Za-z0-9-]{8,}[A-Za-z0-9]", _token_with_digit, gate="x"),
        secret=True,
        plain=True,
    ),
    # Anyone holding the URL can post to the channel. Masked from its host on ("https://"
    # holds nothing); "/" makes it no plain detector (JSON may write it "\/").
    _detector(
        "slack_webhook",
        _in_text("hooks.slack.com/", r"hooks\.slack\.com/(?:services|workflows|triggers)"
                 r"(?:/[A-Za-z0-9_-]+){2,}", _whole, gate="/"),
        secret=True,
    ),
    # PEM (PKCS#1 and #8, OpenSSH, PGP), PuTTY and RFC 4716 key blocks. Without an end
    # line (a truncated paste) everything after the first line is key material.
    _detector(
        "private_key",
        _find_private_keys,
        secret=True,
    ),
)

DETECTORS: dict[str, Detector] = {d.name: d for d in _ALL}
SECRET_DETECTORS: tuple[str, ...] = tuple(d.name for d in _ALL if d.secret)

Found = tuple[int, int, str]  # start, end, the name of the detector


def scanner(names: Iterable[str]) -> Callable[[Text], list[Found]]:
    """What the named detectors find in a text, by detector in the order named: as their
    ``find_in`` would, with the finders of all of them in one loop and the text looked at
    for digits once."""
    chosen = [DETECTORS[name] for name in names]
    finders = [(finder, d.name, d.numeric) for d in chosen for finder in d.finders]
    numeric = any(d.numeric for d in chosen)

    def scan(text: Text) -> list[Found]:
        found: list[Found] = []
        digits = numeric and text.has_digit
        for finder, name, needs_digit in finders:
            if needs_digit and not digits:
                continue
            spans = finder(text)
            if spans:
                found += [(start, end, name) for start, end in spans]
        return found

    return scan
