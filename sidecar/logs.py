"""Log set-up: text or JSON lines on stderr, with every known secret scrubbed."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

_SECRETS: set[str] = set()
_MASK = "********"
# The secrets as a request body may hold them, for RedactionStage.mask_body: only those
# made of characters JSON never escapes, holding one no JSON number can, and not starting
# with a character that can end an escape ("\/", "\n", "\u0041"...: replacing from there
# would leave a lone backslash, and "\nKey" holds no "nKey" at all), so that replacing
# them in the body's text can never break the document. (Most tokens made as the README
# says, `openssl rand -hex`, and PrecogX keys are; the others are masked once parsed.)
_INERT = re.compile(r"(?![/bfnrtu])[A-Za-z0-9._~+/=-]*[A-DF-Za-df-z_~/=][A-Za-z0-9._~+/=-]*")
_body_secrets: tuple[bytes, ...] = ()
# The secrets as decoded text holds them (form fields, JSON strings once parsed): any
# character will do there.
_text_secrets: tuple[str, ...] = ()
# Those of them not in _body_secrets, as bytes: a plain body holding one must be parsed
# and walked to mask it (see redaction.stage.escaped_own_secrets_out).
_unsearched_secrets: tuple[bytes, ...] = ()


def register_secret(value: str) -> None:
    """Never print ``value``: any log line containing it shows a mask instead; and never
    store it: a request body holding it has it masked (see body_secrets)."""
    global _body_secrets, _text_secrets, _unsearched_secrets
    # Very short values would mask innocent text and are not real secrets anyway.
    if len(value) >= 4:
        _SECRETS.add(value)
    if len(value) < 8:
        return
    # Sets, then longest first: a key registered again (every SIGHUP) is kept once, and
    # one secret holding another is masked whole.
    _text_secrets = _longest_first({*_text_secrets, value})
    if _INERT.fullmatch(value):
        _body_secrets = _longest_first({*_body_secrets, value.encode()})
    else:
        _unsearched_secrets = _longest_first(
            {*_unsearched_secrets, value.encode("utf-8", "surrogateescape")})


def _longest_first(secrets: set[Any]) -> tuple[Any, ...]:
    return tuple(sorted(secrets, key=len, reverse=True))


def body_secrets() -> tuple[bytes, ...]:
    return _body_secrets


def text_secrets() -> tuple[str, ...]:
    return _text_secrets


def unsearched_secrets() -> tuple[bytes, ...]:
    return _unsearched_secrets


def scrub(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def _without_request_bytes(record: logging.LogRecord) -> bool:
    """aiohttp logs a malformed request with the bytes it could not parse, a header line
    or a chunk of the body, and a body it could not decode (drained after our 400) with a
    traceback: keep the kind of error, drop the rest, at level warning. A client that went
    away (while aiohttp answered "100 Continue", say) is no fault here: one line too."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError | RequestPayloadError):
        status = f" (HTTP {error.code})" if isinstance(error, HttpProcessingError) else ""
        what = f"{type(error).__name__}{status}; the request's bytes are not logged"
    elif isinstance(error, ConnectionResetError) and record.name.startswith("aiohttp."):
        what = "the client closed the connection"
    else:
        return True
    record.msg = f"{record.getMessage()}: {what}"
    record.args = None
    record.exc_info = None
    record.exc_text = None
    if record.levelno > logging.WARNING:  # the client's fault, no server error
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


class Summarised:
    """A line that can come once per event (a dead letter, an eviction): the first is
    logged at once, the others of the next ``window_s`` are summed into one line at its
    end, so a flood of bad events stays a line a minute. The counts are in the metrics
    as they happen; this is for whoever reads the log."""

    def __init__(
        self, logger: logging.Logger, level: int, summary: str, window_s: float = 60.0
    ) -> None:
        """``summary``: a format taking the lines held back and the events they were
        about, e.g. "%d more dead-letter batches (%d events) in the last minute"."""
        self.logger, self.level, self.summary, self.window_s = logger, level, summary, window_s
        self._held = self._events = 0
        self._last = ""  # the last line held back: its cause may differ from the first's
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, message: str, *args: object, events: int = 1) -> None:
        if self._timer is not None:
            self._held += 1
            self._events += events
            self._last = message % args
            return
        self.logger.log(self.level, message, *args)
        self._start_window()

    def flush(self) -> None:
        """Log what is held back now (at shutdown: no window ends after it)."""
        if self._timer is not None:
            self._timer.cancel()
        self._end_window(restart=False)

    def _start_window(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the event loop (a command): nothing to sum
            return
        self._timer = loop.call_later(self.window_s, self._end_window)

    def _end_window(self, restart: bool = True) -> None:
        self._timer = None
        if not self._held:
            return
        self.logger.log(self.level, "%s; the last: %s",
                        self.summary % (self._held, self._events), self._last)
        self._held = self._events = 0
        if restart:  # still flooding, perhaps: the next lines are summed too
            self._start_window()


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
            "msg": scrub(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exc"] = scrub(self.formatException(record.exc_info))
        # Scrubbed before and after escaping: a secret holding a quote or a backslash is
        # escaped in the line, and the fields are only scrubbed here.
        return scrub(orjson.dumps(line, default=str).decode())


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    handler.addFilter(_without_request_bytes)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Only our own loggers follow log.level: libraries at debug print SQL parameters and
    # request bodies, which are the very prompts and responses we must not leak.
    root.setLevel(logging.WARNING)
    logging.getLogger("sidecar").setLevel(level.upper())
