"""The HTTP front: the receivers plus /healthz, /readyz and /metrics, found in one table.

aiohttp's low-level server with a dict from method and path to handler, rather than its
Application and router: every path is fixed, and the router's matching, match info and
expect-handler plumbing took about 5 % of the CPU of a single-event ingest.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from aiohttp import StreamReader, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.hdrs import EXPECT
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)

from sidecar.forwarder.forwarder import Forwarder
from sidecar.logs import scrub
from sidecar.metrics import Metrics
from sidecar.receivers.common import (
    SERVER_HEADER,
    ExpectHandler,
    Handler,
    Route,
    json_response,
)
from sidecar.receivers.dify_extension import DifyExtension
from sidecar.receivers.precogx import IngestReceiver
from sidecar.receivers.validation import Rejection, error_body
from sidecar.spool import Spool

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_PATH_SHOWN = 200

READY_DETAIL = {
    "starting": "starting up",
    "ok": "accepting events and delivering them",
    "no_api_key": "accepting and spooling events; forwarding waits for a PrecogX API key",
    "upstream_failing": "accepting events; PrecogX is failing, deliveries are being retried",
    "auth_rejected": "accepting events; PrecogX rejects the API key, forwarding is paused",
    "spool_full": "refusing events: the spool is full",
    "spool_unwritable": "refusing events: the spool cannot commit",
    "disk_low": "refusing events: the spool's disk has less than spool.min_free_bytes free",
    "spool_stalled": "events wait: a spool commit has not finished for seconds (the disk stalls)",
    "shutting_down": "shutting down",
}


def readiness(receiver: IngestReceiver, spool: Spool, forwarder: Forwarder) -> str:
    if not receiver.accepting:
        return "shutting_down"
    if spool.write_error:
        return "spool_unwritable"
    if spool.stalled_since is not None:
        return "spool_stalled"
    if spool.disk_low is not None:
        return "disk_low"
    # Under drop_oldest a full spool still takes events, while it has pending ones to
    # evict: those in flight are not.
    if spool.is_full() and (spool.config.when_full == "reject" or spool.unclaimed <= 0):
        return "spool_full"
    return forwarder.state


def build_server(
    receiver: IngestReceiver, dify: DifyExtension, spool: Spool, forwarder: Forwarder,
    metrics: Metrics,
) -> web.Server:
    """In the running loop."""

    async def healthz(_: web.BaseRequest) -> web.Response:
        return json_response(200, {"status": "alive"})

    def show_state() -> str:
        state = readiness(receiver, spool, forwarder)
        for name in READY_DETAIL:
            metrics.state.labels(name).set(1 if name == state else 0)
        return state

    async def readyz(_: web.BaseRequest) -> web.Response:
        state = show_state()
        body = {
            "status": state,
            "detail": READY_DETAIL[state],
            "spool": {"pending": spool.counts.pending, "dead": spool.counts.dead,
                      "bytes": spool.counts.bytes},
        }
        if state in ("upstream_failing", "auth_rejected") and forwarder.last_failure:
            body["last_failure"] = forwarder.last_failure  # which failure: a 429? a 503?
        return json_response(200 if state == "ok" else 503, body)

    async def metrics_page(_: web.BaseRequest) -> web.Response:
        show_state()
        return web.Response(
            body=metrics.render(), headers={**SERVER_HEADER, "Content-Type": PROMETHEUS_TYPE}
        )

    routes = [
        *receiver.routes(),
        *dify.routes(),
        Route("GET", "/healthz", healthz),
        Route("GET", "/readyz", readyz),
        Route("GET", "/metrics", metrics_page),
    ]
    return _Server(
        _dispatcher(routes), _request_factory(receiver.config.max_body_bytes), receiver.rejected
    )


class _Server(web.Server):
    """aiohttp's low-level server, whose connections answer the requests aiohttp itself
    refuses in PrecogX's error body too."""

    def __init__(
        self, handler: Handler, request_factory: RequestFactory, rejected: Refuse
    ) -> None:
        super().__init__(handler, request_factory=request_factory)
        self.rejected = rejected

    def __call__(self) -> web.RequestHandler:
        # No access log (None: aiohttp takes that, though its hint says Logger): one
        # line per event, formatted in the hot path, that nobody asked for.
        return _Connection(self, loop=asyncio.get_running_loop(), access_log=None)


