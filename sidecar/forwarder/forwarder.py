"""Stage 4: drain the spool to PrecogX in batches, never losing what was accepted.

Three pieces, kept apart so each can be read and tested alone:
- batching: ``_next_batch`` waits for a full batch or for ``linger_ms``;
- pacing: the Circuit (one hold for everyone while failing) and the TokenBucket;
- the retry policy: ``decide()`` turns each outcome into a decision, carried out here.

An event leaves the spool only after a 2xx (or as a dead letter, with its reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import re
import time
from collections.abc import Iterator, Sequence

from sidecar.aio import cancel_and_wait, wait_at_most
from sidecar.config import Config
from sidecar.forwarder.circuit import Circuit
from sidecar.forwarder.client import UpstreamClient
from sidecar.forwarder.ratelimit import TokenBucket
from sidecar.forwarder.retry import (
    WRONG_ENDPOINT,
    DeadLetter,
    Decision,
    Deliver,
    Outcome,
    PauseAuth,
    Retry,
    RetryPolicy,
    Split,
    decide,
    failure_reason,
)
from sidecar.logs import Summarised, scrub
from sidecar.metrics import Metrics
from sidecar.spool import Spool, SpoolUnavailable, StoredEvent

log = logging.getLogger("sidecar.forwarder")

# How long to wait before looking again when the counts promised events that a claim
# did not find (another process changed the spool under us).
RECHECK_S = 1.0


class Forwarder:
    def __init__(
        self, config: Config, spool: Spool, metrics: Metrics, client: UpstreamClient
    ) -> None:
        self.config = config
        self.spool = spool
        self.metrics = metrics
        self.client = client
        self.policy = RetryPolicy(config.retry.initial_backoff_s, config.retry.max_backoff_s)
        self.circuit = Circuit()
        upstream = config.upstream
        burst = upstream.burst or max(int(upstream.requests_per_minute), 1)
        self.bucket = TokenBucket(upstream.requests_per_minute, burst)
        self.batch_events = upstream.batch_max_events if upstream.mode == "batch" else 1
        self.state = "starting"  # so that start() logs where it forwards to
        self.auth_rejected = False
        self.last_failure: str | None = None  # the latest failed request, for /readyz
        self._rejected_key = ""
        self._reloaded = False  # a new key came while the last was rejected
        self._key_ready = asyncio.Event()
        self._slots = asyncio.Semaphore(upstream.concurrency)
        self._deliveries: set[asyncio.Task[None]] = set()
        # Those with a request on its way (or its answer being recorded): the only ones
        # shutdown waits for. The others wait out a hold or the rate limit.
        self._sending: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        # Consecutive deliveries the spool could not record, and when to claim again.
        self._unrecorded = 0
        self._resume_at = 0.0
        # Lines that can come per event: one a minute at most (see Summarised).
        self._dead_letter_lines = Summarised(
            log, logging.WARNING, "%d more dead-letter lines (%d events) in the last minute: "
            "see `precogx-sidecar dead-letters list`")
        self._split_lines = Summarised(
            log, logging.INFO, "%d more splits (%d events) in the last minute")

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        self._refresh_state()
        self._loop_task = asyncio.create_task(self._main_loop(), name="forwarder")

    def set_api_key(self, key: str) -> None:
        """A new key (start-up or SIGHUP): a paused forwarder probes with it at once."""
        self.client.api_key = key
        if key:
            self._key_ready.set()
        else:
            self._key_ready.clear()
            self._auth_accepted()  # no key is left that PrecogX rejects
        if self.auth_rejected:
            # Probe at once, even with the same key: its permissions may have been fixed
            # upstream. The state stays until the probe's answer says what it is.
            self._reloaded = True
            self.circuit.cut_short()
        self._refresh_state()

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; give in-flight requests ``grace_s``; the rest stays spooled."""
        self._stopping = True
        if self._loop_task is not None:
            await cancel_and_wait(self._loop_task)
        # Batches only waiting (out a backoff, say, during an outage) need no grace.
        waiting = self._deliveries - self._sending
        for task in waiting:
            task.cancel()
        if self._deliveries:
            _, late = await asyncio.wait(self._deliveries, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            if left := len(waiting | late):
                log.info("shutdown: %d batches left in the spool for the next start", left)
        self._dead_letter_lines.flush()
        self._split_lines.flush()

    # -- batching --------------------------------------------------------------

    async def _main_loop(self) -> None:
        unreadable = 0  # claims in a row that failed
        while True:
            await self._key_ready.wait()
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except Exception as e:
                # The spool could not be read (an I/O error, a lock held too long): the
                # events are safe in the file. Without this the forwarder ended here, and
                # nothing was delivered until a restart.
                self._slots.release()
                unreadable += 1
                if unreadable == 1:
                    log.error("forwarder cannot read the spool (%s): trying again with backoff",
                              e)
                await asyncio.sleep(self.policy.backoff(unreadable))
                continue
            except BaseException:
                self._slots.release()
                raise
            if unreadable:
                log.info("forwarder reads the spool again")
                unreadable = 0
            task = asyncio.create_task(self._deliver(batch))
            self._deliveries.add(task)
            task.add_done_callback(self._delivery_done)

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        self._deliveries.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())

    async def _next_batch(self) -> list[StoredEvent]:
        """Claim a batch once it is full or its oldest event has lingered long enough."""
        spool = self.spool
        linger = self.config.upstream.linger_ms / 1000
        while True:
            spool.data_ready.clear()
            unclaimed = spool.unclaimed
            if unclaimed <= 0:
                await spool.data_ready.wait()
                continue
            since = spool.unclaimed_since
            if unclaimed < self.batch_events and since is not None:
                remaining = since + linger - time.monotonic()
                if remaining > 0:
                    await wait_at_most(spool.data_ready, remaining)
                    continue
            await self._after_unrecorded()
            batch = await spool.claim(self.batch_events, self.config.upstream.batch_max_bytes)
            if batch:
                return batch
            await spool.sync_external_changes()
            await wait_at_most(spool.data_ready, RECHECK_S)

    # -- delivery --------------------------------------------------------------

    async def _deliver(self, batch: list[StoredEvent]) -> None:
        parts = [batch]  # a stack: splitting pushes the two halves
        try:
            while parts:
                part = parts.pop()
                halves = await self._settle(part)
                parts.extend(reversed(halves))
        except asyncio.CancelledError:
            for part in parts:
                self.spool.release(part)
            raise
        except SpoolUnavailable as e:
            # Cannot record the result (disk full, the spool file gone): the events stay
            # pending. Claimed again at once, the same batch would go upstream in a loop.
            self._unrecorded += 1
            pause = self.policy.backoff(self._unrecorded)
            self._resume_at = time.monotonic() + pause
            if self._unrecorded == 1:
                log.error("spool cannot record deliveries (%s): pausing deliveries, backing "
                          "off up to retry.max_backoff_s", e)
            for part in parts:
                self.spool.release(part)
        else:
            if self._unrecorded:
                log.info("spool records deliveries again: delivering")
                self._unrecorded = 0

    async def _after_unrecorded(self) -> None:
        """Claim nothing until the pause after an unrecorded delivery is over."""
        delay = self._resume_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _settle(self, part: list[StoredEvent]) -> list[list[StoredEvent]]:
        """Send until the part is delivered or dead-lettered; return halves to send instead."""
        key = f"{self.spool.spool_id}-{part[0].id}-{part[-1].id}-{len(part)}"
        try:
            while True:
                if self._stopping:  # what is left stays pending for the next start
                    self.spool.release(part)
                    return []
                part = await self._expire(part)
                if not part:
                    self._nothing_left_to_retry()
                    return []
                async with self.circuit.admit() as ticket:
                    await self._take_rate_token()
                    with self._on_its_way():
                        sent_with = self.client.api_key
                        outcome = await self._send(part, key)
                        decision = decide(
                            outcome, self.circuit.failures + 1, len(part), self.policy
                        )
                        if isinstance(decision, PauseAuth) and sent_with != self.client.api_key:
                            # The old key's answer: SIGHUP brought a new one meanwhile.
                            self._count_failure(outcome)
                            continue
                        done = await self._apply(decision, outcome, part, ticket)
                if isinstance(decision, Split):
                    mid = len(part) // 2
                    return [part[:mid], part[mid:]]
                if done:
                    return []
        except BaseException:
            self.spool.release(part)
            raise

    @contextlib.contextmanager
    def _on_its_way(self) -> Iterator[None]:
        task = asyncio.current_task()
        assert task is not None
        self._sending.add(task)
        try:
            yield
        finally:
            self._sending.discard(task)

    async def _send(self, part: Sequence[StoredEvent], key: str) -> Outcome:
        self.metrics.batch_size.observe(len(part))
        started = time.monotonic()
        outcome = await self.client.send(part, key)
        self.metrics.upstream_request_duration.observe(time.monotonic() - started)
        return outcome

    async def _take_rate_token(self) -> None:
        held = await self.bucket.take()
        if held:
            self.metrics.rate_limited_seconds.inc(held)

    async def _apply(
        self, decision: Decision, outcome: Outcome, part: list[StoredEvent], ticket: int
    ) -> bool:
        """Carry the decision out; True when the part needs no further sending. ``ticket``:
        the circuit's, of the request that had this outcome."""
        if isinstance(decision, Deliver):
            present = await self.spool.delete(part)
            # Only what was still in the file: an event drop_oldest evicted while it was
            # on its way was counted as dropped then.
            self._delivered([e for e in part if e.id in present], ticket)
            return True
        if isinstance(decision, Split):
            self._count_failure(outcome, retried=False)
            self._split_lines("upstream answered %s for %d events: splitting", outcome.status,
                              len(part), events=len(part))
            return False
        if isinstance(decision, DeadLetter):
            await self._dead_letter(part, decision.reason, outcome, ticket)
            return True
        self._count_failure(outcome)
        self.last_failure = described = _describe(outcome)
        delay = decision.delay_s
        if isinstance(decision, PauseAuth):
            self._auth_failed()
        else:
            assert isinstance(decision, Retry)
            if self.client.api_key != self._rejected_key:
                self._auth_accepted()  # a new key met an outage, not a rejection
        self.circuit.record_failure(delay)
        self._refresh_state(outcome)
        await self.spool.reschedule(part, time.time() + delay, outcome.status, described)
        return False

    def _count_failure(self, outcome: Outcome, retried: bool = True) -> None:
        """A failed request; ``retried``: its events are sent again as they were."""
        self.metrics.delivery_failures.labels(failure_reason(outcome)).inc()
        if retried:
            self.metrics.retries.inc()

    def _delivered(self, part: Sequence[StoredEvent], ticket: int) -> None:
        now = time.time()
        self.metrics.events_delivered.inc(len(part))
        for event in part:
            self.metrics.delivery_latency.observe(now - event.received_at)
        self._upstream_answered(ticket)

    def _upstream_answered(self, ticket: int) -> None:
        """A 2xx, or a verdict on the events: the upstream works and took the key."""
        self.circuit.record_success(ticket)
        self._auth_accepted()
        self.last_failure = None
        self._refresh_state()

    def _auth_accepted(self) -> None:
        if self.auth_rejected:
            self.auth_rejected = False
            self.metrics.upstream_auth_failed.set(0)

    async def _dead_letter(
        self, part: list[StoredEvent], reason: str, outcome: Outcome, ticket: int
    ) -> None:
        # Only what was still in the file: drop_oldest counted the rest as dropped.
        kept = await self.spool.dead_letter(part, reason, outcome.status, _describe(outcome))
        self.metrics.events_dead_lettered.labels(reason).inc(kept)
        if outcome.status is not None and outcome.status >= 400:
            self._count_failure(outcome, retried=False)
        self._dead_letter_lines(
            "dead-lettered %d events (%s, upstream %s): see `precogx-sidecar dead-letters list`",
            kept, reason, outcome.status, events=kept,
        )
        # A dead letter is a verdict on the events, not a sign the upstream is down.
        self._upstream_answered(ticket)

    async def _expire(self, part: list[StoredEvent]) -> list[StoredEvent]:
        cutoff = time.time() - self.config.retry.max_age_s
        expired = [e for e in part if e.received_at < cutoff]
        if not expired:
            return part
        kept = await self.spool.dead_letter(expired, "expired", None, "older than retry.max_age_s")
        self.metrics.events_dead_lettered.labels("expired").inc(kept)
        self._dead_letter_lines("dead-lettered %d events older than retry.max_age_s", kept,
                                events=kept)
        return [e for e in part if e.received_at >= cutoff]

    def _nothing_left_to_retry(self) -> None:
        """The hold was for events that expired instead. With nothing else claimed or
        waiting, no probe would ever go, and the state would say "failing" for good: it
        is left open until the next event shows how the upstream is."""
        if (self.circuit.is_open and self.spool.unclaimed <= 0
                and self._deliveries <= {asyncio.current_task()}):
            self.circuit.reset()
            log.info("every held event expired: nothing left to retry; the next event "
                     "shows how PrecogX is")
            self._refresh_state(announce=False)  # no "recovered": nothing says it did

    # -- state -----------------------------------------------------------------

    def _auth_failed(self) -> None:
        self._rejected_key = self.client.api_key
        if not self.auth_rejected:
            self.auth_rejected = True
            self.metrics.upstream_auth_failed.set(1)
        elif self._reloaded:
            # No change of state to log, but whoever sent SIGHUP must learn it did not help.
            log.error("PrecogX rejected the reloaded API key too (%s): forwarding stays paused",
                      self.last_failure)
        self._reloaded = False

    def _refresh_state(self, outcome: Outcome | None = None, announce: bool = True) -> None:
        if not self.client.api_key:
            state = "no_api_key"
        elif self.auth_rejected:
            state = "auth_rejected"
        elif self.circuit.is_open:
            state = "upstream_failing"
        else:
            state = "ok"
        self.metrics.circuit_open.set(1 if self.circuit.is_open else 0)
        if state != self.state:
            if announce:
                self._log_state_change(state, outcome)
            self.state = state

    def _log_state_change(self, state: str, outcome: Outcome | None) -> None:
        why = f" ({_describe(outcome)})" if outcome is not None else ""
        if state == "ok":
            recovered = self.state in ("upstream_failing", "auth_rejected")
            log.info("%sforwarding to %s", "upstream recovered; " if recovered else "",
                     self.config.upstream.url)
        elif state == "no_api_key":
            # Only without a key file (an empty one stops start-up), and a SIGHUP cannot
            # show this process a variable set later: a restart it is.
            log.warning(
                "no PrecogX API key: events are accepted and spooled; forwarding waits for "
                "a key (restart with PRECOGX_API_KEY set, or with upstream.api_key_file "
                "naming a file that holds it: SIGHUP reads that file again)"
            )
        elif state == "auth_rejected":
            log.error(
                "PrecogX rejected the API key%s: forwarding paused, probing every %ss; "
                "fix the key and send SIGHUP to resume at once",
                why, self.config.retry.max_backoff_s,
            )
        else:
            hint = ""
            if outcome is not None and outcome.status in WRONG_ENDPOINT:
                hint = " (a 404 or 405 for every request: check upstream.url)"
            log.warning("upstream failing%s: holding and retrying with backoff%s", why, hint)


