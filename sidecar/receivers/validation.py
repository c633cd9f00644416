"""What PrecogX accepts as an interaction, checked here so a bad event fails at once.

The upstream would refuse it anyway, but by then the client has long been told
"accepted": a 400 now is the only answer that lets the sender fix it.
"""

from __future__ import annotations

from typing import Any, TypeGuard

from sidecar.logs import scrub

REQUIRED_TEXT_OR_OBJECT = ("prompt", "response")
OPTIONAL_IDS = ("appId", "conversationId", "userId", "sessionId")


class Rejection(Exception):
    """A request refused with PrecogX's error body ``{"error": {code, message, details}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        reason: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason  # the label of precogx_sidecar_events_rejected_total
        self.details = details or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)


def error_body(code: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
    """PrecogX's error body, as every refusal on its paths is answered. What it echoes of
    the request (a path, a Content-Type, a field's name) never shows the sidecar's own
    secrets: a proxy or a client's log may keep the answer."""
    shown = {key: scrub(value) if isinstance(value, str) else value
             for key, value in details.items()}
    return {"error": {"code": code, "message": scrub(message), "details": shown}}


def _invalid(code: str, message: str, field: str, index: int | None) -> Rejection:
    details: dict[str, Any] = {"field": field}
    where = ""
    if index is not None:
        details["index"] = index
        where = f"interactions[{index}]."
    return Rejection(400, code, f"{where}{message}", "invalid_event", details)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


_NONE = type(None)
_TEXT_OR_OBJECT = frozenset({str, dict})
# The types each optional field may have, absent (None) included.
_OPTIONAL_TYPES = (
    *((name, frozenset({str, int, _NONE})) for name in OPTIONAL_IDS),
    ("metadata", frozenset({dict, _NONE})),
    ("toolCalls", frozenset({list, _NONE})),
)


def _plainly_valid(item: Any) -> TypeGuard[dict[str, Any]]:
    """The common case in as few steps as possible: orjson yields exact types, so one
    ``type()`` lookup per field replaces the isinstance chains of the explaining checks."""
    if type(item) is not dict:
        return False
    get = item.get
    agent = get("agentId")
    if (
        type(agent) is not str or not agent or agent.isspace()
        or type(get("prompt")) not in _TEXT_OR_OBJECT
        or type(get("response")) not in _TEXT_OR_OBJECT
    ):
        return False
    # A loop, not all(): a generator costs twice as much here.
    for name, types in _OPTIONAL_TYPES:  # noqa: SIM110
        if type(get(name)) not in types:
            return False
    return True


def validate_interaction(item: Any, index: int | None = None) -> dict[str, Any]:
    if _plainly_valid(item):
        return item
    return _explain(item, index)


def _explain(item: Any, index: int | None) -> dict[str, Any]:
    """Either a valid item orjson would not produce (a bool subclass, say), or the first
    problem as PrecogX words it."""
    if not isinstance(item, dict):
        got = f"must be an object, got {_type_name(item)}"
        if index is None:
            raise _invalid("INVALID_FIELD_TYPE", f"the interaction {got}", "interaction", None)
        raise Rejection(400, "INVALID_FIELD_TYPE", f"interactions[{index}] {got}",
                        "invalid_event", {"field": "interactions", "index": index})
    agent = item.get("agentId")
    if agent is None:
        raise _invalid("MISSING_REQUIRED_FIELD", "agentId is required", "agentId", index)
    if not isinstance(agent, str) or not agent.strip():
        raise _invalid(
            "INVALID_FIELD_TYPE", "agentId must be a non-empty string", "agentId", index
        )
    for name in REQUIRED_TEXT_OR_OBJECT:
        value = item.get(name)
        if value is None:
            raise _invalid("MISSING_REQUIRED_FIELD", f"{name} is required", name, index)
        if not isinstance(value, str | dict):
            raise _invalid(
                "INVALID_FIELD_TYPE",
                f"{name} must be a string or an object, got {_type_name(value)}", name, index,
            )
    for name in OPTIONAL_IDS:
        value = item.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
            raise _invalid(
                "INVALID_FIELD_TYPE",
                f"{name} must be a string (or an integer), got {_type_name(value)}", name, index,
            )
    for name, kind, label in (("metadata", dict, "an object"), ("toolCalls", list, "an array")):
        value = item.get(name)
        if value is not None and not isinstance(value, kind):
            raise _invalid(
                "INVALID_FIELD_TYPE", f"{name} must be {label}, got {_type_name(value)}",
                name, index,
            )
    return item


def interactions_of_batch(doc: Any) -> list[dict[str, Any]]:
    """All or nothing: one bad interaction refuses the whole batch, naming its index."""
    if not isinstance(doc, dict) or "interactions" not in doc:
        raise Rejection(
            400, "MISSING_REQUIRED_FIELD", 'body must be {"interactions": [...]}',
            "invalid_event", {"field": "interactions"},
        )
    items = doc["interactions"]
    if not isinstance(items, list) or not items:
        raise Rejection(
            400, "INVALID_FIELD_TYPE", "interactions must be a non-empty array",
            "invalid_event", {"field": "interactions"},
        )
    for item in items:
        if not _plainly_valid(item):
            return [validate_interaction(item, i) for i, item in enumerate(items)]
    return items