class _Connection(web.RequestHandler):
    def __init__(self, server: _Server, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        # aiohttp drops its own reference to the server once the connection is lost,
        # and a handler may fail after that.
        self._server = server

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp cannot parse (a bad header line, chunk size or encoding), or
        a handler that failed: aiohttp answers in plain text quoting the request's bytes
        back; this answers as every other refusal, and counts it."""
        # Counted first: aiohttp's handle_error raises when an answer was already begun.
        response = self._server.rejected(protocol_rejection(status, exc, message))
        # Logs it (logs.py keeps the request's bytes out).
        super().handle_error(request, status, exc, message)
        response.force_close()  # as aiohttp's: the stream may be out of step
        return response


# What aiohttp's message says first, where that is a plain description: otherwise
# (its pure-Python parser quotes the request line, say) one by the exception's class,
# never the request's bytes, which may hold a token.
_DESCRIPTION = re.compile(r"[A-Za-z][A-Za-z ]{0,79}")
_FAULTS: tuple[tuple[type[Exception], str], ...] = (
    (BadHttpMethod, "unknown method"),
    (BadStatusLine, "bad request line"),
    (InvalidURLError, "bad request target"),
    (LineTooLong, "a request line or header is too long"),
    (InvalidHeader, "bad header"),
    (TransferEncodingError, "bad chunked body"),
    (ContentLengthError, "the body is shorter than its Content-Length"),
)


def protocol_rejection(
    status: int, exc: BaseException | None, message: str | None
) -> Rejection:
    if status >= 500:  # 504 for a handler's TimeoutError: a failure of ours all the same
        return Rejection(
            500, "INTERNAL_ERROR",
            "the sidecar failed on this request (its log says why); the events may or may "
            "not be stored: a retry with the same Idempotency-Key stores them once",
            "internal_error",
        )
    if isinstance(exc, ContentEncodingError):
        if "install" in str(exc):  # aiohttp lacks the library for it: br, zstd
            return Rejection(
                415, "UNSUPPORTED_CONTENT_ENCODING",
                "the body's Content-Encoding cannot be decoded here: send it "
                "uncompressed, gzip or deflate",
                "invalid_body",
            )
        return Rejection(
            400, "INVALID_BODY", "body cannot be read as sent: it does not decode as its "
            "Content-Encoding says", "invalid_body",
        )
    first = (message or "").split("\n", 1)[0].split(":", 1)[0].strip()
    if not _DESCRIPTION.fullmatch(first):
        first = next((what for kind, what in _FAULTS if isinstance(exc, kind)),
                     "cannot be parsed")
    return Rejection(
        status, "MALFORMED_REQUEST", f"the request is not valid HTTP: {first}",
        "malformed_request",
    )


def _dispatcher(routes: list[Route]) -> Handler:
    table: dict[tuple[str, str], tuple[Handler, ExpectHandler]] = {}
    for route in routes:
        table[route.method, route.path] = (route.handler, route.expect)
        if route.method == "GET":  # as aiohttp's router: HEAD too, the body left out
            table["HEAD", route.path] = (route.handler, route.expect)
    allowed: dict[str, list[str]] = {}
    for method, path in sorted(table):
        allowed.setdefault(path, []).append(method)
    paths = sorted(allowed)

    def no_route(request: web.BaseRequest) -> web.Response:
        """What aiohttp answers in plain text, in the API's error body."""
        methods = allowed.get(request.path)
        if methods is None:
            # Echoed, but not a megabyte of it; scrubbed first, or the cut could leave
            # most of a secret unmasked.
            path = scrub(request.path)[:MAX_PATH_SHOWN]
            # The paths answered: a client on a path PrecogX has and the sidecar not
            # (/integrations/n8n/telemetry) or with /api/v1 missing sees where to go.
            return json_response(404, error_body(
                "NOT_FOUND", f"no such path: {path}", {"paths": paths}))
        return json_response(405, error_body(
            "METHOD_NOT_ALLOWED", f"{request.path} takes {' or '.join(methods)}",
            {"allowed": methods},
        ), {"Allow": ", ".join(methods)})

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        route = table.get((request.method, request.path))
        if route is None:
            return no_route(request)
        handler, expect = route
        # HTTP/1.0 has no Expect: RFC 9110 has it ignored there.
        if EXPECT in request.headers and request.version >= HttpVersion11:
            refused = await expect(request)
            if refused is not None:
                return refused
        return await handler(request)

    return dispatch


Refuse = Callable[[Rejection], web.Response]
RequestFactory = Callable[
    [RawRequestMessage, StreamReader, web.RequestHandler, AbstractStreamWriter,
     "asyncio.Task[None]"],
    web.BaseRequest,
]


def _request_factory(max_body_bytes: int) -> RequestFactory:
    loop = asyncio.get_running_loop()

    def make_request(
        message: RawRequestMessage, payload: StreamReader,
        protocol: web.RequestHandler, writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # aiohttp enforces client_max_size while reading; the receiver turns it into our 413.
        return web.BaseRequest(
            message, payload, protocol, writer, task, loop, client_max_size=max_body_bytes
        )

    return make_request
