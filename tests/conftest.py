"""Shared fixtures: a fake PrecogX and sidecars running in-process on real sockets and files."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import pytest

from sidecar import config as sidecar_config
from sidecar import logs
from sidecar.config import Config
from sidecar.server import Server
from tests.fake_precogx import FakePrecogX

# The sidecar honours HTTP(S)_PROXY: a proxy set on the machine running the tests must
# not stand between it and the local fake (sidecars in subprocesses inherit this).
for _proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
               "all_proxy"):
    os.environ.pop(_proxy, None)

TEST_KEY = "px_test_key"
ROOT = Path(__file__).resolve().parent.parent

EXAMPLE_EVENT = {
    "agentId": "dify-test-app",
    "prompt": "Hello, this is a test message",
    "response": "Hi! I received your test message successfully.",
    "appId": "test-app-123",
    "conversationId": "conv-456",
    "userId": "user-789",
    "metadata": {"platform": "dify", "test": True},
}


def toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return sidecar_config._toml_value(value)


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """Scalars and arrays as key = value; lists of tables as [[section.key]] blocks."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        tables = {k: v for k, v in values.items() if isinstance(v, list) and v
                  and all(isinstance(t, dict) for t in v)}
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if k not in tables]
        for key, items in tables.items():
            for table in items:
                lines.append(f"[[{name}.{key}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def write_config(tmp_path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    path = tmp_path / "sidecar.toml"
    path.write_text(toml_text(sections))
    return path


def sidecar_sections(
    tmp_path: Path, upstream_url: str, **overrides: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Settings for a fast test sidecar: free port, spool in tmp_path, short backoffs."""
    key_file = tmp_path / "api-key"
    if not key_file.exists():
        key_file.write_text(TEST_KEY + "\n")
    sections: dict[str, dict[str, Any]] = {
        "server": {"port": 0, "shutdown_grace_s": 2.0},
        "spool": {"path": str(tmp_path / "spool.db"), "checkpoint_interval_s": 0.2},
        "upstream": {
            "url": upstream_url,
            "api_key_file": str(key_file),
            "linger_ms": 20,
            "timeout_s": 2.0,
        },
        "retry": {"initial_backoff_s": 0.01, "max_backoff_s": 0.05},
        "log": {"level": "debug"},
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    return sections


@dataclass
class Sidecar:
    server: Server
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def config(self) -> Config:
        return self.server.config

    async def post(
        self, path: str, body: Any = None, *, data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"headers": headers}
        if data is not None:
            kwargs["data"] = data
        else:
            kwargs["json"] = body
        async with self.session.post(self.url + path, **kwargs) as response:
            text = await response.text()
            try:
                return response.status, await response.json(content_type=None)
            except ValueError:
                return response.status, text

    async def post_cut_off(self, path: str, headers: bytes, body_start: bytes) -> None:
        """A POST whose client closes the connection 90 bytes short of its body."""
        _, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        writer.write(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + headers
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (len(body_start) + 90) + body_start
        )
        await writer.drain()
        writer.close()

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.url + path) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def stop(self) -> None:
        await self.server.shutdown()


StartSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture(autouse=True)
def _no_secrets_from_other_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry of the sidecar's own secrets is process-wide: what one test's sidecar
    registered would otherwise be masked in the next test's events and logs."""
    monkeypatch.setattr(logs, "_SECRETS", set())
    monkeypatch.setattr(logs, "_body_secrets", ())
    monkeypatch.setattr(logs, "_text_secrets", ())
    monkeypatch.setattr(logs, "_unsearched_secrets", ())


@pytest.fixture
async def fake() -> AsyncIterator[FakePrecogX]:
    async with FakePrecogX(api_keys=[TEST_KEY]) as f:
        yield f


@pytest.fixture
async def start_sidecar(
    tmp_path: Path, fake: FakePrecogX, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[StartSidecar]:
    """``await start_sidecar(spool={...}, upstream={...})`` -> a running Sidecar."""
    for var in list(os.environ):
        if var.startswith("PRECOGX_"):
            monkeypatch.delenv(var)
    running: list[Sidecar] = []
    session = aiohttp.ClientSession()

    async def start(**overrides: dict[str, Any]) -> Sidecar:
        path = write_config(tmp_path, sidecar_sections(tmp_path, fake.url, **overrides))
        server = Server(sidecar_config.load(str(path)))
        await server.startup()
        sidecar = Sidecar(server, session)
        running.append(sidecar)
        return sidecar

    yield start
    for sidecar in running:
        if sidecar.server.receiver.accepting:
            await sidecar.stop()
    await session.close()


def missing(what: str, install: str) -> NoReturn:
    """A tool or package a test needs is not installed: under CI (which must install it)
    the test fails, elsewhere it skips."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed: .ci/run must install it ({install})")
    pytest.skip(f"{what} is not installed ({install})")


def sidecar_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", *args]
