"""Log set-up: text or JSON lines on stderr, with every known secret scrubbed."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_SECRETS: set[str] = set()
_MASK = "********"


def register_secret(value: str) -> None:
    """Never print ``value``: any log line containing it shows a mask instead."""
    # Very short values would mask innocent text and are not real secrets anyway.
    if len(value) >= 4:
        _SECRETS.add(value)


def scrub(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


class _ScrubbingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return scrub(orjson.dumps(line, default=str).decode())


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Only our own loggers follow log.level: libraries at debug print SQL parameters and
    # request bodies, which are the very prompts and responses we must not leak.
    root.setLevel(logging.WARNING)
    logging.getLogger("sidecar").setLevel(level.upper())
