"""Stage 1: Dify's API-based Extension (Settings -> API Extension), spoken by the sidecar.

Dify calls it for input moderation before the model runs and for output moderation
while the answer streams. Input moderation fails the user's chat when this endpoint
fails or is slow, so it answers at once and never waits for the spool or PrecogX.

Pairing. Dify sends no conversation or message id: an input is {app_id, inputs,
query}; an output is {app_id, text}, re-sent with the whole answer so far every 300
characters and once at the end. So:
- each output either extends an open stream of the same app (its text starts with
  that stream's text) or opens a new stream, which takes the app's oldest input
  still waiting for an answer;
- a stream with no new text for ``dify.pair_idle_s`` is finished: its longest text
  is recorded with its input as one interaction;
- an input with no output for ``dify.input_wait_s`` is recorded with an empty response
  (output moderation may be off for that app).
Under concurrent chats of one app the input-to-output pairing follows arrival order
and can cross two chats; the texts themselves are never mixed. Pairs are held in
memory until recorded, so a crash loses at most those open conversations: the
workflow HTTP node path is the one that is durable before it answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from sidecar.aio import wait_at_most
from sidecar.config import DifyConfig
from sidecar.logs import Summarised
from sidecar.metrics import Metrics
from sidecar.receivers.common import (
    Route,
    UnreadableBody,
    json_response,
    read_body,
    spool_interactions,
    token_matches,
)
from sidecar.receivers.validation import Rejection
from sidecar.redaction.redactor import Hit
from sidecar.redaction.stage import (
    RedactionStage,
    escaped_own_secrets_out,
    without_own_secrets,
)
from sidecar.spool import Spool

log = logging.getLogger("sidecar.dify")

PATH = "/dify/extension"
SWEEP_EVERY_S = 1.0
# Dify calls output moderation every this many new characters (MODERATION_BUFFER_SIZE),
# then once at the end: a shorter answer comes in one call, only at its end.
DIFY_BUFFER_CHARS = 300
NOT_FLAGGED = {"flagged": False, "action": "direct_output", "preset_response": ""}
# For a call whose point is unknown because its body was not read: passes every point
# (Dify ignores the fields its point does not have).
PASS_ANY = {**NOT_FLAGGED, "result": ""}


class BadCall(Exception):
    pass


@dataclass
class Conversation:
    app_id: str
    query: str
    inputs: dict[str, Any]
    received_at: float = field(default_factory=time.time)
    text: str | None = None
    touched: float = field(default_factory=time.monotonic)
    grown: bool = False  # the answer came in more than one text (a long, streamed one)

    def interaction(self) -> dict[str, Any]:
        """As the rules see it, inline ones included: the query as `prompt`, the inputs as
        `metadata.inputs` (see DifyExtension._redacted for an input without a query)."""
        metadata: dict[str, Any] = {"platform": "dify", "source": "api_extension"}
        if self.inputs:
            metadata["inputs"] = self.inputs
        return {
            "agentId": f"dify-{self.app_id}",
            "prompt": self.query,
            "response": self.text or "",
            "appId": self.app_id,
            "metadata": metadata,
        }


class Pairing:
    """Inputs waiting for an answer and answers still streaming, per app."""

    def __init__(self, config: DifyConfig) -> None:
        self.config = config
        self.waiting: dict[str, deque[Conversation]] = {}
        self.streaming: dict[str, list[Conversation]] = {}
        self.answered: list[Conversation] = []  # done already, to be recorded

    @property
    def open(self) -> int:
        return (sum(map(len, self.waiting.values())) + sum(map(len, self.streaming.values()))
                + len(self.answered))

    def add_input(self, app_id: str, query: str, inputs: dict[str, Any]) -> None:
        self.waiting.setdefault(app_id, deque()).append(Conversation(app_id, query, inputs))

    def add_output(self, app_id: str, text: str) -> None:
        if not text:
            # An empty answer: every text starts with it, so as a stream it would take
            # the answers of the app's next chats. Done as it comes, with its input.
            conversation = self._next_waiting(app_id)
            if conversation is not None:
                conversation.text = ""
                self.answered.append(conversation)
            return
        streams = self.streaming.setdefault(app_id, [])
        waiting = self.waiting.get(app_id)
        for stream in streams:
            assert stream.text is not None
            if text.startswith(stream.text) or stream.text.startswith(text):
                if (len(text) <= len(stream.text) < DIFY_BUFFER_CHARS and not stream.grown
                        and waiting and waiting[0].touched > stream.touched):
                    # A short answer (Dify sends it once) again, and a chat began since:
                    # the same answer ("Hello! How can I help?") to that chat. A longer
                    # answer's last text may come twice, at its end: no new chat's.
                    break
                if len(text) > len(stream.text):
                    stream.text = text
                    stream.grown = True
                stream.touched = time.monotonic()
                return
        stream = self._next_waiting(app_id) or Conversation(app_id, "", {})
        stream.text = text
        stream.touched = time.monotonic()
        streams.append(stream)

    def finished(self, now: float | None = None) -> list[Conversation]:
        """Remove and return what is done: idle streams and inputs that waited too long."""
        now = time.monotonic() if now is None else now
        done, self.answered = self.answered, []
        # An app is kept only while it has something open: Dify's app ids come and go,
        # and one kept for ever per id ever seen is memory, and a walk each sweep, without
        # bound.
        for app_id, streams in list(self.streaming.items()):
            done += [s for s in streams if now - s.touched >= self.config.pair_idle_s]
            streams[:] = [s for s in streams if now - s.touched < self.config.pair_idle_s]
            if not streams:
                del self.streaming[app_id]
        for app_id, waiting in list(self.waiting.items()):
            while waiting and now - waiting[0].touched >= self.config.input_wait_s:
                done.append(waiting.popleft())
            if not waiting:
                del self.waiting[app_id]
        return done

    def _next_waiting(self, app_id: str) -> Conversation | None:
        """The app's oldest input still waiting for its answer, taken off (and the app
        forgotten once none waits); None if none does."""
        waiting = self.waiting.get(app_id)
        if not waiting:
            return None
        conversation = waiting.popleft()
        if not waiting:
            del self.waiting[app_id]
        return conversation

    def everything(self) -> list[Conversation]:
        done = [c for streams in self.streaming.values() for c in streams]
        done += [c for waiting in self.waiting.values() for c in waiting]
        done += self.answered
        self.answered = []
        self.streaming.clear()
        self.waiting.clear()
        return done


class DifyExtension:
    def __init__(
        self, config: DifyConfig, spool: Spool, metrics: Metrics,
        redact: RedactionStage, redact_inline: RedactionStage, body_timeout_s: float,
    ) -> None:
        self.config = config
        self.body_timeout_s = body_timeout_s
        self.spool = spool
        self.redact = redact
        self.redact_inline = redact_inline
        self.metrics = metrics
        self.pairing = Pairing(config)
        self._token = config.extension_token.encode()
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._stopped = False
        self.unrecorded_after_stop = 0  # calls answered once the spool had closed
        self._received = metrics.events_received.labels("dify_extension")
        # Lines that can come per call: one a minute at most (see Summarised).
        self._pairing_full_lines = Summarised(
            log, logging.WARNING,
            "dify.max_open: %d more conversations (%d) dropped in the last minute (counted)")
        self._too_large_lines = Summarised(
            log, logging.WARNING, "%d more oversize Dify extension calls (%d) in the last "
            "minute: answered, not recorded (counted)")
        self._unspooled_lines = Summarised(
            log, logging.ERROR, "%d more Dify extension interactions (%d) the spool refused "
            "in the last minute (counted)")

    def routes(self) -> list[Route]:
        return [Route("POST", PATH, self.handle)]

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="dify-pairing")

    async def stop(self) -> None:
        """Record every open conversation as it stands: better a partial pair than none."""
        if self._sweeper is not None:
            # Not cancelled: a cancel while it records would lose what it had taken.
            self._stopping.set()
            await self._sweeper
        self._stopped = True
        for lines in (self._pairing_full_lines, self._too_large_lines, self._unspooled_lines):
            lines.flush()
        await self._record(self.pairing.everything())

    async def handle(self, request: web.BaseRequest) -> web.Response:
        if not self._token:
            return _error(404, "the API-based Extension is off: set dify.extension_token")
        if not token_matches(request, self._token, x_api_key=False):
            self.metrics.events_rejected.labels("unauthorized").inc()
            return _error(401, "missing or wrong API key (Authorization: Bearer <key>)")
        try:
            body = without_own_secrets(await read_body(request, self.body_timeout_s))
            return json_response(200, await self._answer(body))
        except web.HTTPRequestEntityTooLarge:
            # Dify takes any answer but a 200 as the extension failing, and then fails
            # the user's chat (input moderation): this one passes, unrecorded, counted.
            self.metrics.events_dropped.labels("dify_too_large").inc()
            self._too_large_lines("a Dify extension call larger than server.max_body_bytes = %d "
                                  "was answered but not recorded (counted)",
                                  request.client_max_size)
            return json_response(200, PASS_ANY)
        except BadCall as e:
            self.metrics.events_rejected.labels("invalid_event").inc()
            return _error(400, str(e))
        except UnreadableBody as e:
            self.metrics.events_rejected.labels("invalid_body").inc()
            return _error(400, str(e))
        except orjson.JSONEncodeError as e:
            # The answer echoes the inputs, and orjson writes only 255 levels of nesting.
            self.metrics.events_rejected.labels("invalid_event").inc()
            return _error(400, f"params cannot be answered: {e}")

    async def _answer(self, body: bytes) -> dict[str, Any]:
        try:
            call = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise BadCall(f"body is not valid JSON: {e}") from None
        escaped_own_secrets_out(body, call)
        if not isinstance(call, dict) or not isinstance(call.get("point"), str):
            raise BadCall('body must be {"point": "...", "params": {...}}')
        params = call.get("params") or {}
        if not isinstance(params, dict):
            raise BadCall("params must be an object")
        point = call["point"]
        if point == "ping":
            return {"result": "pong"}
        if point == "app.moderation.input":
            return await self._moderate_input(params)
        if point == "app.moderation.output":
            return self._moderate_output(params)
        if point == "app.external_data_tool.query":
            return {"result": ""}
        raise BadCall(f"unknown point {point!r}")

    async def _moderate_input(self, params: dict[str, Any]) -> dict[str, Any]:
        app_id = _field(params, "app_id", str)
        query = _field(params, "query", str, "")
        inputs = _field(params, "inputs", dict, {})
        # Inline rules see the query as `prompt` and the inputs as `metadata.inputs`.
        seen = {"agentId": f"dify-{app_id}", "prompt": query, "response": "",
                "metadata": {"inputs": inputs}}
        overridden = (
            self.redact_inline.applies(None)
            and bool(await self.redact_inline.off_the_loop([seen], None))
        )
        query, inputs = seen["prompt"], seen["metadata"]["inputs"]
        if self._has_room():
            self.pairing.add_input(app_id, query, inputs)
        if overridden:
            # Dify runs this message's model on these (chat, completion and agent apps;
            # chatflow apps ignore them, and the history keeps the original query).
            return {"flagged": True, "action": "overridden", "preset_response": "",
                    "inputs": inputs, "query": query}
        return {**NOT_FLAGGED, "inputs": inputs, "query": query}

    def _moderate_output(self, params: dict[str, Any]) -> dict[str, Any]:
        app_id = _field(params, "app_id", str)
        text = _field(params, "text", str)
        if self._has_room():
            self.pairing.add_output(app_id, text)
        return {**NOT_FLAGGED, "text": text}

    def _has_room(self) -> bool:
        if self._stopped:
            # The spool is closing: still answer, Dify's chats must not fail.
            if not self.unrecorded_after_stop:
                log.warning("shutting down: Dify extension calls are answered but no "
                            "longer recorded (counted)")
            self.unrecorded_after_stop += 1
            self.metrics.events_dropped.labels("dify_shutting_down").inc()
            return False
        if self.pairing.open < self.config.max_open:
            return True
        # Answer Dify anyway: failing its moderation call would fail the user's chat.
        self.metrics.events_dropped.labels("dify_pairing_full").inc()
        self._pairing_full_lines("dify.max_open conversations are open: dropping one (counted)")
        return False

    async def _sweep(self) -> None:
        every = min(SWEEP_EVERY_S, self.config.pair_idle_s / 2)
        while not await wait_at_most(self._stopping, every):
            await self._record(self.pairing.finished())

    async def _record(self, conversations: list[Conversation]) -> None:
        if not conversations:
            return
        # In a worker thread, as on ingest (RedactionStage.off_the_loop): a pasted
        # document can take the detectors a while.
        done = await asyncio.to_thread(lambda: [self._redacted(c) for c in conversations])
        self.redact.count([hit for _, hits in done for hit in hits])
        for item, _ in done:
            try:
                _, committed = spool_interactions(self.spool, self.redact, [item], redacted=True)
            except Rejection as e:
                # One unwritable conversation (inputs nested past 255 levels) must neither
                # stop the sweeper nor take the others with it: it is refused, counted and
                # logged, as on ingest.
                self.metrics.events_rejected.labels(e.reason).inc()
                log.error("could not record a Dify conversation: %s", e.message)
                continue
            committed.add_done_callback(self._recorded)

    def _redacted(self, conversation: Conversation) -> tuple[dict[str, Any], list[Hit]]:
        """The conversation as stored, and what redaction hit in it (uncounted: this runs
        in a worker thread).

        With no query (a completion app's form), PrecogX is to read the inputs as the
        prompt, as the Dify guide sends a workflow's inputs. Rules know them as
        `metadata.inputs`, so they are redacted there first and only then moved to
        `prompt`, where the whole interaction is redacted."""
        item = conversation.interaction()
        hits: list[Hit] = []
        if not conversation.query and conversation.inputs:
            # Without the prompt, whose rules then run once, on the inputs.
            first = {"agentId": item["agentId"],
                     "metadata": {"inputs": item["metadata"].pop("inputs")}}
            # The rest of `first` is redacted, and counted, again with the item.
            hits += [hit for hit in self.redact.apply(first)
                     if hit.path.startswith("metadata.inputs")]
            metadata = first.get("metadata")
            # A rule may have masked or hashed the inputs as a whole, or removed them.
            item["prompt"] = metadata.get("inputs", "") if isinstance(metadata, dict) else ""
        return item, hits + self.redact.apply(item)

    def _recorded(self, committed: asyncio.Future[list[int]]) -> None:
        if committed.cancelled() or committed.exception() is not None:
            self.metrics.events_dropped.labels("dify_spool_refused").inc()
            self._unspooled_lines("could not spool a Dify extension interaction: %s",
                                  committed.exception())
        else:
            self._received.inc()


def _field(params: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = params.get(name, default)
    if value is None or not isinstance(value, kind):
        raise BadCall(f"params.{name} must be {'a string' if kind is str else 'an object'}")
    return value


def _error(status: int, message: str) -> web.Response:
    return json_response(status, {"error": message})
