"""Forwarding against the fake PrecogX: batching, retries, splits, dead letters, auth."""

from __future__ import annotations

import asyncio
import copy
import gzip
import logging
import os
import signal
import sqlite3
from collections.abc import Coroutine
from typing import Any

import orjson
import pytest

from sidecar import logs
from sidecar.aio import wait_at_most
from sidecar.forwarder import forwarder as forwarder_module
from sidecar.spool import SpoolUnavailable, StoredEvent
from tests.conftest import EXAMPLE_EVENT, TEST_KEY, Sidecar, StartSidecar
from tests.fake_precogx import Delay, Drop, DropMidResponse, FakePrecogX, Hold, Respond

BATCH = "/api/v1/telemetry/batch"
SINGLE = "/api/v1/integrations/dify/telemetry"


async def post_events(sidecar: Sidecar, n: int, agent: str = "dify-test-app") -> list[int]:
    items = []
    for i in range(n):
        e = copy.deepcopy(EXAMPLE_EVENT)
        e["prompt"] = f"prompt {i}"
        e["agentId"] = agent
        items.append(e)
    status, body = await sidecar.post(BATCH, {"interactions": items})
    assert status == 202, body
    ids: list[int] = body["ids"]
    return ids


def received_ids(fake: FakePrecogX) -> list[int]:
    return [int(ref.rsplit("-", 1)[1]) for ref in fake.received_ids()]


async def drained(sidecar: Sidecar) -> None:
    spool = sidecar.server.spool
    await spool.wait_until(lambda: spool.counts.pending == 0)


def dead_letters(sidecar: Sidecar) -> list[tuple[Any, ...]]:
    with sqlite3.connect(sidecar.config.spool.path) as db:
        return db.execute(
            "SELECT id, dead_reason, last_status, last_error FROM events WHERE state = 'dead'"
        ).fetchall()


async def metric(sidecar: Sidecar, line_start: str) -> float:
    _, text = await sidecar.get("/metrics")
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in /metrics")


