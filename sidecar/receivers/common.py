"""What every receiver shares: routes, JSON answers and the constant-time token check."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.hdrs import EXPECT

from sidecar.receivers.validation import Rejection
from sidecar.redaction.stage import Detectors, RedactionStage
from sidecar.spool import Spool

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# Answers a request sent with an Expect header before its body is read: None to go on
# (after "100 Continue"), or the refusal.
ExpectHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse | None]]


UNKNOWN_EXPECTATION = Rejection(
    417, "EXPECTATION_FAILED", "only Expect: 100-continue is understood", "invalid_body"
)


async def expect_continue(request: web.BaseRequest) -> web.Response | None:
    """What aiohttp's router does for a route without an expect handler of its own."""
    if not await send_continue(request):
        return json_response(UNKNOWN_EXPECTATION.status, UNKNOWN_EXPECTATION.body())
    return None


async def send_continue(request: web.BaseRequest) -> bool:
    """Answer ``Expect: 100-continue`` with "100 Continue"; False for any other
    expectation, which is left to the caller to refuse. Only for HTTP/1.1 and later: the
    dispatch ignores Expect on HTTP/1.0."""
    if request.headers.get(EXPECT, "").lower() != "100-continue":
        return False
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # as aiohttp's own handler: no body sent yet
    return True


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    expect: ExpectHandler = expect_continue


# Who answers, without versions: aiohttp's default names Python's and its own, which
# tells a scanner which advisories to try. (The version is on /metrics, for operators.)
SERVER_HEADER = {"Server": "precogx-sidecar"}


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json",
        headers={**SERVER_HEADER, **headers} if headers else SERVER_HEADER,
    )


class UnreadableBody(Exception):
    """The body could not be read as sent; ``str()`` says why, in one line."""


async def read_body(request: web.BaseRequest, timeout_s: float) -> bytes:
    """The whole body, its Content-Encoding undone.

    Raises web.HTTPRequestEntityTooLarge past the application's client_max_size,
    measured after decoding, as request.read() does; UnreadableBody for a body that does
    not decode, that the client stopped sending, or whose rest has not come within
    ``timeout_s`` (server.body_timeout_s).
    """
    try:
        content = request.content
        if content.is_eof():
            # All of it has arrived (the common case, a small body): taken as it lies in
            # the buffer, without request.read()'s loop and copy.
            body = content.read_nowait()
            limit = request.client_max_size
            if limit and len(body) > limit:
                raise web.HTTPRequestEntityTooLarge(limit)
            return body
        # Bounded: a client that stalls mid-body (or sends a bad chunk size after the
        # first packet, which aiohttp never hands to the reader) would hold the handler,
        # its connection and its memory for as long as it stays connected.
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise UnreadableBody(
            f"the rest of the body did not come within server.body_timeout_s = "
            f"{timeout_s:g} s"
        ) from None
    except web.RequestPayloadError as e:
        encoding = request.headers.get("Content-Encoding", "none")
        reason = " ".join(str(e).split())  # aiohttp's message spans two lines
        raise UnreadableBody(
            f"body cannot be read as sent (Content-Encoding: {encoding}): {reason}"
        ) from None
    except ConnectionResetError:
        # The caller gave up mid-body (a Dify node timing out, say): nobody reads the
        # answer, but the refusal is counted, and it is no server error to log.
        raise UnreadableBody("the connection closed before the body was complete") from None


def token_matches(request: web.BaseRequest, token: bytes, *, x_api_key: bool = True) -> bool:
    """The token from ``Authorization: Bearer`` (or ``x-api-key``), compared in constant time."""
    sent = request.headers.get("x-api-key") if x_api_key else None
    if not sent:  # an empty x-api-key (a template left blank) does not hide the Bearer
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        sent = credentials.strip()
    # A header byte that is not UTF-8 arrives as a lone surrogate: compared as sent.
    return hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), token)


def spool_interactions(
    spool: Spool, redact: RedactionStage, items: list[dict[str, Any]],
    idempotency_key: str | None = None, possible_secrets: Detectors | None = None,
    *, redacted: bool = False, fingerprint: str | None = None,
) -> tuple[list[int], asyncio.Future[list[int]]]:
    """Redact validated interactions (unless the caller already did) and hand them to the
    spool.

    Returns their ids and the future of their commit. Redaction happens before anything
    is serialised, so a redacted value never reaches the disk. Raises Rejection for an
    event that cannot be written back as JSON; nothing is stored then.
    """
    if not redacted and redact.applies(possible_secrets):
        for item in items:
            redact(item, possible_secrets)
    ids = spool.allocate_ids(len(items))
    payloads = _stamped(items, spool.event_refs(ids))
    return ids, spool.append(ids, payloads, idempotency_key, fingerprint)


def _stamped(items: list[dict[str, Any]], refs: list[str]) -> list[bytes]:
    """Name each event inside its own metadata, so an upstream can drop redeliveries."""
    dumps = orjson.dumps
    payloads = []
    for index, (item, ref) in enumerate(zip(items, refs, strict=True)):
        metadata = item.get("metadata")
        if metadata is None:
            item["metadata"] = metadata = {}
        metadata["sidecar_event_id"] = ref
        try:
            payloads.append(dumps(item))
        except orjson.JSONEncodeError as e:
            # orjson reads 1024 levels of nesting but writes only 255.
            where = f"interactions[{index}]" if len(items) > 1 else "the interaction"
            raise Rejection(
                400, "INVALID_FIELD_TYPE", f"{where} cannot be stored: {e}", "invalid_event",
                {"index": index} if len(items) > 1 else {},
            ) from None
    return payloads
