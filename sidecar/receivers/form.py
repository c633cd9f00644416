"""An interaction sent as form fields (``application/x-www-form-urlencoded``).

Dify's HTTP Request node pastes variables into a JSON body template as plain text, so a
quote in a user's message ends the string and what follows becomes fields of its own:
a message can choose the ``prompt`` PrecogX scans. Sent as form fields instead, every
value is encoded by Dify's HTTP client and arrives exactly as the variable held it.

The fields are the interaction's own names (``agentId``, ``prompt``, ``response``,
``appId``, ``conversationId``, ``userId``, ``sessionId``) and ``metadata.<key>`` for
metadata, all strings. Any other name, or a name given twice, is refused: either would
make the event something other than what the operator set up.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from sidecar.receivers.validation import OPTIONAL_IDS, Rejection, validate_interaction
from sidecar.redaction.stage import text_without_own_secrets

FORM_TYPE = "application/x-www-form-urlencoded"
FIELDS = frozenset(("agentId", "prompt", "response", *OPTIONAL_IDS))
METADATA = "metadata."
MAX_FIELDS = 1000
MAX_NAME_SHOWN = 100


def interaction_of_form(body: bytes) -> dict[str, Any]:
    item: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    for raw_name, value in _fields(body):
        # Masked once decoded: percent-encoded, a token's "+", "/" or "=" hid it from the
        # search in the body's bytes. The name first: an error message shows it.
        name = text_without_own_secrets(raw_name)
        in_metadata = name.startswith(METADATA)
        holder, key = (metadata, name[len(METADATA):]) if in_metadata else (item, name)
        if not key or (holder is item and name not in FIELDS):
            raise _bad_field(name, f"unknown form field {_shown(name)}: use "
                             f"{', '.join(sorted(FIELDS))} or metadata.<key>")
        if key in holder:
            raise _bad_field(name, f"form field {_shown(name)} is given more than once")
        holder[key] = text_without_own_secrets(value)
    if metadata:
        item["metadata"] = metadata
    return validate_interaction(item)


def _fields(body: bytes) -> list[tuple[str, str]]:
    # No value in any message: it would land in the caller's logs (a Dify run's).
    try:
        return parse_qsl(
            body.decode(), keep_blank_values=True, strict_parsing=True,
            encoding="utf-8", errors="strict", max_num_fields=MAX_FIELDS,
        )
    except UnicodeDecodeError:
        problem = "a field is not UTF-8 (percent-encoded or not)"
    except ValueError as e:
        problem = (f"more than {MAX_FIELDS} fields" if str(e).startswith("Max number")
                   else "a field is empty or has no '=' (fields are name=value, joined by "
                   "'&', none empty)")
    raise Rejection(400, "INVALID_BODY", f"form body cannot be read: {problem}",
                    "invalid_body")


def _bad_field(name: str, message: str) -> Rejection:
    return Rejection(400, "INVALID_FIELD", message, "invalid_event",
                     {"field": name[:MAX_NAME_SHOWN]})


def _shown(name: str) -> str:
    """The name as sent, escaped and cut: it is echoed to the sender only."""
    return repr(name[:MAX_NAME_SHOWN])
