"""Redaction rules as configured in ``[[redaction.rules]]``, checked completely at load.

A rule that cannot do what it says must stop start-up with one line naming it: a rule
that silently does nothing is a promise to the operator that is silently broken.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any

from sidecar.redaction import paths
from sidecar.redaction.detectors import DETECTORS

ENV_HMAC_KEY = "PRECOGX_SIDECAR_REDACTION_HMAC_KEY"
ACTIONS = ("remove", "mask", "partial", "hash")
KNOWN_KEYS = ("name", "path", "detectors", "patterns", "action", "keep_last", "agent_ids", "inline")
DEFAULT_KEEP_LAST = 4
MIN_HMAC_KEY_BYTES = 16

# re's own parser: the structure of a pattern, to spot nested repeats. Imported by name
# because it is private (and typeshed has no stub for it).
_sre_parser: Any = importlib.import_module("re._parser")
_sre: Any = importlib.import_module("re._constants")

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class RedactionError(Exception):
    """A rule that cannot be used; ``str()`` is the one line shown to the operator."""


@dataclass(frozen=True)
class Rule:
    name: str
    action: str = "mask"
    path: str | None = None
    detectors: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    keep_last: int = DEFAULT_KEEP_LAST
    agent_ids: frozenset[str] | None = None
    inline: bool = False
    steps: paths.Steps | None = field(default=None, repr=False, compare=False)
    regexes: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    @property
    def scans_text(self) -> bool:
        """Replaces matches inside strings, rather than whole values at ``path``."""
        return bool(self.detectors or self.patterns)


class _Invalid(Exception):
    """A problem with one rule; the caller prefixes it with the rule's index and name."""


def parse_rules(raw_rules: Any, *, hmac_key: bytes | None) -> list[Rule]:
    if not isinstance(raw_rules, list):
        raise RedactionError(
            "redaction.rules: must be a list of tables ([[redaction.rules]]), "
            f"got {_type_name(raw_rules)}"
        )
    rules: list[Rule] = []
    index_of: dict[str, int] = {}
    for i, raw in enumerate(raw_rules):
        rule = _parse_rule(i, raw, hmac_key)
        if rule.name in index_of:
            raise RedactionError(
                f"{_where(i, rule.name)}: duplicate name "
                f"(also redaction.rules[{index_of[rule.name]}])"
            )
        index_of[rule.name] = i
        rules.append(rule)
    return rules


def _where(index: int, name: str | None = None) -> str:
    where = f"redaction.rules[{index}]"
    return f"{where} (name {name!r})" if name is not None else where


def _parse_rule(index: int, raw: Any, hmac_key: bytes | None) -> Rule:
    if not isinstance(raw, dict):
        raise RedactionError(f"{_where(index)}: must be a table, got {_type_name(raw)}")
    name = raw.get("name")
    if name is None:
        raise RedactionError(f"{_where(index)}: name is required")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RedactionError(
            f"{_where(index)}: name must be a non-empty string of A-Z a-z 0-9 _ . -, got {name!r}"
        )
    try:
        return _build(name, raw, hmac_key)
    except _Invalid as e:
        raise RedactionError(f"{_where(index, name)}: {e}") from None


def _build(name: str, raw: dict[str, Any], hmac_key: bytes | None) -> Rule:
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        raise _Invalid(f"unknown key {unknown[0]!r} (known: {', '.join(KNOWN_KEYS)})")
    action = _typed(raw, "action", str, "a string", "mask")
    if action not in ACTIONS:
        raise _Invalid(f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
    path = _typed(raw, "path", str, "a string", None)
    steps = _parse_path(path) if path is not None else None
    detectors = _parse_detectors(_string_list(raw, "detectors"))
    patterns = _string_list(raw, "patterns")
    regexes = tuple(_compile(i, p) for i, p in enumerate(patterns))
    keep_last = _parse_keep_last(raw, action)
    agent_ids = _parse_agent_ids(raw)
    inline = _typed(raw, "inline", bool, "true or false", False)
    rule = Rule(
        name, action, path, detectors, tuple(patterns), keep_last, agent_ids, inline,
        steps, regexes,
    )
    _check_combination(rule)
    _check_required_fields(rule)
    _check_hmac_key(rule, hmac_key)
    return rule


def _type_name(value: Any) -> str:
    names = {dict: "a table", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), type(value).__name__)


