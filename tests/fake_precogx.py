"""A local stand-in for the PrecogX API that can misbehave on command.

No live PrecogX is reachable from our machines, so tests and benchmarks talk to this
over a real loopback socket. It speaks the documented protocol (see
shared/reference/precogx-api.md) and, when scripted, answers with errors, stalls,
or breaks the connection the way a flaky upstream would.

In-process:  ``async with FakePrecogX() as fake: ...``
Subprocess:  ``python tests/fake_precogx.py --port N [--api-key K]`` (serves until
SIGTERM/SIGINT, prints ``listening http://127.0.0.1:N/api/v1`` once ready).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

API_PREFIX = "/api/v1"
BATCH_PATH = "/telemetry/batch"
SINGLE_PATHS = frozenset(
    {
        "/telemetry/ingest",
        "/integrations/dify/telemetry",
        "/integrations/flowise/telemetry",
        "/integrations/n8n/telemetry",
        "/integrations/custom/telemetry",
    }
)


@dataclass
class Respond:
    """Answer with this status (and body/headers) instead of processing the request.

    Nothing is recorded as received, even for a 2xx: this is the server claiming
    success without storing anything.
    """

    status: int
    # str and bytes are sent as they are (an HTML page; a gzip body with its header)
    body: dict[str, Any] | str | bytes | None = None
    headers: dict[str, str] | None = None
    after: float = 0.0  # seconds to wait before answering: a slow, failing upstream


@dataclass
class Delay:
    """Wait this long, then process normally (the client's timeout should fire first).

    Like a real server, it still stores the interactions if the client has given up.
    """

    seconds: float


@dataclass
class Hold:
    """Wait until the test sets ``release``, then process normally: a request that stays
    in flight exactly as long as a test needs it to."""

    release: asyncio.Event


@dataclass
class Drop:
    """Close the connection without any response; nothing is recorded as received."""


@dataclass
class DropMidResponse:
    """Process normally, but cut the connection partway through the response body.

    The interactions *are* recorded: the server accepted them, only the answer got
    lost, which is exactly the case that makes a retrying sender count events twice.
    """


Action = Respond | Delay | Hold | Drop | DropMidResponse


@dataclass
class RecordedRequest:
    path: str  # full request path, e.g. "/api/v1/telemetry/batch"
    headers: dict[str, str]  # lower-case keys
    body: bytes
    status: int | None  # None while still being handled, or when dropped
    at: float  # time.monotonic() when received
    answered_at: float | None = None  # time.time() when the answer was decided


class _Reject(Exception):
    """A PrecogX error answer, raised from deep inside validation."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


_DEFAULT_CODES = {
    400: "BAD_REQUEST",
    401: "INVALID_API_KEY",
    403: "INSUFFICIENT_PERMISSIONS",
    404: "NOT_FOUND",
    413: "PAYLOAD_TOO_LARGE",
    429: "RATE_LIMIT_EXCEEDED",
}


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def _default_body(status: int) -> dict[str, Any]:
    if 200 <= status < 300:
        return {"status": "success", "message": "Telemetry received"}
    code = "INTERNAL_ERROR" if status >= 500 else _DEFAULT_CODES.get(status, "ERROR")
    return error_body(code, f"Scripted {status} response")


def _missing(field: str, index: int | None) -> _Reject:
    where = {} if index is None else {"index": index}
    return _Reject(400, "MISSING_REQUIRED_FIELD", f"{field} is required", field=field, **where)


def _bad_type(field: str, index: int | None, wanted: str) -> _Reject:
    where = {} if index is None else {"index": index}
    msg = f"{field} must be {wanted}"
    return _Reject(400, "INVALID_FIELD_TYPE", msg, field=field, **where)


def _check_interaction(item: Any, index: int | None) -> None:
    if not isinstance(item, dict):
        raise _bad_type("body" if index is None else "interactions", index, "an object")
    # A null or empty agentId is as good as missing: the API cannot attribute the event.
    if item.get("agentId") in (None, ""):
        raise _missing("agentId", index)
    if not isinstance(item["agentId"], str):
        raise _bad_type("agentId", index, "a string")
    for field in ("prompt", "response"):
        if item.get(field) is None:
            raise _missing(field, index)
        # Chat apps send strings, Dify workflow apps send their inputs/outputs objects.
        if not isinstance(item[field], str | dict):
            raise _bad_type(field, index, "a string or object")
    for field, kind, wanted in (("metadata", dict, "an object"), ("toolCalls", list, "an array")):
        if item.get(field) is not None and not isinstance(item[field], kind):
            raise _bad_type(field, index, wanted)


class FakePrecogX:
    def __init__(
        self,
        api_keys: Iterable[str] = ("px_test_key",),
        max_batch_events: int | None = None,
        reject_agent_ids: Iterable[str] = (),
    ) -> None:
        self.api_keys: set[str] = set(api_keys)
        self.max_batch_events = max_batch_events
        self.max_body_bytes: int | None = None
        self.reject_agent_ids: set[str] = set(reject_agent_ids)
        self.received: list[dict[str, Any]] = []
        self.requests: list[RecordedRequest] = []
        self.default: Action | None = None
        self.in_flight = 0
        self.max_in_flight = 0  # tests reset it to watch a period of their choosing
        self.url = ""
        self._script: deque[Action] = deque()
        # Replaced on every change, so waiters wake without polling and without a lock.
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakePrecogX:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self, port: int = 0) -> None:
        # aiohttp's own 1 MiB body cap would pre-empt max_body_bytes and big batches.
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown grace so stop() is not held up by a scripted long Delay.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        bound = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{bound}{API_PREFIX}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def script(self, *actions: Action) -> None:
        self._script.extend(actions)

    # The timeout parameter is part of the interface the test-suite is written against.
    async def wait_for_received(self, n: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        await self._wait(lambda: len(self.received), n, timeout, "interactions received")

    async def wait_for_requests(self, n: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        await self._wait(lambda: len(self.requests), n, timeout, "requests arrived")

    def received_ids(self, key: str = "sidecar_event_id") -> list[Any]:
        metas = (i.get("metadata") for i in self.received)
        return [m.get(key) if isinstance(m, dict) else None for m in metas]

    async def _wait(self, count: Callable[[], int], n: int, limit: float, what: str) -> None:
        async def until_done() -> None:
            while count() < n:
                await self._changed.wait()

        try:
            await asyncio.wait_for(until_done(), limit)
        except TimeoutError:
            raise TimeoutError(f"timed out after {limit}s: {count()} of {n} {what}") from None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        at = time.monotonic()
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        rec = RecordedRequest(request.path, headers, body, None, at)
        action = self._script.popleft() if self._script else self.default
        self.requests.append(rec)
        self._notify()

        if isinstance(action, Delay):
            await asyncio.sleep(action.seconds)
        if isinstance(action, Hold):
            await action.release.wait()
        if isinstance(action, Drop):
            assert request.transport is not None
            request.transport.close()
            # aiohttp swallows the ConnectionError from writing this to a closed socket.
            return web.Response(status=500)
        if isinstance(action, Respond):
            await asyncio.sleep(action.after)
            status, payload, extra = action.status, action.body, action.headers
            payload = _default_body(status) if payload is None else payload
        else:
            status, payload, extra = *self._process(request, body), None
        rec.status = status
        rec.answered_at = time.time()
        self._notify()
        if isinstance(payload, str | bytes):
            raw = payload.encode() if isinstance(payload, str) else payload
            content_type = "text/html"
        else:
            raw, content_type = orjson.dumps(payload), "application/json"

        if isinstance(action, DropMidResponse):
            resp = web.StreamResponse(status=status, headers=extra)
            resp.content_type = "application/json"
            resp.content_length = len(raw) + 64  # promise more than will ever arrive
            await resp.prepare(request)
            await resp.write(raw[: max(1, len(raw) // 2)])
            assert request.transport is not None
            request.transport.close()
            return resp
        if status in (204, 304):
            return web.Response(status=status, headers=extra)
        return web.Response(status=status, body=raw, content_type=content_type, headers=extra)

    def _process(self, request: web.Request, body: bytes) -> tuple[int, dict[str, Any]]:
        """Do what the real API does: authenticate, validate, accept all or nothing."""
        try:
            accepted = self._validate(request, body)
        except _Reject as r:
            return r.status, error_body(r.code, r.message, r.details)
        ids = [str(uuid.uuid4()) for _ in accepted]
        self.received.extend(accepted)
        if request.path == API_PREFIX + BATCH_PATH:
            return 200, {"status": "success", "accepted": len(accepted), "interactionIds": ids}
        agent = accepted[0]["agentId"]
        msg = "Telemetry received"
        return 200, {"status": "success", "message": msg, "agentId": agent, "interactionId": ids[0]}

    def _validate(self, request: web.Request, body: bytes) -> list[dict[str, Any]]:
        key = request.headers.get("x-api-key")
        if key is None:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        if key not in self.api_keys:
            # Never echo the key: it is a secret even when it is wrong.
            raise _Reject(401, "INVALID_API_KEY", "Invalid or missing API key")

        path = request.path.removeprefix(API_PREFIX)
        if path == request.path or (path != BATCH_PATH and path not in SINGLE_PATHS):
            raise _Reject(404, "NOT_FOUND", f"No such endpoint: {request.method} {request.path}")
        if request.method != "POST":
            raise _Reject(405, "METHOD_NOT_ALLOWED", "Only POST is supported")
        if self.max_body_bytes is not None and len(body) > self.max_body_bytes:
            msg = f"Body of {len(body)} bytes exceeds the limit of {self.max_body_bytes}"
            raise _Reject(413, "PAYLOAD_TOO_LARGE", msg, limit=self.max_body_bytes, size=len(body))
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _Reject(400, "INVALID_JSON", "Request body is not valid JSON") from None

        if path != BATCH_PATH:
            items, indexed = [doc], False
        else:
            if not isinstance(doc, dict):
                raise _bad_type("body", None, "an object")
            if doc.get("interactions") is None:
                raise _missing("interactions", None)
            items, indexed = doc["interactions"], True
            if not isinstance(items, list) or not items:
                raise _bad_type("interactions", None, "a non-empty array")
            if self.max_batch_events is not None and len(items) > self.max_batch_events:
                limit, count = self.max_batch_events, len(items)
                msg = f"Batch of {count} interactions exceeds the limit of {limit}"
                raise _Reject(413, "PAYLOAD_TOO_LARGE", msg, limit=limit, count=count)
        for i, item in enumerate(items):
            _check_interaction(item, i if indexed else None)
            if item["agentId"] in self.reject_agent_ids:
                raise _bad_type("agentId", i if indexed else None, "an agent this key may use")
        return items


async def _serve(port: int, api_keys: list[str], max_batch_events: int | None) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    fake = FakePrecogX(api_keys, max_batch_events=max_batch_events)
    await fake.start(port)  # the context manager would take any free port
    try:
        print(f"listening {fake.url}", flush=True)
        await stopping.wait()
    finally:
        await fake.stop()
    # Lets a benchmark check delivery without a side channel into this process.
    summary = f"{len(fake.received)} interactions in {len(fake.requests)} requests"
    print(f"stopped: {summary}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0, help="0: any free port (see stdout)")
    parser.add_argument("--api-key", action="append", help="repeatable; default px_test_key")
    parser.add_argument("--max-batch-events", type=int, default=None)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.port, args.api_key or ["px_test_key"], args.max_batch_events))


if __name__ == "__main__":
    main()
