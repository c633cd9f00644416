"""Stage 1: PrecogX's own ingest paths, answered locally.

Any client written for PrecogX (the Dify guide's HTTP Request node, Code node or
curl example) only changes the host. A 202 here means the events are committed
to the spool; every refusal carries PrecogX's error body and stores nothing.
"""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from typing import Any

import orjson
from aiohttp import web
from aiohttp.hdrs import CONTENT_TYPE

from sidecar.config import ServerConfig
from sidecar.metrics import Metrics
from sidecar.receivers.common import (
    UNKNOWN_EXPECTATION,
    Route,
    UnreadableBody,
    json_response,
    read_body,
    send_continue,
    spool_interactions,
    token_matches,
)
from sidecar.receivers.form import FORM_TYPE, interaction_of_form
from sidecar.receivers.validation import Rejection, interactions_of_batch, validate_interaction
from sidecar.redaction.stage import RedactionStage, escaped_own_secrets_out
from sidecar.spool import (
    DiskLow,
    IdempotencyKeyReused,
    LargerThanSpool,
    Spool,
    SpoolFull,
    SpoolUnavailable,
)

log = logging.getLogger("sidecar.receivers")

JSON_TYPES = frozenset({"application/json", "text/plain"})  # text/plain: Dify's raw-text body
MAX_IDEMPOTENCY_KEY = 255
RETRY_AFTER_S = "5"
# Bodies from this size up are redacted in a worker thread (RedactionStage.off_the_loop);
# below it, the thread's hand-over would cost more than the redaction.
OFF_LOOP_BYTES = 64 * 1024

SINGLE_PATHS = {
    "/api/v1/integrations/dify/telemetry": "dify_telemetry",
    "/api/v1/telemetry/ingest": "ingest",
}
BATCH_PATH = "/api/v1/telemetry/batch"


class IngestReceiver:
    def __init__(
        self, config: ServerConfig, spool: Spool, metrics: Metrics, redact: RedactionStage
    ) -> None:
        self.config = config
        self.spool = spool
        self.redact = redact
        self.metrics = metrics
        self.accepting = True
        self._token = config.ingest_token.encode()
        self._refusing = False
        self._received = {
            endpoint: metrics.tally(metrics.events_received.labels(endpoint))
            for endpoint in (*SINGLE_PATHS.values(), "batch")
        }

    def routes(self) -> list[Route]:
        # Bound per route: a request starts (and, after its commit, resumes) one
        # coroutine fewer than with a method per route calling _handle.
        singles = [
            Route("POST", path, partial(self._handle, endpoint=endpoint, batch=False),
                  partial(self._expect, batch=False))
            for path, endpoint in SINGLE_PATHS.items()
        ]
        batch = partial(self._handle, endpoint="batch", batch=True)
        return [*singles, Route("POST", BATCH_PATH, batch, partial(self._expect, batch=True))]

    async def _expect(self, request: web.BaseRequest, *, batch: bool) -> web.Response | None:
        """``Expect: 100-continue`` (curl sends it for bodies from 1 MiB): a request to be
        refused anyway is answered before its body is sent, not after the upload."""
        try:
            self._admit(request, batch)
        except Rejection as r:
            return self.rejected(r)
        if not await send_continue(request):
            return self.rejected(UNKNOWN_EXPECTATION)
        return None

    async def _handle(
        self, request: web.BaseRequest, *, endpoint: str, batch: bool
    ) -> web.Response:
        try:
            form = self._admit(request, batch)
            # Credentials are masked before anything else reads the body (in a form, as it
            # is parsed: encoded, they hide from a search in its bytes).
            raw = await self._read(request)
            body, secrets = (raw, None) if form else self.redact.mask_body(raw)
            key = _idempotency_key(request)
            if form:
                items = [interaction_of_form(body)]
            else:
                doc = _parse(body)
                escaped_own_secrets_out(body, doc)
                items = interactions_of_batch(doc) if batch else [validate_interaction(doc)]
            redacted = len(body) >= OFF_LOOP_BYTES and self.redact.applies(secrets)
            if redacted:
                await self.redact.off_the_loop(items, secrets)
            # A repeat must be the same request: the same key on another one (a key
            # reused by two HTTP nodes of one workflow run) would otherwise drop it.
            fingerprint = _fingerprint(body) if key is not None else None
            ids, committed = spool_interactions(
                self.spool, self.redact, items, key, secrets, redacted=redacted,
                fingerprint=fingerprint,
            )
            try:
                stored = await committed
            except (SpoolFull, LargerThanSpool, IdempotencyKeyReused, SpoolUnavailable) as e:
                raise self._refusal(e) from None
        except Rejection as r:
            return self.rejected(r)
        if stored == ids:  # else a repeat, answered with the ids of the first request
            self._received[endpoint].count += len(ids)
            if self._refusing:  # these events found room (a repeat stores nothing)
                self._spool_full(False)
        return json_response(202, {"accepted": len(stored), "ids": stored})

    def rejected(self, rejection: Rejection) -> web.Response:
        self.metrics.events_rejected.labels(rejection.reason).inc()
        return json_response(rejection.status, rejection.body(), rejection.headers)

    def _admit(self, request: web.BaseRequest, batch: bool) -> bool:
        """Refuse what can be refused before the body is read; whether it is a form."""
        if not self.accepting:
            raise Rejection(
                503, "SHUTTING_DOWN", "the sidecar is shutting down; retry shortly",
                "shutting_down", headers={"Retry-After": RETRY_AFTER_S},
            )
        if self._token and not token_matches(request, self._token):
            raise Rejection(
                401, "INVALID_API_KEY",
                "missing or wrong ingest token: send it as x-api-key or Authorization: Bearer",
                "unauthorized",
            )
        # The raw header, not request.content_type: its full parse is measurable per
        # request. Most clients send exactly "application/json": no need to normalise that.
        content_type = request.headers.get(CONTENT_TYPE, "")
        form = False
        if content_type not in JSON_TYPES:
            sent = content_type.partition(";")[0].strip()
            content_type = sent.lower()
            form = content_type == FORM_TYPE and not batch
            if not form and content_type not in JSON_TYPES:
                raise _unsupported(sent, batch)  # as sent: a secret in it is then masked
        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            raise _too_large(length, self.config.max_body_bytes)
        return form

    async def _read(self, request: web.BaseRequest) -> bytes:
        try:
            return await read_body(request, self.config.body_timeout_s)
        except web.HTTPRequestEntityTooLarge as e:
            raise _too_large(None, self.config.max_body_bytes) from e
        except UnreadableBody as e:
            raise Rejection(400, "INVALID_BODY", str(e), "invalid_body") from None

    def _refusal(self, error: Exception) -> Rejection:
        """What the client is told when the spool did not take its events."""
        if isinstance(error, SpoolFull):
            if isinstance(error, DiskLow):  # the spool logged it
                why = str(error)
            else:
                self._spool_full(True)
                why = "the spool is full (spool.max_events / spool.max_bytes)"
            return Rejection(
                503, "SPOOL_FULL", f"{why}; nothing was stored, retry later",
                "spool_full", headers={"Retry-After": RETRY_AFTER_S},
            )
        if isinstance(error, LargerThanSpool):
            return Rejection(
                413, "PAYLOAD_TOO_LARGE",
                f"the request can never fit in the spool: {error}; nothing was stored. "
                "Send fewer events per request",
                "too_large",
            )
        if isinstance(error, IdempotencyKeyReused):
            return Rejection(
                422, "IDEMPOTENCY_KEY_REUSED",
                "this Idempotency-Key was first used for a different request within "
                "server.idempotency_ttl_s; nothing was stored. Give each request its own "
                "key (for a Dify workflow: {{#sys.workflow_run_id#}} plus the node's name)",
                "idempotency_key_reused",
            )
        outcome = "the events could not be committed to the spool; nothing was stored"
        if isinstance(error, SpoolUnavailable) and error.maybe_stored:
            # Answered as stored, a crash before the next clean shutdown would lose them.
            outcome = ("the spool's files were replaced under the sidecar just after the "
                       "commit: the events may be kept or lost (a retry may store them twice)")
        return Rejection(503, "SPOOL_UNAVAILABLE", f"{outcome}; retry later", "spool_error",
                         headers={"Retry-After": RETRY_AFTER_S})

    def _spool_full(self, full: bool) -> None:
        """One log line per change, never one per refused request."""
        if full == self._refusing:
            return
        self._refusing = full
        if full:
            log.warning("spool full (spool.max_events / spool.max_bytes): refusing events "
                        "with 503 until deliveries make room")
        else:
            log.info("spool has room again: accepting events")


