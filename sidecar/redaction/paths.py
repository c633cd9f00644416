"""Where a rule applies: dotted names, ``[*]`` over list items and ``*`` over object keys.

A path is parsed once into steps and compiled into a locator, which follows them
through an event and returns *slots* ``(container, key, value, trail)``: enough to replace
or delete the value and to name where it was (``render``), without the value ever being
part of the name. A trail is the way down to the container as nested pairs
``((((), "toolCalls"), 0), "input")``: cheap to extend, turned into text only for a Hit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

ANY_KEY = "*"
ANY_ITEM = "[*]"

Steps = tuple[str, ...]
Trail = tuple[Any, ...]  # () or (parent trail, key)
# (container, key or index, value, trail of the container)
Slot = tuple[Any, Any, Any, Trail]
Locator = Callable[[dict[str, Any]], list[Slot]]
_Handler = Callable[[Any, Trail, list[Slot]], None]

# Names exclude what the syntax itself uses, and whitespace (a typo far more often than a key).
_SEGMENT = re.compile(r"(?P<name>[^.\[\]*\s]+|\*)(?P<items>(?:\[\*\])*)")
_INDEX = re.compile(r"\[[^\]]*\]")


class PathError(ValueError):
    pass


def parse(path: str) -> Steps:
    if not path:
        raise PathError("path must not be empty")
    steps: list[str] = []
    for segment in path.split("."):
        steps += _parse_segment(segment)
    return tuple(steps)


def _parse_segment(segment: str) -> list[str]:
    if not segment:
        raise PathError("empty segment (two dots in a row, or a leading or trailing dot)")
    m = _SEGMENT.fullmatch(segment)
    if m is None:
        index = _INDEX.search(segment)
        if index is not None and index.group() != "[*]":
            raise PathError(f"{index.group()} is not supported: only [*] (every list item) is")
        if segment.startswith("[*]"):
            raise PathError("must start with a field name or *: an event is an object")
        raise PathError(f"bad segment {segment!r}: expected a name or *, then any [*]")
    return [m["name"]] + [ANY_ITEM] * (len(m["items"]) // 3)


def render(trail: Trail, key: str | int) -> str:
    """``toolCalls[0].input.account_number`` for the trail of ``input`` and that key."""
    keys: list[str | int] = [key]
    while trail:
        trail, parent_key = trail
        keys.append(parent_key)
    parts: list[str] = []
    for part in reversed(keys):
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(f".{part}" if parts else part)
    return "".join(parts)


def compile_path(steps: Steps, leaves: type = object) -> Locator:
    """A function returning every slot the steps select in an event whose value is a
    ``leaves``; a missing key or a value of another type selects none.

    Made once per rule, as a chain of small functions, one per wildcard or run of names,
    so following a path does no interpretation of it; a single name, the commonest path,
    is one lookup.
    """
    if len(steps) == 1 and steps[0] not in (ANY_KEY, ANY_ITEM):
        name = steps[0]
        return lambda root: (
            [(root, name, root[name], ())]
            if name in root and isinstance(root[name], leaves) else []
        )
    handler: _Handler | None = None
    takes: type = leaves
    for run in reversed(_runs(steps)):
        handler = _handler(run, handler, takes)
        takes = list if run == (ANY_ITEM,) else dict
    assert handler is not None
    first = handler

    def locate(root: dict[str, Any]) -> list[Slot]:
        found: list[Slot] = []
        first(root, (), found)
        return found

    return locate


def _runs(steps: Steps) -> list[Steps]:
    """Each wildcard on its own, and consecutive names together."""
    runs: list[Steps] = []
    for step in steps:
        if step in (ANY_KEY, ANY_ITEM) or not runs or runs[-1][-1] in (ANY_KEY, ANY_ITEM):
            runs.append((step,))
        else:
            runs[-1] += (step,)
    return runs


def holder(steps: Steps) -> Callable[[dict[str, Any]], dict[str, Any] | None] | None:
    """For a path of names only (the commonest), a function giving the object that holds
    its last name, or None where the path leads nowhere; None for a path with wildcards."""
    if ANY_KEY in steps or ANY_ITEM in steps:
        return None
    parents = steps[:-1]

    def hold(root: dict[str, Any]) -> dict[str, Any] | None:
        value = root
        for name in parents:
            if name not in value:
                return None
            child = value[name]
            if not isinstance(child, dict):
                return None
            value = child
        return value

    return hold


def names_trail(names: Steps) -> Trail:
    """The trail of the object reached by following names from the top."""
    trail: Trail = ()
    for name in names:
        trail = (trail, name)
    return trail


def _handler(run: Steps, then: _Handler | None, takes: type) -> _Handler:
    """One wildcard or run of names: select children of a value, then hand each to the
    next step (or keep it, after the last). ``takes`` is the type the next step looks
    into (or the last keeps): a child of any other type is passed over here, saving two
    calls for each."""

    def select(value: Any, trail: Trail, found: list[Slot], key: Any, child: Any) -> None:
        if not isinstance(child, takes):
            return
        if then is None:
            found.append((value, key, child, trail))
        else:
            then(child, (trail, key), found)

    def select_all(value: Any, trail: Trail, found: list[Slot], children: Iterable[Any]) -> None:
        if then is None:
            found += [(value, key, child, trail) for key, child in children
                      if isinstance(child, takes)]
        else:
            for key, child in children:
                if isinstance(child, takes):
                    then(child, (trail, key), found)

    if run == (ANY_ITEM,):

        def items(value: Any, trail: Trail, found: list[Slot]) -> None:
            if isinstance(value, list):
                select_all(value, trail, found, enumerate(value))

        return items
    if run == (ANY_KEY,):

        def keys(value: Any, trail: Trail, found: list[Slot]) -> None:
            if isinstance(value, dict):
                select_all(value, trail, found, value.items())

        return keys
    *parents, last = run

    def names(value: Any, trail: Trail, found: list[Slot]) -> None:
        for name in parents:
            if not isinstance(value, dict) or name not in value:
                return
            trail = (trail, name)
            value = value[name]
        if isinstance(value, dict) and last in value:
            select(value, trail, found, last, value[last])

    return names


def selects_top_field(steps: Steps, field: str) -> bool:
    """Whether the path can select the top-level ``field`` itself (not something inside it)."""
    return len(steps) == 1 and steps[0] in (field, ANY_KEY)
