"""Logs: our level for our loggers only, secrets scrubbed, JSON lines on request."""

from __future__ import annotations

import logging

import orjson
import pytest

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
