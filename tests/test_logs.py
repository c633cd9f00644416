"""Logs: our level for our loggers only, secrets scrubbed, JSON lines on request."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestPayloadError

from sidecar import logs


@pytest.fixture(autouse=True)
def restore_logging() -> object:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("sidecar").level)
    yield None
    root.handlers[:], root.level = saved[0], saved[1]
    logging.getLogger("sidecar").setLevel(saved[2])


def test_debug_applies_to_our_loggers_only() -> None:
    logs.setup("debug")
    assert logging.getLogger("sidecar.spool").isEnabledFor(logging.DEBUG)
    # Libraries at debug log what they handle: request bodies, SQL parameters.
    assert not logging.getLogger("aiohttp.server").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("aiohttp.access").isEnabledFor(logging.INFO)


def test_registered_secrets_never_reach_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("info", "text")
    logs.register_secret("px_live_abcdefghijklmnop")
    logging.getLogger("sidecar.test").error("key was px_live_abcdefghijklmnop, oops")
    err = capsys.readouterr().err
    assert "px_live_abcdefghijklmnop" not in err
    assert "key was ********, oops" in err


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("info", "json")
    logs.register_secret("tok_secret_value")
    logging.getLogger("sidecar.test").warning("spool full with tok_secret_value")
    line = orjson.loads(capsys.readouterr().err.strip())
    assert line["level"] == "warning"
    assert line["logger"] == "sidecar.test"
    assert line["msg"] == "spool full with ********"
    assert line["ts"].endswith("Z")


@pytest.mark.parametrize("error", [
    BadHttpMessage("bad header line", headers=None),
    RequestPayloadError("Can not decode content-encoding: gzip"),
])
def test_aiohttp_request_errors_are_one_line_without_the_request(
    capsys: pytest.CaptureFixture[str], error: Exception
) -> None:
    """aiohttp logs a malformed request, or the unreadable body it drains after the
    answer, with a traceback whose frames hold the request's bytes: a prompt, a key."""
    logs.setup("info", "text")
    try:
        try:
            raise ValueError("Authorization: Bearer sk-leaked-in-a-frame")
        except ValueError as cause:
            raise error from cause
    except Exception:
        logging.getLogger("aiohttp.server").exception("Unhandled exception")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "sk-leaked" not in err
    assert f"WARNING aiohttp.server: Unhandled exception: {type(error).__name__}" in err


def test_a_client_gone_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("info", "text")
    try:
        raise ConnectionResetError("Cannot write to closing transport")
    except ConnectionResetError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "::1")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "WARNING aiohttp.server: Error handling request from ::1: the client closed" in err


async def test_a_line_per_event_becomes_a_line_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Dead letters, evictions, splits: one line each flooded the log with a bad batch."""
    logger = logging.getLogger("sidecar.test-summarised")
    summed = asyncio.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("3 more"):
                summed.set()

    logger.addHandler(Seen())
    lines = logs.Summarised(logger, logging.WARNING, "%d more (%d events)", window_s=0.05)
    lines("dead-lettered %d", 2, events=2)
    for n in (3, 4, 5):
        lines("dead-lettered %d", n, events=n)
    await asyncio.wait_for(summed.wait(), 30)  # at the end of the window
    lines("dead-lettered %d", 6, events=6)  # held: the flood may go on
    lines.flush()
    lines("dead-lettered %d", 7, events=7)  # after a quiet window: at once again
    assert [r.getMessage() for r in caplog.records if r.name == logger.name] == [
        "dead-lettered 2", "3 more (12 events); the last: dead-lettered 5",
        "1 more (6 events); the last: dead-lettered 6", "dead-lettered 7"]


def test_a_secret_registered_again_is_kept_once() -> None:
    """Every SIGHUP registers the key again: the tuples searched per request grew."""
    for _ in range(3):
        logs.register_secret("p@ss!word 2024-x")
        logs.register_secret("0123456789abcdef")
    assert logs.unsearched_secrets() == (b"p@ss!word 2024-x",)
    assert logs.body_secrets() == (b"0123456789abcdef",)
    assert sorted(logs.text_secrets()) == ["0123456789abcdef", "p@ss!word 2024-x"]