def _typed(raw: dict[str, Any], key: str, kind: type, label: str, default: Any) -> Any:
    if key not in raw:
        return default
    if not isinstance(raw[key], kind):
        raise _Invalid(f"{key} must be {label}, got {raw[key]!r}")
    return raw[key]


def _string_list(raw: dict[str, Any], key: str) -> list[str]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"{key} must be a list of strings, got {value!r}")
    return value


def _parse_path(path: str) -> paths.Steps:
    try:
        return paths.parse(path)
    except paths.PathError as e:
        raise _Invalid(f"path {path!r}: {e}") from None


def _parse_detectors(names: list[str]) -> tuple[str, ...]:
    for name in names:
        if name not in DETECTORS:
            raise _Invalid(f"unknown detector {name!r} (known: {', '.join(DETECTORS)})")
    return tuple(dict.fromkeys(names))


def _parse_keep_last(raw: dict[str, Any], action: str) -> int:
    if "keep_last" not in raw:
        return DEFAULT_KEEP_LAST
    keep_last = raw["keep_last"]
    if not isinstance(keep_last, int) or isinstance(keep_last, bool):
        raise _Invalid(f"keep_last must be an integer, got {keep_last!r}")
    if keep_last < 0:
        raise _Invalid(f"keep_last must be >= 0, got {keep_last}")
    if action != "partial":
        raise _Invalid(f"keep_last is only used by action 'partial', not {action!r}")
    return keep_last


def _parse_agent_ids(raw: dict[str, Any]) -> frozenset[str] | None:
    if "agent_ids" not in raw:
        return None
    agent_ids = _string_list(raw, "agent_ids")
    if not agent_ids or not all(agent_ids):
        raise _Invalid(
            "agent_ids must list non-empty agent ids (leave it out to apply to every agent)"
        )
    return frozenset(agent_ids)


# -- patterns ----------------------------------------------------------------------------


def _compile(index: int, pattern: str) -> re.Pattern[str]:
    where = f"patterns[{index}] {pattern if len(pattern) <= 80 else pattern[:77] + '...'!r}"
    try:
        regex = re.compile(pattern)
        parsed = _sre_parser.parse(pattern)
        risk = _backtracking_risk(list(parsed))
    except (re.error, OverflowError) as e:  # OverflowError: a{99999999999}
        raise _Invalid(f"{where} is not a valid regex: {e}") from None
    except RecursionError:
        raise _Invalid(f"{where} is not a valid regex: nested too deeply") from None
    if parsed.getwidth()[0] == 0:
        raise _Invalid(f"{where} can match the empty string; it must match at least a character")
    if risk:
        raise _Invalid(
            f"{where} can take exponential time on some texts ({risk}); rewrite it, "
            "e.g. with a possessive repeat (a++) or an atomic group (?>...)"
        )
    return regex


# A few characters of each kind stand in for "every character" when asking whether two
# single-character items can match the same one.
_SAMPLE = [chr(c) for c in range(128)] + ["é", "ß", "中", "٣", "\u00a0", "\u2028"]
_CATEGORY_TESTS: dict[str, Any] = {
    "CATEGORY_DIGIT": str.isdigit,
    "CATEGORY_NOT_DIGIT": lambda c: not c.isdigit(),
    "CATEGORY_SPACE": str.isspace,
    "CATEGORY_NOT_SPACE": lambda c: not c.isspace(),
    "CATEGORY_WORD": lambda c: c.isalnum() or c == "_",
    "CATEGORY_NOT_WORD": lambda c: not (c.isalnum() or c == "_"),
}