def _parse(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        message = f"body is not valid JSON: {e}"
        raise Rejection(400, "INVALID_JSON", message, "invalid_json") from None


def _idempotency_key(request: web.BaseRequest) -> str | None:
    key = request.headers.get("Idempotency-Key") or request.headers.get("webhook-id")
    # Printable ASCII, as the Idempotency-Key draft and Standard Webhooks' ids are: a
    # header byte that is not UTF-8 arrives as a lone surrogate, which SQLite cannot store.
    if key is not None and not (
        0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isascii() and key.isprintable()
    ):
        raise Rejection(
            400, "INVALID_IDEMPOTENCY_KEY",
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters",
            "invalid_idempotency_key",
        )
    # Kept by a digest: a key is the client's to choose, and one holding a credential
    # (or the ingest token) must not sit in the spool for idempotency_ttl_s.
    return None if key is None else _digest(key.encode())


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _fingerprint(body: bytes) -> str:
    """Of the body as parsed (credentials masked): a repeat sends the same bytes."""
    return _digest(body)


def _unsupported(content_type: str, batch: bool) -> Rejection:
    form = (f"; {FORM_TYPE} is taken on the single-interaction paths only" if batch
            else f"; {FORM_TYPE} for form fields")
    return Rejection(
        415, "UNSUPPORTED_MEDIA_TYPE",
        f"Content-Type must be application/json (or text/plain holding JSON{form}), "
        # Escaped: a header byte that is not UTF-8 arrives as a lone surrogate, which
        # JSON cannot carry.
        f"got {content_type.encode('ascii', 'backslashreplace').decode() or 'none'}",
        "unsupported_media_type",
    )


def _too_large(length: int | None, limit: int) -> Rejection:
    got = f" ({length} bytes)" if length is not None else ""
    return Rejection(
        413, "PAYLOAD_TOO_LARGE",
        f"body is larger than server.max_body_bytes = {limit}{got}",
        "too_large", {"max_body_bytes": limit},
    )