async def test_batches_carry_key_idempotency_and_event_ids(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar = await start_sidecar(upstream={"batch_max_events": 100})
    ids = await post_events(sidecar, 250)
    await fake.wait_for_received(250)
    await drained(sidecar)
    assert sorted(received_ids(fake)) == ids
    assert all(r.path == "/api/v1/telemetry/batch" for r in fake.requests)
    assert all(r.headers["x-api-key"] == TEST_KEY for r in fake.requests)
    sizes = [len(orjson.loads(r.body)["interactions"]) for r in fake.requests]
    assert max(sizes) <= 100 and sum(sizes) == 250
    keys = [r.headers["idempotency-key"] for r in fake.requests]
    assert len(set(keys)) == len(keys)
    assert await metric(sidecar, "precogx_sidecar_events_delivered_total") == 250
    with sqlite3.connect(sidecar.config.spool.path) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (0,)


async def test_batch_bytes_limit_closes_batches(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar = await start_sidecar(upstream={"batch_max_events": 100, "batch_max_bytes": 2048})
    await post_events(sidecar, 40)
    await fake.wait_for_received(40)
    assert all(len(r.body) <= 2048 + 64 for r in fake.requests)
    assert len(fake.requests) > 1


async def test_single_mode_posts_each_event_to_the_dify_path(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar = await start_sidecar(upstream={"mode": "single", "concurrency": 3})
    ids = await post_events(sidecar, 7)
    await fake.wait_for_received(7)
    assert sorted(received_ids(fake)) == ids
    assert {r.path for r in fake.requests} == {"/api/v1/integrations/dify/telemetry"}
    assert len(fake.requests) == 7


async def test_outage_then_recovery_delivers_everything(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    fake.default = Respond(503)
    sidecar = await start_sidecar()
    ids = await post_events(sidecar, 30)
    await fake.wait_for_requests(4)  # several backoff periods of failure
    status, ready = await sidecar.get("/readyz")
    assert (status, ready["status"]) == (503, "upstream_failing")
    assert await metric(sidecar, "precogx_sidecar_circuit_open") == 1
    fake.default = None
    await fake.wait_for_received(30)
    await drained(sidecar)
    assert sorted(set(received_ids(fake))) == ids
    assert dead_letters(sidecar) == []
    assert await metric(sidecar, 'precogx_sidecar_delivery_failures_total{reason="http_5xx"}') >= 4
    assert await metric(sidecar, "precogx_sidecar_circuit_open") == 0
    assert (await sidecar.get("/readyz"))[0] == 200


async def test_429_without_retry_after_backs_off_and_recovers(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    fake.script(Respond(429), Respond(429))
    sidecar = await start_sidecar()
    await post_events(sidecar, 3)
    await fake.wait_for_received(3)
    assert [r.status for r in fake.requests][:3] == [429, 429, 200]
    assert await metric(sidecar, 'precogx_sidecar_delivery_failures_total{reason="http_429"}') == 2


async def test_timeout_then_success(start_sidecar: StartSidecar, fake: FakePrecogX) -> None:
    fake.script(Delay(5))
    sidecar = await start_sidecar(upstream={"timeout_s": 0.3})
    ids = await post_events(sidecar, 2)
    await fake.wait_for_received(2)
    await drained(sidecar)
    assert set(received_ids(fake)) >= set(ids)
    assert await metric(sidecar, 'precogx_sidecar_delivery_failures_total{reason="timeout"}') >= 1


async def test_dropped_connections_are_retried(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    fake.script(Drop(), DropMidResponse())
    sidecar = await start_sidecar()
    ids = await post_events(sidecar, 4)
    await drained(sidecar)
    # The cut-off response had stored the batch upstream: at-least-once, so duplicates.
    assert set(received_ids(fake)) == set(ids)
    failures = 'precogx_sidecar_delivery_failures_total{reason="connection"}'
    assert await metric(sidecar, failures) == 2
    assert dead_letters(sidecar) == []


async def test_a_2xx_whose_answer_refuses_the_events_is_retried(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """A captive portal's page or an error envelope with 200 deleted the events from the
    spool as delivered, though nothing took them."""
    fake.script(
        Respond(200, body="<html><body>Sign in to continue</body></html>"),
        Respond(200, body={"error": {"code": "INTERNAL_ERROR", "message": "try later"}}),
        Respond(202, body={"status": "error", "accepted": 0}),
    )
    sidecar = await start_sidecar()
    ids = await post_events(sidecar, 3)
    await fake.wait_for_received(3)
    await drained(sidecar)
    assert sorted(set(received_ids(fake))) == ids
    assert [r.status for r in fake.requests] == [200, 200, 202, 200]
    failures = 'precogx_sidecar_delivery_failures_total{reason="http_other"}'
    assert await metric(sidecar, failures) == 3
    assert dead_letters(sidecar) == []


async def test_413_splits_until_batches_fit(start_sidecar: StartSidecar, fake: FakePrecogX) -> None:
    fake.max_batch_events = 7
    sidecar = await start_sidecar(upstream={"batch_max_events": 50})
    ids = await post_events(sidecar, 50)
    await fake.wait_for_received(50)
    await drained(sidecar)
    assert sorted(received_ids(fake)) == ids
    assert dead_letters(sidecar) == []
    too_large = [r.status for r in fake.requests].count(413)
    assert too_large > 0
    assert await metric(
        sidecar, 'precogx_sidecar_delivery_failures_total{reason="http_4xx"}') == too_large


async def test_single_event_too_large_is_dead_lettered(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    fake.max_body_bytes = 600
    sidecar = await start_sidecar(upstream={"batch_max_events": 10})
    small = await post_events(sidecar, 2)
    e = copy.deepcopy(EXAMPLE_EVENT)
    e["prompt"] = "x" * 1000
    _, body = await sidecar.post(SINGLE, e)
    await drained(sidecar)
    assert sorted(set(received_ids(fake))) == small
    dead = [(d[0], d[1], d[2]) for d in dead_letters(sidecar)]
    assert dead == [(body["ids"][0], "too_large", 413)]


async def test_invalid_event_in_batch_is_the_only_dead_letter(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    fake.reject_agent_ids = {"bad-agent"}
    sidecar = await start_sidecar(upstream={"batch_max_events": 20, "linger_ms": 200})
    good = await post_events(sidecar, 9)
    bad = await post_events(sidecar, 1, agent="bad-agent")
    more = await post_events(sidecar, 10)
    await drained(sidecar)
    assert sorted(set(received_ids(fake))) == sorted(good + more)
    dead = dead_letters(sidecar)
    assert [(d[0], d[1], d[2]) for d in dead] == [(bad[0], "rejected", 400)]
    assert "INVALID_FIELD_TYPE" in dead[0][3]
    dead_metric = 'precogx_sidecar_events_dead_lettered_total{reason="rejected"}'
    assert await metric(sidecar, dead_metric) == 1


async def test_other_4xx_is_dead_lettered_with_status_and_body(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    fake.script(Respond(409, body={"error": {"code": "CONFLICT", "message": "no such thing"}}))
    sidecar = await start_sidecar()
    ids = await post_events(sidecar, 3)
    await drained(sidecar)
    dead = dead_letters(sidecar)
    assert sorted(d[0] for d in dead) == ids
    assert {(d[1], d[2]) for d in dead} == {("client_error", 409)}
    assert "no such thing" in dead[0][3]


async def test_a_wrong_upstream_path_holds_the_backlog_instead_of_spending_it(
    start_sidecar: StartSidecar, fake: FakePrecogX, caplog: pytest.LogCaptureFixture
) -> None:
    """Every event gets a 404 from a wrong upstream.url path: they all became dead
    letters within a second, with /readyz saying ok."""
    fake.script(Respond(404, body="<html>\r\n<h1>Not Found</h1>\r\n</html>"))
    sidecar = await start_sidecar(retry={"initial_backoff_s": 0.05, "max_backoff_s": 0.1})
    ids = await post_events(sidecar, 3)
    await fake.wait_for_received(3)  # the 404 was retried, and the next answer taken
    await drained(sidecar)
    assert sorted(received_ids(fake)) == ids and dead_letters(sidecar) == []
    lines = [r.getMessage() for r in caplog.records if "upstream failing" in r.getMessage()]
    # The HTML page on one line (its line breaks could forge log lines), with a hint.
    assert len(lines) == 1 and "\n" not in lines[0] and "\\r\\n<h1>" in lines[0]
    assert "check upstream.url" in lines[0]


async def test_a_compressed_answer_is_never_inflated(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """A ~50 KB gzip answer inflating to 50 MB was inflated whole in memory (a few
    hundred KB can reach gigabytes): identity is asked for, and anything else is
    described, not read."""
    bomb = gzip.compress(b"0" * 50_000_000, compresslevel=9)
    fake.script(Respond(409, body=bomb, headers={"Content-Encoding": "gzip"}))
    sidecar = await start_sidecar()
    await post_events(sidecar, 1)
    await drained(sidecar)
    assert fake.requests[0].headers["accept-encoding"] == "identity"
    (dead,) = dead_letters(sidecar)
    assert dead[3] == f"HTTP 409: [{len(bomb)} bytes, Content-Encoding: gzip]"


async def test_the_proxy_environment_variables_are_honoured(
    start_sidecar: StartSidecar, fake: FakePrecogX, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY/HTTP_PROXY were ignored: behind an egress proxy nothing was sent."""
    monkeypatch.setenv("HTTP_PROXY", fake.url.split("/api/")[0])
    monkeypatch.delenv("NO_PROXY", raising=False)
    sidecar = await start_sidecar(upstream={"url": "http://precogx.invalid/api/v1"})
    ids = await post_events(sidecar, 2)
    await fake.wait_for_received(2)  # the fake answered as the proxy
    assert sorted(received_ids(fake)) == ids
    assert fake.requests[0].headers["host"] == "precogx.invalid"


def test_the_proxy_is_read_once_from_the_environment_and_no_proxy_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiohttp's trust_env would also send ~/.netrc credentials to PrecogX."""
    from sidecar.forwarder.client import _env_proxy

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert _env_proxy("https://api.precogx.ai/api/v1/x") == "http://proxy.corp:3128"
    assert _env_proxy("http://precogx-sidecar:8787/x") is None  # no HTTP_PROXY
    monkeypatch.setenv("NO_PROXY", ".precogx.ai")
    assert _env_proxy("https://api.precogx.ai/api/v1/x") is None
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTPS_PROXY", "socks5://proxy.corp:1080")  # aiohttp cannot
    assert _env_proxy("https://api.precogx.ai/api/v1/x") is None
    monkeypatch.setenv("HTTPS_PROXY", "me:pr0xy-passw0rd@proxy.corp:3128")
    assert _env_proxy("https://h/x") == "http://me:pr0xy-passw0rd@proxy.corp:3128"
    assert logs.scrub("InvalidURL: me:pr0xy-passw0rd@") == "InvalidURL: me:********@"
    for bad in ("http://[::1:3128", "http://proxy:abc"):  # was a start-up traceback
        monkeypatch.setenv("HTTPS_PROXY", bad)
        assert _env_proxy("https://h/x") is None


async def test_auth_rejected_pauses_then_sighup_with_new_key_resumes(
    start_sidecar: StartSidecar, fake: FakePrecogX, tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar")
    fake.api_keys = {"px_rotated_key"}
    sidecar = await start_sidecar(retry={"max_backoff_s": 3600.0})
    ids = await post_events(sidecar, 5)
    await fake.wait_for_requests(1)
    spool = sidecar.server.spool
    await spool.wait_until(lambda: sidecar.server.forwarder.auth_rejected)
    status, ready = await sidecar.get("/readyz")
    assert (status, ready["status"]) == (503, "auth_rejected")
    assert await metric(sidecar, "precogx_sidecar_upstream_auth_failed") == 1
    assert len(fake.requests) == 1  # the backlog is not spent on a bad key
    (tmp_path / "api-key").write_text("px_rotated_key\n")
    os.kill(os.getpid(), signal.SIGHUP)
    await fake.wait_for_received(5)
    await drained(sidecar)
    assert sorted(received_ids(fake)) == ids
    assert await metric(sidecar, "precogx_sidecar_upstream_auth_failed") == 0
    assert (await sidecar.get("/readyz"))[0] == 200
    assert dead_letters(sidecar) == []
    # One line per change, each true: no "upstream failing" between the new key and
    # the probe's answer (the upstream never failed).
    states = [r.getMessage().split(":")[0] for r in caplog.records
              if r.name == "sidecar.forwarder" and r.levelno >= logging.INFO]
    assert states[0] == "forwarding to http"  # at start-up, too
    assert states[1:] == [
        "PrecogX rejected the API key (HTTP 401", "upstream recovered; forwarding to http"]


async def test_a_reloaded_key_rejected_too_is_said_so(
    start_sidecar: StartSidecar, fake: FakePrecogX, tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only "SIGHUP: API key reloaded" was logged: the state did not change, so nothing
    told the operator the new key was refused as well."""
    fake.api_keys = {"px_rotated_key"}
    sidecar = await start_sidecar(retry={"max_backoff_s": 3600.0})
    await post_events(sidecar, 1)
    spool = sidecar.server.spool
    await spool.wait_until(lambda: sidecar.server.forwarder.auth_rejected)

    def told() -> bool:
        return any("rejected the reloaded API key too" in r.getMessage()
                   for r in caplog.records)

    assert not told()
    (tmp_path / "api-key").write_text("px_still_wrong\n")
    os.kill(os.getpid(), signal.SIGHUP)
    await spool.wait_until(told)  # the probe's 401 is recorded in the spool after it
    assert len(fake.requests) == 2
    assert (await sidecar.get("/readyz"))[1]["status"] == "auth_rejected"


async def test_readyz_names_the_failure_and_where_a_redirect_points(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """/readyz said "PrecogX is failing" for a 429 as for a 503, and a redirect (never
    followed: the key would go along) was logged without where it pointed."""
    fake.default = Respond(308, headers={"Location": "https://moved.example/api/v1/x"})
    sidecar = await start_sidecar(retry={"max_backoff_s": 3600.0})
    await post_events(sidecar, 1)
    spool = sidecar.server.spool
    await spool.wait_until(lambda: sidecar.server.forwarder.state == "upstream_failing")
    status, ready = await sidecar.get("/readyz")
    assert (status, ready["status"]) == (503, "upstream_failing")
    assert ready["last_failure"].startswith(
        "HTTP 308: Location: https://moved.example/api/v1/x")


async def test_an_upstream_answer_quoting_the_key_is_masked_on_readyz(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    fake.default = Respond(503, body=f"<h1>bad gateway for key {TEST_KEY}</h1>")
    sidecar = await start_sidecar(retry={"max_backoff_s": 3600.0})
    await post_events(sidecar, 1)
    spool = sidecar.server.spool
    await spool.wait_until(lambda: sidecar.server.forwarder.state == "upstream_failing")
    _, ready = await sidecar.get("/readyz")
    assert ready["last_failure"] == "HTTP 503: <h1>bad gateway for key ********</h1>"


async def test_a_removed_key_is_no_longer_reported_as_rejected(
    start_sidecar: StartSidecar, fake: FakePrecogX, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.api_keys = {"px_other_key"}
    monkeypatch.setenv("PRECOGX_API_KEY", TEST_KEY)
    sidecar = await start_sidecar(upstream={"api_key_file": ""})
    await post_events(sidecar, 1)
    spool = sidecar.server.spool
    await spool.wait_until(lambda: sidecar.server.forwarder.auth_rejected)
    monkeypatch.delenv("PRECOGX_API_KEY")
    sidecar.server.reload_api_key()
    assert (await sidecar.get("/readyz"))[1]["status"] == "no_api_key"
    assert await metric(sidecar, "precogx_sidecar_upstream_auth_failed") == 0


async def test_a_401_for_the_key_replaced_meanwhile_sends_again_with_the_new_one(
    start_sidecar: StartSidecar, fake: FakePrecogX, tmp_path: Any
) -> None:
    """The old key's 401 arrives after SIGHUP brought a good key: it used to pause the
    good key for retry.max_backoff_s."""
    fake.api_keys = {"px_rotated_key"}
    release = asyncio.Event()
    fake.script(Hold(release))
    sidecar = await start_sidecar(retry={"max_backoff_s": 3600.0})
    ids = await post_events(sidecar, 3)
    await fake.wait_for_requests(1)  # on its way with the old key
    (tmp_path / "api-key").write_text("px_rotated_key\n")
    sidecar.server.reload_api_key()  # what SIGHUP runs
    release.set()
    await asyncio.wait_for(drained(sidecar), 10)
    assert sorted(received_ids(fake)) == ids
    assert not sidecar.server.forwarder.auth_rejected
    # Still a failed request, counted as every other.
    assert await metric(
        sidecar, 'precogx_sidecar_delivery_failures_total{reason="http_4xx"}') == 1


async def test_sighup_probes_at_once_and_the_state_follows_the_new_answer(
    start_sidecar: StartSidecar, fake: FakePrecogX, tmp_path: Any
) -> None:
    """A new key is not a rejected one: if the probe then meets an outage, the state is
    upstream_failing, not auth_rejected."""
    fake.api_keys = {"px_rotated_key"}
    sidecar = await start_sidecar(retry={"max_backoff_s": 3600.0})
    await post_events(sidecar, 2)
    spool, forwarder = sidecar.server.spool, sidecar.server.forwarder
    await spool.wait_until(lambda: forwarder.auth_rejected)
    fake.default = Respond(503)
    (tmp_path / "api-key").write_text("px_rotated_key\n")
    sidecar.server.reload_api_key()
    await asyncio.wait_for(spool.wait_until(lambda: forwarder.state == "upstream_failing"), 10)
    assert await metric(sidecar, "precogx_sidecar_upstream_auth_failed") == 0
    assert len(fake.requests) == 2  # the probe went at once, not after an hour


async def test_a_dead_letter_does_not_lift_a_hold_another_request_was_asked_for(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """One request gets 429 Retry-After: an hour; a request sent before it then gets a
    verdict (400) on its event. That verdict used to close the circuit, and the next
    events went at once."""
    fake.reject_agent_ids = {"bad"}
    release = asyncio.Event()
    fake.script(Respond(429, headers={"Retry-After": "3600"}), Hold(release))
    sidecar = await start_sidecar(
        upstream={"mode": "single", "concurrency": 2, "linger_ms": 0},
        retry={"max_backoff_s": 3600.0},
    )
    status, _ = await sidecar.post(BATCH, {"interactions": [
        {**EXAMPLE_EVENT, "agentId": agent} for agent in ("good", "bad", "good", "good")]})
    assert status == 202
    spool, circuit = sidecar.server.spool, sidecar.server.forwarder.circuit
    await fake.wait_for_requests(2)
    await spool.wait_until(lambda: circuit.is_open)
    release.set()
    await spool.wait_until(lambda: spool.counts.dead == 1)
    assert circuit.is_open
    assert (await sidecar.get("/readyz"))[1]["status"] == "upstream_failing"


async def test_shutdown_does_not_wait_out_a_backoff(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """During an outage no request is on its way, only batches waiting out their hold:
    shutdown used to give them the whole grace period (docker stop's 10 s, here an hour)."""
    fake.default = Respond(503, headers={"Retry-After": "3600"})
    sidecar = await start_sidecar(server={"port": 0, "shutdown_grace_s": 3600.0},
                                  retry={"max_backoff_s": 3600.0})
    ids = await post_events(sidecar, 3)
    spool, circuit = sidecar.server.spool, sidecar.server.forwarder.circuit
    await spool.wait_until(lambda: circuit.is_open)
    await asyncio.wait_for(sidecar.stop(), 10)
    with sqlite3.connect(sidecar.config.spool.path) as db:
        pending = db.execute("SELECT id FROM events WHERE state = 'pending' ORDER BY id")
        assert [row[0] for row in pending] == ids


async def test_expired_events_are_dead_lettered_not_sent(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    fake.default = Respond(503)
    sidecar = await start_sidecar(retry={"max_age_s": 0.2})
    ids = await post_events(sidecar, 3)
    spool = sidecar.server.spool
    await spool.wait_until(lambda: spool.counts.dead == 3)
    assert sorted(d[0] for d in dead_letters(sidecar)) == ids
    assert {d[1] for d in dead_letters(sidecar)} == {"expired"}
    with sqlite3.connect(sidecar.config.spool.path) as db:  # expiring is no attempt
        attempts = {row[0] for row in db.execute("SELECT attempts FROM events")}
    assert attempts == {len(fake.requests)}


async def test_a_hold_whose_events_all_expired_does_not_say_failing_for_good(
    start_sidecar: StartSidecar, fake: FakePrecogX, caplog: pytest.LogCaptureFixture
) -> None:
    """With nothing left to send, no probe ever went: /readyz said upstream_failing (and
    circuit_open stayed 1) after PrecogX had recovered, until the next event."""
    fake.default = Respond(503)
    # No linger: the last event must be sent well within its max_age_s.
    sidecar = await start_sidecar(retry={"max_age_s": 0.5}, upstream={"linger_ms": 0})
    forwarder = sidecar.server.forwarder
    states: list[str] = []
    closed = asyncio.Event()
    log_change = forwarder._log_state_change

    def logged(state: str, outcome: Any) -> None:
        states.append(state)
        log_change(state, outcome)

    refresh = forwarder._refresh_state

    def refreshed(outcome: Any = None, announce: bool = True) -> None:
        refresh(outcome, announce)
        if forwarder.state == "ok" and "upstream_failing" in states:
            closed.set()

    forwarder._log_state_change = logged  # type: ignore[method-assign]
    forwarder._refresh_state = refreshed  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="sidecar")
    await post_events(sidecar, 3)
    await asyncio.wait_for(closed.wait(), 30)
    # Not "upstream recovered": PrecogX still fails, there is just nothing left to send.
    assert states == ["upstream_failing"]
    assert any("nothing left to retry" in r.getMessage() for r in caplog.records)
    assert sidecar.server.spool.counts.dead == 3
    status, ready = await sidecar.get("/readyz")
    assert (status, ready["status"]) == (200, "ok")
    _, metrics = await sidecar.get("/metrics")
    assert "precogx_sidecar_circuit_open 0.0" in metrics
    fake.default = None  # the fake's own processing again: PrecogX recovered
    ids = await post_events(sidecar, 1)
    await fake.wait_for_received(1)  # sent at once: no hold left over
    assert received_ids(fake) == ids


async def test_backlog_is_kept_across_restart(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    first = await start_sidecar(upstream={"api_key_file": ""})
    ids = await post_events(first, 12)
    await first.stop()
    second = await start_sidecar()
    await fake.wait_for_received(12)
    await drained(second)
    assert sorted(received_ids(fake)) == ids


async def test_retry_after_sets_the_next_attempt(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    fake.script(Respond(429, headers={"Retry-After": "2"}))
    sidecar = await start_sidecar(retry={"initial_backoff_s": 0.01, "max_backoff_s": 5.0})
    ids = await post_events(sidecar, 2)
    spool = sidecar.server.spool
    db = sqlite3.connect(sidecar.config.spool.path)
    scheduled: list[float] = []

    def rescheduled() -> bool:
        rows = db.execute("SELECT next_attempt_at FROM events WHERE attempts = 1").fetchall()
        scheduled.extend(r[0] for r in rows)
        return bool(rows)

    await spool.wait_until(rescheduled)
    db.close()
    answered = fake.requests[0].answered_at
    assert fake.requests[0].status == 429 and answered is not None
    # The computed delay, not a measured one: backoff alone would be 0.01 s.
    assert min(scheduled) - answered >= 2.0
    await fake.wait_for_received(2)
    assert [r.status for r in fake.requests] == [429, 200]
    assert sorted(received_ids(fake)) == ids


async def test_retries_carry_the_same_idempotency_key(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    fake.script(Respond(503), Respond(502), Drop())
    sidecar = await start_sidecar(upstream={"batch_max_events": 10})
    await post_events(sidecar, 5)
    await fake.wait_for_received(5)
    keys = {r.headers["idempotency-key"] for r in fake.requests}
    assert len(fake.requests) == 4 and len(keys) == 1
    assert keys.pop().startswith(sidecar.server.spool.spool_id + "-")


async def test_flapping_upstream_delivers_everything_once_acknowledged(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    fake.script(*[Respond(503) if i % 2 == 0 else Delay(0) for i in range(40)])
    sidecar = await start_sidecar(upstream={"batch_max_events": 5, "concurrency": 3})
    ids = []
    for _ in range(8):
        ids += await post_events(sidecar, 5)
    await drained(sidecar)
    assert set(received_ids(fake)) == set(ids)
    assert dead_letters(sidecar) == []
    assert 503 in [r.status for r in fake.requests]


async def test_circuit_lets_one_probe_through_during_an_outage(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    fake.default = Respond(503, after=0.02)  # slow enough for requests to overlap
    sidecar = await start_sidecar(
        upstream={"batch_max_events": 2, "concurrency": 4},
        retry={"initial_backoff_s": 0.01, "max_backoff_s": 0.01},
    )
    client = sidecar.server.client
    send = client.send
    in_flight = [0, 0]  # now, most since the circuit opened for everyone

    async def counting_send(*args: Any) -> Any:
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            return await send(*args)
        finally:
            in_flight[0] -= 1

    client.send = counting_send  # type: ignore[method-assign,assignment]
    await post_events(sidecar, 8)  # four batches for four slots
    circuit = sidecar.server.forwarder.circuit
    spool = sidecar.server.spool
    # Once every batch has failed once, the one circuit holds all four.
    await spool.wait_until(lambda: circuit.failures >= 4)
    in_flight[1] = in_flight[0]
    seen = len(fake.requests)
    await fake.wait_for_requests(seen + 8)
    assert in_flight[1] <= 1
    fake.default = None
    await fake.wait_for_received(8)


async def test_rate_limit_drains_a_backlog_in_full_batches(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    first = await start_sidecar(upstream={"api_key_file": ""})
    ids = await post_events(first, 50)
    await first.stop()
    sidecar = await start_sidecar(
        upstream={"batch_max_events": 10, "requests_per_minute": 1200.0, "burst": 1}
    )
    await fake.wait_for_received(50)
    await drained(sidecar)
    assert sorted(received_ids(fake)) == ids
    sizes = [len(orjson.loads(r.body)["interactions"]) for r in fake.requests]
    assert sizes == [10] * 5
    assert await metric(sidecar, "precogx_sidecar_rate_limited_seconds_total") > 0


async def test_a_delivery_the_spool_could_not_record_goes_again_after_the_pause(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """The batch is released, and the forwarder, waiting for new data with a free slot,
    used to wait for the next event to arrive: without one, the backlog sat forever."""
    sidecar = await start_sidecar(retry={"initial_backoff_s": 0.01, "max_backoff_s": 0.01},
                                  upstream={"linger_ms": 0})
    spool = sidecar.server.spool
    delete = spool.delete
    failures: list[None] = []

    async def once_unrecordable(events: Any) -> set[int]:
        if not failures:
            failures.append(None)
            raise SpoolUnavailable("disk full")
        return await delete(events)

    spool.delete = once_unrecordable  # type: ignore[method-assign]
    ids = await post_events(sidecar, 3)
    await asyncio.wait_for(drained(sidecar), 30)  # and no new event meanwhile
    assert sorted(received_ids(fake)) == sorted(ids * 2)  # sent again, as promised


async def test_a_spool_read_that_fails_does_not_end_delivery(
    start_sidecar: StartSidecar, fake: FakePrecogX, caplog: pytest.LogCaptureFixture
) -> None:
    """An I/O error (or a lock held past busy_timeout) while claiming ended the
    forwarder's loop: nothing more was delivered until a restart, and /readyz said ok."""
    sidecar = await start_sidecar(retry={"initial_backoff_s": 0.01, "max_backoff_s": 0.01},
                                  upstream={"linger_ms": 0})
    spool = sidecar.server.spool
    claim = spool.claim
    failures: list[None] = []

    async def fails_once(max_events: int, max_bytes: int) -> list[StoredEvent]:
        if not failures:
            failures.append(None)
            raise sqlite3.OperationalError("disk I/O error")
        return await claim(max_events, max_bytes)

    spool.claim = fails_once  # type: ignore[method-assign]
    ids = await post_events(sidecar, 3)
    await asyncio.wait_for(drained(sidecar), 30)
    assert sorted(received_ids(fake)) == ids
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "forwarder cannot read the spool (disk I/O error): trying again with backoff"]


async def test_deliveries_the_spool_cannot_record_pause_the_forwarder(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """Disk full, or the spool file gone: a 2xx that cannot be recorded leaves the batch
    pending. Claimed again at once it went upstream in a tight loop (hundreds of times
    per event); now the forwarder backs off (here an hour) before it claims again."""
    sidecar = await start_sidecar(retry={"initial_backoff_s": 3600, "max_backoff_s": 3600},
                                  upstream={"linger_ms": 0})
    spool = sidecar.server.spool

    async def unrecordable(events: Any) -> set[int]:
        raise SpoolUnavailable("disk full")

    spool.delete = unrecordable  # type: ignore[method-assign]
    await post_events(sidecar, 3)
    await fake.wait_for_received(3)
    # Ingest goes on: each commit wakes the forwarder, which without the pause claimed
    # the released batch again right away.
    for _ in range(20):
        await post_events(sidecar, 1)
    await sidecar.stop()  # in-flight requests finish; nothing new is claimed meanwhile
    assert len(fake.requests) == 1
    with sqlite3.connect(sidecar.config.spool.path) as db:
        assert db.execute("SELECT count(*) FROM events WHERE state = 'pending'").fetchone() == (23,)


async def test_shutdown_ends_the_forwarder_even_as_events_arrive(
    start_sidecar: StartSidecar, fake: FakePrecogX, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's asyncio.wait_for swallows a cancellation that comes as the awaited
    event is set: the forwarder, lingering for a batch to fill while events kept
    arriving, went on lingering after stop() cancelled it, and a SIGTERM under load hung
    the sidecar for good."""
    sidecar = await start_sidecar(upstream={"linger_ms": 60_000})
    spool, forwarder = sidecar.server.spool, sidecar.server.forwarder
    lingering = asyncio.Event()

    def watched(event: asyncio.Event, seconds: float) -> Coroutine[Any, Any, bool]:
        if event is spool.data_ready:
            lingering.set()
        return wait_at_most(event, seconds)

    monkeypatch.setattr(forwarder_module, "wait_at_most", watched)
    await post_events(sidecar, 1)
    await lingering.wait()  # for more events to fill the batch
    spool.data_ready.set()  # an event arrives; in the same turn of the loop, SIGTERM
    stopping = asyncio.create_task(forwarder.stop(1.0))
    done, _ = await asyncio.wait({stopping}, timeout=30)  # bounds the hang
    assert stopping in done, "the forwarder outlived its stop()"
    assert fake.received == []  # never sent: it stays in the spool for the next start
    assert spool.counts.pending == 1