def _backtracking_risk(items: list[Any]) -> str | None:
    """A description of a structure known to backtrack exponentially, or None.

    Two shapes are caught: an unbounded repeat over a body holding another variable repeat
    that nothing separates from the next round (``(a+)+``, ``(.*)*``; ``(\\.\\w+)*`` is fine,
    the dot separates), and an unbounded repeat over alternatives that can start with the
    same character (``(a|a)*``, ``(ab|a.c)+``).
    """
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            _, high, body = av
            body_items = _flatten(list(body))
            if high == _sre.MAXREPEAT:
                if _unseparated_repeat(body_items):
                    return "a repeat inside a repeat, like (a+)+"
                if _ambiguous_branch(body_items):
                    return "alternatives that can match the same text inside a repeat, like (a|a)*"
            risk = _backtracking_risk(list(body))
        else:
            risk = _backtracking_risk_in(name, av)
        if risk:
            return risk
    return None


def _backtracking_risk_in(name: str, av: Any) -> str | None:
    if name == "SUBPATTERN":
        return _backtracking_risk(list(av[-1]))
    if name == "BRANCH":
        for alternative in av[1]:
            if risk := _backtracking_risk(list(alternative)):
                return risk
    if name in ("ASSERT", "ASSERT_NOT"):
        return _backtracking_risk(list(av[1]))
    if name == "POSSESSIVE_REPEAT":
        return _backtracking_risk(list(av[2]))
    if name == "ATOMIC_GROUP":
        return _backtracking_risk(list(av))
    if name == "GROUPREF_EXISTS":
        for branch in av[1:]:
            if branch is not None and (risk := _backtracking_risk(list(branch))):
                return risk
    return None


def _flatten(items: list[Any]) -> list[Any]:
    """Groups spliced into the sequence around them: ``(?:ab)c`` is ``abc`` here."""
    flat: list[Any] = []
    for op, av in items:
        if str(op) == "SUBPATTERN":
            flat += _flatten(list(av[-1]))
        else:
            flat.append((op, av))
    return flat


def _variable_repeats(items: list[Any]) -> list[Any]:
    """Repeats whose length varies, anywhere inside ``items``; possessive ones never give
    back, so they cannot be re-split and are left out."""
    found: list[Any] = []
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            low, high, body = av
            if low != high:
                found.append((op, av))
            found += _variable_repeats(list(body))
        elif name == "SUBPATTERN":
            found += _variable_repeats(list(av[-1]))
        elif name == "BRANCH":
            for alternative in av[1]:
                found += _variable_repeats(list(alternative))
    return found


def _unseparated_repeat(body: list[Any]) -> bool:
    inner = _variable_repeats(body)
    if not inner:
        return False
    # A character every round must match and no inner repeat can swallow pins down
    # where one round ends and the next begins.
    separators = [item for item in body if _is_single_char(item)]
    for separator in separators:
        if all(_repeat_disjoint_from(repeat, separator) for repeat in inner):
            return False
    return True


def _repeat_disjoint_from(repeat: Any, separator: Any) -> bool:
    _, (_, _, body) = repeat
    items = list(body)
    return len(items) == 1 and _is_single_char(items[0]) and not _overlap(items[0], separator)


def _ambiguous_branch(body: list[Any]) -> bool:
    for op, av in body:
        if str(op) != "BRANCH":
            continue
        firsts = [_first_item(list(alternative)) for alternative in av[1]]
        for i, a in enumerate(firsts):
            for b in firsts[i + 1 :]:
                both_empty = a is None and b is None
                if both_empty or (a is not None and b is not None and _overlap(a, b)):
                    return True
    return False


def _first_item(items: list[Any]) -> Any:
    """The single-character item an alternative starts with; ANY when it is not that simple."""
    flat = _flatten(items)
    if not flat:
        return None
    return flat[0] if _is_single_char(flat[0]) else (_sre.ANY, None)


