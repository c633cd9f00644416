"""The Prometheus metrics. Their names are a contract: dashboards and alerts use them."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from sidecar import __version__

# From one fast local round trip to an hour of retries: delivery latency includes outages.
DELIVERY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600,
)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)

# The *_created series double the page and no dashboard or alert uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

FAILURE_REASONS = ("timeout", "connection", "http_4xx", "http_429", "http_5xx", "http_other")
# Every label value each counter can take, exported at 0 from the start: an alert on
# increase() sees the first event of a series that already exists, not one that appears.
REJECT_REASONS = (
    "invalid_json", "invalid_body", "invalid_event", "unsupported_media_type", "too_large",
    "unauthorized", "invalid_idempotency_key", "idempotency_key_reused", "spool_full",
    "spool_error", "shutting_down", "malformed_request", "internal_error",
)
DEAD_LETTER_REASONS = ("too_large", "rejected", "client_error", "expired")
DROP_REASONS = (
    "spool_full", "dead_letter_pruned", "dify_pairing_full", "dify_spool_refused",
    "dify_shutting_down", "dify_too_large",
)


class Tally:
    """One series of a counter, counted as a plain int until the next scrape.

    ``Counter.inc`` takes a lock, about 0.6 us; the receive path counts every accepted
    request and every redaction of every event, so it adds to ``count`` instead, and
    ``Metrics.render`` moves the total into the counter. Counted and flushed on the event
    loop's thread only.
    """

    __slots__ = ("_series", "count")

    def __init__(self, series: Any) -> None:
        self._series = series
        self.count = 0

    def flush(self) -> None:
        if self.count:
            self._series.inc(self.count)
            self.count = 0


class Metrics:
    """One registry per sidecar, so tests can run several in one process."""

    def __init__(self) -> None:
        self._tallies: list[Tally] = []
        self.registry = r = CollectorRegistry()
        p = "precogx_sidecar_"
        self.events_received = Counter(
            p + "events_received", "Events accepted and committed to the spool.",
            ["endpoint"], registry=r,
        )
        self.events_rejected = Counter(
            p + "events_rejected", "Requests refused at ingest, by reason.", ["reason"], registry=r
        )
        self.events_delivered = Counter(
            p + "events_delivered", "Events the upstream acknowledged with 2xx.", registry=r
        )
        self.delivery_failures = Counter(
            p + "delivery_failures", "Failed upstream requests, by reason.", ["reason"], registry=r
        )
        self.delivery_latency = Histogram(
            p + "delivery_latency_seconds", "From receipt to upstream 2xx.",
            buckets=DELIVERY_BUCKETS, registry=r,
        )
        self.upstream_request_duration = Histogram(
            p + "upstream_request_duration_seconds", "Duration of one upstream request.",
            buckets=REQUEST_BUCKETS, registry=r,
        )
        self.spool_events = Gauge(
            p + "spool_events", "Events in the spool, by state.", ["state"], registry=r
        )
        self.spool_bytes = Gauge(p + "spool_bytes", "Payload bytes in the spool.", registry=r)
        self.spool_file_bytes = Gauge(
            p + "spool_file_bytes",
            "Size of the spool file with its -wal and -shm: payloads, SQLite's pages, free "
            "pages not yet given back, the WAL.", registry=r,
        )
        # Exported so an alert can say "90 % full" without knowing the configuration.
        self.spool_capacity_events = Gauge(
            p + "spool_capacity_events", "spool.max_events: events the spool may hold.",
            registry=r,
        )
        self.spool_capacity_bytes = Gauge(
            p + "spool_capacity_bytes", "spool.max_bytes: payload bytes the spool may hold.",
            registry=r,
        )
        self.oldest_pending_age = Gauge(
            p + "oldest_pending_age_seconds", "Age of the oldest undelivered event.", registry=r
        )
        self.events_dropped = Counter(
            p + "events_dropped", "Events removed without delivery, by reason.", ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            p + "batch_size_events", "Events per upstream request.", buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.retries = Counter(p + "retries", "Upstream requests scheduled again.", registry=r)
        self.redactions = Counter(
            p + "redactions", "Values redacted before spooling, by rule and action.",
            ["rule", "action"], registry=r,
        )
        self.events_dead_lettered = Counter(
            p + "events_dead_lettered", "Events moved to the dead letters, by reason.",
            ["reason"], registry=r,
        )
        self.circuit_open = Gauge(
            p + "circuit_open", "1 while forwarding is held after upstream failures.", registry=r
        )
        self.upstream_auth_failed = Gauge(
            p + "upstream_auth_failed", "1 while PrecogX rejects the API key.", registry=r
        )
        self.rate_limited_seconds = Counter(
            p + "rate_limited_seconds", "Time requests waited for the client-side rate limit.",
            registry=r,
        )
        self.state = Gauge(
            p + "state", "1 for the state GET /readyz names (ok, no_api_key, ...), else 0.",
            ["state"], registry=r,
        )
        self.build_info = Gauge(
            p + "build_info", "Always 1; the version is in the label.", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)
        # Restarts, memory and file descriptors (process_*), as every exporter has them.
        ProcessCollector(registry=r)
        # Pre-create the label sets that alerts rely on, so a quiet sidecar shows zeros
        # rather than absent series.
        for reason in FAILURE_REASONS:
            self.delivery_failures.labels(reason)
        for reason in REJECT_REASONS:
            self.events_rejected.labels(reason)
        for reason in DEAD_LETTER_REASONS:
            self.events_dead_lettered.labels(reason)
        for state in ("pending", "inflight", "dead"):
            self.spool_events.labels(state)
        for reason in DROP_REASONS:
            self.events_dropped.labels(reason)

    def tally(self, series: Any) -> Tally:
        """A Tally of ``series`` (a counter, or one of its label sets), flushed by render."""
        tally = Tally(series)
        self._tallies.append(tally)
        return tally

    def render(self) -> bytes:
        for tally in self._tallies:
            tally.flush()
        return generate_latest(self.registry)