def _describe(outcome: Outcome) -> str:
    """The outcome as kept with the events and logged: an upstream's error body may quote
    the API key it was sent, so known secrets are scrubbed from it, the encodings of
    characters undone first: JSON's ("px\\u005flive..."), a URL's ("px%5Flive") and
    HTML's ("px&#95;live", "px&lowbar;live": a proxy's page) quote it too."""
    if outcome.status is None:
        return scrub(f"{outcome.error}: {outcome.body}")
    body = scrub(_decoded(outcome.body))
    # On one line: the line breaks of a proxy's HTML page could forge log lines.
    return f"HTTP {outcome.status}: {body[:300].translate(_ESCAPED)}"


_JSON_OR_URL_ESCAPE = re.compile(r"\\u00([2-7][0-9a-fA-F])|\\(/)|%([2-7][0-9a-fA-F])")
# Encodings inside encodings ("%255F", "&#37;5F") are undone too, up to this depth.
_DECODE_PASSES = 3


def _decoded(text: str) -> str:
    for _ in range(_DECODE_PASSES):
        undone = html.unescape(_JSON_OR_URL_ESCAPE.sub(_ascii, text))
        if undone == text:
            break
        text = undone
    return text


def _ascii(m: re.Match[str]) -> str:
    json_hex, slash, url_hex = m.groups()
    return slash or chr(int(json_hex or url_hex, 16))


_ESCAPED = {c: f"\\x{c:02x}" for c in (*range(32), 127)} | {9: "\\t", 10: "\\n", 13: "\\r"}