def _is_single_char(item: Any) -> bool:
    return str(item[0]) in ("LITERAL", "NOT_LITERAL", "IN", "ANY")


def _overlap(a: Any, b: Any) -> bool:
    return any(_matches(a, c) and _matches(b, c) for c in _SAMPLE)


def _matches(item: Any, c: str) -> bool:
    op, av = item
    name = str(op)
    if name == "LITERAL":
        return bool(av == ord(c))
    if name == "NOT_LITERAL":
        return bool(av != ord(c))
    if name == "IN":
        return _in_set(av, c)
    return True


def _in_set(members: list[Any], c: str) -> bool:
    negate = bool(members) and str(members[0][0]) == "NEGATE"
    hit = False
    for op, av in members[1:] if negate else members:
        name = str(op)
        if name == "LITERAL":
            hit = av == ord(c)
        elif name == "RANGE":
            hit = av[0] <= ord(c) <= av[1]
        elif name == "CATEGORY":
            hit = bool(_CATEGORY_TESTS.get(str(av), lambda _: True)(c))
        else:
            hit = True
        if hit:
            break
    return hit != negate


# -- combinations ----------------------------------------------------------------------


def _check_combination(rule: Rule) -> None:
    if rule.steps is None and not rule.scans_text:
        raise _Invalid("needs at least one of path, detectors or patterns")
    if rule.scans_text and rule.action == "remove":
        raise _Invalid(
            "action 'remove' cannot be used with detectors or patterns: removing part of a "
            "text is ambiguous; use mask, partial or hash, or a rule with only a path to "
            "remove the whole field"
        )


def _check_required_fields(rule: Rule) -> None:
    """Redaction must leave an event PrecogX accepts (see receivers/validation.py)."""
    steps = rule.steps
    if steps is None:
        return
    if rule.scans_text:
        # Replacing matches inside strings keeps every field's type; only agentId is
        # never scanned, and naming it alone would make a rule that does nothing.
        if steps == ("agentId",):
            raise _Invalid(
                "detectors and patterns do not scan agentId; to pseudonymise it, use a rule "
                "with only path 'agentId' and action 'hash'"
            )
        return
    for target in ("agentId", "prompt", "response", "metadata", "toolCalls"):
        if paths.selects_top_field(steps, target):
            _check_top_field(rule, target)


def _check_top_field(rule: Rule, target: str) -> None:
    selects = f"path {rule.path!r} selects {target}"
    if target == "agentId" and rule.action == "remove":
        raise _Invalid(f"{selects}, which PrecogX requires: only action 'hash' may change it")
    if target == "agentId" and rule.action != "hash":
        raise _Invalid(
            f"{selects}: only action 'hash' may change it ({rule.action!r} would turn every "
            "agent into the same one)"
        )
    if target in ("prompt", "response") and rule.action == "remove":
        raise _Invalid(
            f"{selects}, which PrecogX requires: use mask, partial or hash, or a path inside it"
        )
    if target in ("metadata", "toolCalls") and rule.action != "remove":
        kind, inside = ("an object", "metadata.*")
        if target == "toolCalls":
            kind, inside = ("a list", "toolCalls[*]")
        raise _Invalid(
            f"{selects}, which must stay {kind}: use remove, or a path inside it such as {inside!r}"
        )


def _check_hmac_key(rule: Rule, hmac_key: bytes | None) -> None:
    if rule.action != "hash":
        return
    if not hmac_key:
        raise _Invalid(
            f"action 'hash' needs an HMAC key: set env {ENV_HMAC_KEY} or redaction.hmac_key_file"
        )
    if len(hmac_key) < MIN_HMAC_KEY_BYTES:
        raise _Invalid(
            f"action 'hash' needs an HMAC key of at least {MIN_HMAC_KEY_BYTES} bytes, or "
            "short values such as e-mail addresses can be found again by trying them all "
            f"(the key from env {ENV_HMAC_KEY} or redaction.hmac_key_file is shorter)"
        )
