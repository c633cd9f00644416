"""Dify's API-based Extension, with requests shaped exactly as Dify sends them."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from typing import Any

import orjson
import pytest

from sidecar.config import DifyConfig
from sidecar.receivers.dify_extension import Pairing
from sidecar.redaction.stage import RedactionStage
from tests.conftest import EXAMPLE_EVENT, Sidecar, StartSidecar
from tests.fake_precogx import FakePrecogX, Hold, Respond

KEY = "dify-ext-key-123"
PATH = "/dify/extension"
# Dify's APIBasedExtensionRequestor: Bearer key, JSON body {"point", "params"}.
DIFY_HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


async def call(sidecar: Sidecar, point: str, params: dict[str, Any],
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return await sidecar.post(
        PATH, data=orjson.dumps({"point": point, "params": params}),
        headers=DIFY_HEADERS if headers is None else headers,
    )


@pytest.fixture
async def sidecar(start_sidecar: StartSidecar) -> Sidecar:
    return await start_sidecar(dify={"extension_token": KEY, "pair_idle_s": 0.05,
                                     "input_wait_s": 0.2})


def test_an_app_is_forgotten_once_nothing_of_it_is_open() -> None:
    """A soak with ever-new app ids grew memory by about 1 KiB per id, and each call and
    sweep walked every app ever seen: their emptied queues were never dropped."""
    pairing = Pairing(DifyConfig(pair_idle_s=1.0, input_wait_s=1.0))
    for i in range(100):
        pairing.add_input(f"answered-{i}", "question", {})
        pairing.add_output(f"answered-{i}", "an answer")
        pairing.add_input(f"lone-{i}", "question", {})  # never answered
        pairing.add_output(f"orphan-{i}", "no input")
        pairing.add_input(f"empty-{i}", "question", {})
        pairing.add_output(f"empty-{i}", "")  # done at once
    assert "answered-0" not in pairing.waiting and "empty-0" not in pairing.waiting
    done = pairing.finished(now=time.monotonic() + 10)
    assert len(done) == 300 + 100  # the empty answers too, recorded as they came
    assert (pairing.open, pairing.waiting, pairing.streaming) == (0, {}, {})


async def test_ping_on_save(sidecar: Sidecar) -> None:
    assert await call(sidecar, "ping", {}) == (200, {"result": "pong"})


async def test_wrong_or_missing_key_is_refused(sidecar: Sidecar) -> None:
    for headers in ({"Content-Type": "application/json"},
                    {**DIFY_HEADERS, "Authorization": "Bearer nope"}):
        status, body = await call(sidecar, "ping", {}, headers)
        assert status == 401
        assert KEY not in str(body)


async def test_off_without_a_token(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar()
    status, body = await call(sidecar, "ping", {})
    assert status == 404 and "dify.extension_token" in body["error"]


async def test_input_and_streamed_output_become_one_interaction(
    sidecar: Sidecar, fake: FakePrecogX
) -> None:
    status, answer = await call(sidecar, "app.moderation.input", {
        "app_id": "app-1", "inputs": {"lang": "en"}, "query": "What is our refund policy?"})
    assert status == 200
    assert answer["flagged"] is False
    assert (answer["query"], answer["inputs"]) == ("What is our refund policy?", {"lang": "en"})
    text = "Refunds are accepted within 30 days. " * 30
    for end in (300, 600, 900, len(text)):  # Dify: every 300 characters, then the whole
        status, answer = await call(sidecar, "app.moderation.output",
                                    {"app_id": "app-1", "text": text[:end]})
        assert (status, answer["flagged"], answer["text"]) == (200, False, text[:end])
    await fake.wait_for_received(1)
    got = fake.received[0]
    assert got["agentId"] == "dify-app-1"
    assert got["prompt"] == "What is our refund policy?"
    assert got["response"] == text
    assert got["metadata"]["inputs"] == {"lang": "en"}
    assert got["metadata"]["source"] == "api_extension"


async def test_streams_of_two_apps_do_not_mix(sidecar: Sidecar, fake: FakePrecogX) -> None:
    await call(sidecar, "app.moderation.input", {"app_id": "a", "inputs": {}, "query": "qa"})
    await call(sidecar, "app.moderation.input", {"app_id": "b", "inputs": {}, "query": "qb"})
    for chunk in ("A1", "A1A2", "A1A2A3"):
        await call(sidecar, "app.moderation.output", {"app_id": "a", "text": chunk})
        await call(sidecar, "app.moderation.output", {"app_id": "b", "text": chunk.lower()})
    await fake.wait_for_received(2)
    pairs = {(r["prompt"], r["response"]) for r in fake.received}
    assert pairs == {("qa", "A1A2A3"), ("qb", "a1a2a3")}


async def test_two_answers_in_one_app_pair_in_order(sidecar: Sidecar, fake: FakePrecogX) -> None:
    await call(sidecar, "app.moderation.input", {"app_id": "a", "inputs": {}, "query": "first"})
    await call(sidecar, "app.moderation.input", {"app_id": "a", "inputs": {}, "query": "second"})
    await call(sidecar, "app.moderation.output", {"app_id": "a", "text": "one"})
    await call(sidecar, "app.moderation.output", {"app_id": "a", "text": "two"})
    await call(sidecar, "app.moderation.output", {"app_id": "a", "text": "one more"})
    await fake.wait_for_received(2)
    pairs = {(r["prompt"], r["response"]) for r in fake.received}
    assert pairs == {("first", "one more"), ("second", "two")}


async def test_an_empty_answer_takes_no_later_answers(
    sidecar: Sidecar, fake: FakePrecogX
) -> None:
    """Every text starts with "": an empty answer held as a stream took the next chat's
    answer, and every pairing after it was shifted by one."""
    for query, answer in (("q1", ""), ("q2", "Answer to q2"), ("q3", "Answer to q3")):
        await call(sidecar, "app.moderation.input", {"app_id": "a", "inputs": {}, "query": query})
        await call(sidecar, "app.moderation.output", {"app_id": "a", "text": answer})
    await fake.wait_for_received(3)
    pairs = {(r["prompt"], r["response"]) for r in fake.received}
    assert pairs == {("q1", ""), ("q2", "Answer to q2"), ("q3", "Answer to q3")}


async def test_input_without_output_is_recorded_alone(
    sidecar: Sidecar, fake: FakePrecogX
) -> None:
    await call(sidecar, "app.moderation.input",
               {"app_id": "c", "inputs": {"text": "summarise this"}, "query": ""})
    await fake.wait_for_received(1)
    assert fake.received[0]["prompt"] == {"text": "summarise this"}
    assert fake.received[0]["response"] == ""


async def test_without_a_query_the_inputs_meet_the_rules_on_both_names(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """Rules name the inputs `metadata.inputs`; stored without a query they are the
    prompt, and the rules on `prompt` apply to them as well. Each hit counts once."""
    sidecar = await start_sidecar(
        dify={"extension_token": KEY, "pair_idle_s": 0.05, "input_wait_s": 0.2},
        redaction={"rules": [
            {"name": "ssn", "path": "metadata.inputs.ssn", "action": "mask"},
            {"name": "mail", "path": "prompt", "detectors": ["email"], "action": "mask"},
            {"name": "drop", "path": "metadata.inputs.note", "action": "remove"},
        ]},
    )
    await call(sidecar, "app.moderation.input", {"app_id": "c", "query": "", "inputs": {
        "ssn": "078-05-1120", "to": "jane@example.com", "note": "private", "n": 3}})
    await fake.wait_for_received(1)
    got = fake.received[0]
    assert got["prompt"] == {"ssn": "[REDACTED:ssn]", "to": "[REDACTED:email]", "n": 3}
    assert "inputs" not in got["metadata"]
    _, metrics = await sidecar.get("/metrics")
    for rule, action in (("ssn", "mask"), ("mail", "mask"), ("drop", "remove")):
        line = f'precogx_sidecar_redactions_total{{action="{action}",rule="{rule}"}} 1.0'
        assert line in metrics


async def test_without_a_query_each_rule_counts_once(
    start_sidecar: StartSidecar, fake: FakePrecogX, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRECOGX_SIDECAR_REDACTION_HMAC_KEY", "dify-hmac-key-0123456789")
    sidecar = await start_sidecar(
        dify={"extension_token": KEY, "pair_idle_s": 0.05, "input_wait_s": 0.2},
        redaction={"rules": [{"name": "user", "path": "prompt", "action": "hash"},
                             {"name": "agent", "path": "agentId", "action": "hash"},
                             {"name": "meta", "path": "metadata", "action": "remove"}]},
    )
    await call(sidecar, "app.moderation.input", {"app_id": "c", "query": "", "inputs": {"a": 1}})
    await fake.wait_for_received(1)
    assert fake.received[0]["prompt"].startswith("hmac:")
    _, metrics = await sidecar.get("/metrics")
    for rule, action in (("user", "hash"), ("agent", "hash"), ("meta", "remove")):
        line = f'precogx_sidecar_redactions_total{{action="{action}",rule="{rule}"}} 1.0'
        assert line in metrics


class HeldRedaction:
    """Holds the sidecar's redaction of conversations with ``marker`` in their query, in
    whatever thread it runs, until ``release``; on the event loop nothing could release
    it, and the hold would time out."""

    def __init__(self, sidecar: Sidecar, marker: str) -> None:
        self.stage = sidecar.server.dify.redact
        self.marker = marker
        self.started, self.release = threading.Event(), threading.Event()
        self.released: list[bool] = []
        self.stage.apply = self.held  # type: ignore[method-assign]

    def held(self, event: dict[str, Any], possible_secrets: Any = None) -> Any:
        if self.marker in str(event.get("prompt")):
            self.started.set()
            self.released.append(self.release.wait(timeout=10))
        return RedactionStage.apply(self.stage, event, possible_secrets)

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 10)


async def test_recording_a_conversation_leaves_the_loop_free(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """A pasted document can take the detectors a while: conversations are redacted in a
    worker thread, and Dify's calls are answered meanwhile."""
    sidecar = await start_sidecar(
        dify={"extension_token": KEY, "pair_idle_s": 0.05, "input_wait_s": 0.2},
        redaction={"rules": [{"name": "mail", "detectors": ["email"], "action": "mask"}]},
    )
    hold = HeldRedaction(sidecar, "held")
    await call(sidecar, "app.moderation.input",
               {"app_id": "a", "query": "held: mail jane@example.com", "inputs": {}})
    await hold.wait_started()
    try:
        assert await call(sidecar, "ping", {}) == (200, {"result": "pong"})
    finally:
        hold.release.set()
    await fake.wait_for_received(1)
    assert hold.released == [True]
    assert fake.received[0]["prompt"] == "held: mail [REDACTED:email]"


async def test_stopping_while_a_conversation_is_recorded_loses_nothing(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar = await start_sidecar(
        dify={"extension_token": KEY, "pair_idle_s": 0.05, "input_wait_s": 0.2})
    hold = HeldRedaction(sidecar, "held")
    await call(sidecar, "app.moderation.input", {"app_id": "a", "query": "held", "inputs": {}})
    await hold.wait_started()
    # Still open when the sidecar stops: recorded as it stands.
    await call(sidecar, "app.moderation.input", {"app_id": "b", "query": "open", "inputs": {}})
    extension = sidecar.server.dify
    stop, stop_called = extension.stop, asyncio.Event()

    async def stop_seen() -> None:
        stop_called.set()
        await stop()  # runs on up to its first wait before the test goes on

    extension.stop = stop_seen  # type: ignore[method-assign]
    stopping = asyncio.create_task(sidecar.stop())
    await stop_called.wait()
    hold.release.set()
    await stopping
    with sqlite3.connect(sidecar.config.spool.path) as db:
        prompts = {orjson.loads(p)["prompt"] for (p,) in db.execute("SELECT payload FROM events")}
    assert prompts == {"held", "open"}


async def test_external_data_tool_answers_empty(sidecar: Sidecar) -> None:
    params = {"app_id": "a", "tool_variable": "weather", "inputs": {}, "query": "q"}
    assert await call(sidecar, "app.external_data_tool.query", params) == (200, {"result": ""})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not valid JSON"),
        (b'{"params": {}}', '{"point"'),
        (b'{"point": "app.nope", "params": {}}', "unknown point"),
        (b'{"point": "app.moderation.input", "params": {"query": "q"}}', "params.app_id"),
        (b'{"point": "app.moderation.output", "params": {"app_id": "a", "text": 5}}',
         "params.text must be a string"),
        (b'{"point": "app.moderation.input", "params": {"app_id": "a", "inputs": []}}',
         "params.inputs must be an object"),
    ],
)
async def test_malformed_calls_get_400(sidecar: Sidecar, body: bytes, message: str) -> None:
    status, answer = await sidecar.post(PATH, data=body, headers=DIFY_HEADERS)
    assert status == 400
    assert message in answer["error"]


async def test_a_call_cut_off_mid_body_is_counted_not_logged_as_an_error(
    sidecar: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    counter = sidecar.server.metrics.events_rejected
    refused = asyncio.Event()

    class Refusals:  # the counter, telling the test when the handler refused
        def labels(self, reason: str) -> Any:
            refused.set()
            return counter.labels(reason)

    sidecar.server.metrics.events_rejected = Refusals()  # type: ignore[assignment]
    await sidecar.post_cut_off(PATH, f"Authorization: Bearer {KEY}\r\n".encode(), b'{"point"')
    await asyncio.wait_for(refused.wait(), 30)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_rejected_total{reason="invalid_body"} 1.0' in metrics


async def test_answers_while_upstream_is_down(sidecar: Sidecar, fake: FakePrecogX) -> None:
    fake.default = Respond(503)
    status, answer = await call(sidecar, "app.moderation.input",
                                {"app_id": "a", "inputs": {}, "query": "q"})
    assert (status, answer["flagged"]) == (200, False)


async def test_shutdown_records_open_conversations(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar(
        dify={"extension_token": KEY, "pair_idle_s": 3600.0, "input_wait_s": 3600.0},
        upstream={"api_key_file": ""},
    )
    await call(sidecar, "app.moderation.input", {"app_id": "a", "inputs": {}, "query": "q1"})
    await call(sidecar, "app.moderation.output", {"app_id": "a", "text": "partial ans"})
    await call(sidecar, "app.moderation.input", {"app_id": "a", "inputs": {}, "query": "q2"})
    await sidecar.stop()
    with sqlite3.connect(sidecar.config.spool.path) as db:
        stored = [orjson.loads(r[0]) for r in db.execute("SELECT payload FROM events")]
    assert sorted((e["prompt"], e["response"]) for e in stored) == [
        ("q1", "partial ans"), ("q2", "")
    ]


async def test_two_chats_with_the_same_answer_are_two_interactions(
    start_sidecar: StartSidecar,
) -> None:
    """The second chat's identical answer "continued" the first one's stream: its input
    waited unanswered, and every later pairing of the app was shifted by one."""
    sidecar = await start_sidecar(
        dify={"extension_token": KEY, "pair_idle_s": 3600.0, "input_wait_s": 3600.0},
        upstream={"api_key_file": ""},
    )
    for query in ("hello there", "hi again"):
        await call(sidecar, "app.moderation.input", {"app_id": "a", "inputs": {}, "query": query})
        await call(sidecar, "app.moderation.output", {"app_id": "a", "text": "Hello! How can"})
        await call(sidecar, "app.moderation.output", {"app_id": "a", "text": "Hello! How can"})
    await sidecar.stop()
    with sqlite3.connect(sidecar.config.spool.path) as db:
        stored = [orjson.loads(r[0]) for r in db.execute("SELECT payload FROM events")]
    assert sorted((e["prompt"], e["response"]) for e in stored) == [
        ("hello there", "Hello! How can"), ("hi again", "Hello! How can")]


@pytest.mark.parametrize("chunks", [["x" * 300, "x" * 300 + "y" * 150], ["x" * 300 + "y" * 150]])
async def test_a_long_answer_re_sent_at_its_end_stays_its_chats(
    start_sidecar: StartSidecar, chunks: list[str]
) -> None:
    """Dify sends a long answer's last text again at its end (a 450-character one may
    come whole in one call, then again): a chat that began meanwhile must not take that
    re-send for its own answer."""
    sidecar = await start_sidecar(
        dify={"extension_token": KEY, "pair_idle_s": 3600.0, "input_wait_s": 3600.0},
        upstream={"api_key_file": ""},
    )
    long_2 = chunks[-1]
    await call(sidecar, "app.moderation.input", {"app_id": "a", "inputs": {}, "query": "q1"})
    for text in chunks:
        await call(sidecar, "app.moderation.output", {"app_id": "a", "text": text})
    await call(sidecar, "app.moderation.input", {"app_id": "a", "inputs": {}, "query": "q2"})
    await call(sidecar, "app.moderation.output", {"app_id": "a", "text": long_2})  # its end
    await call(sidecar, "app.moderation.output", {"app_id": "a", "text": "Answer two"})
    await sidecar.stop()
    with sqlite3.connect(sidecar.config.spool.path) as db:
        stored = [orjson.loads(r[0]) for r in db.execute("SELECT payload FROM events")]
    assert sorted((e["prompt"], e["response"]) for e in stored) == [
        ("q1", long_2), ("q2", "Answer two")]


async def test_an_unwritable_conversation_is_refused_alone(
    sidecar: Sidecar, fake: FakePrecogX
) -> None:
    """Inputs nested past the 255 levels orjson writes: that call gets a 400 (its answer
    would echo them) and its conversation is refused and counted; the others, and the
    sweeper that records them, go on."""
    deep = b"[" * 300 + b'"x"' + b"]" * 300  # more than orjson itself would write
    await call(sidecar, "app.moderation.input", {"app_id": "a", "inputs": {}, "query": "qa"})
    status, _ = await sidecar.post(PATH, headers=DIFY_HEADERS, data=(
        b'{"point":"app.moderation.input","params":{"app_id":"b","inputs":{"deep":'
        + deep + b'},"query":"qb"}}'))
    assert status == 400
    await call(sidecar, "app.moderation.output", {"app_id": "a", "text": "ra"})
    await call(sidecar, "app.moderation.output", {"app_id": "b", "text": "rb"})
    await fake.wait_for_received(1)
    await call(sidecar, "app.moderation.input", {"app_id": "c", "inputs": {}, "query": "qc"})
    await call(sidecar, "app.moderation.output", {"app_id": "c", "text": "rc"})
    await fake.wait_for_received(2)
    assert {r["prompt"] for r in fake.received} == {"qa", "qc"}
    status, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_rejected_total{reason="invalid_event"} 2.0' in metrics


async def test_calls_during_the_shutdown_grace_are_recorded(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """Shutdown gives a delivery on its way its grace period with the listener open. The
    extension used to stop recording first: Dify's calls meanwhile were answered, and
    their conversations lost without a count."""
    release = asyncio.Event()
    fake.script(Hold(release))
    sidecar = await start_sidecar(
        server={"port": 0, "shutdown_grace_s": 3600.0},
        dify={"extension_token": KEY, "pair_idle_s": 3600.0, "input_wait_s": 3600.0},
        upstream={"linger_ms": 0},
    )
    assert (await sidecar.post("/api/v1/telemetry/ingest", EXAMPLE_EVENT))[0] == 202
    await fake.wait_for_requests(1)  # a delivery on its way
    stopping = asyncio.create_task(sidecar.stop())
    forwarder = sidecar.server.forwarder
    assert forwarder._loop_task is not None
    await asyncio.wait([forwarder._loop_task])  # shutdown is in the grace period
    await call(sidecar, "app.moderation.input", {"app_id": "a", "inputs": {}, "query": "q"})
    await call(sidecar, "app.moderation.output", {"app_id": "a", "text": "late answer"})
    release.set()
    await asyncio.wait_for(stopping, 30)
    with sqlite3.connect(sidecar.config.spool.path) as db:
        stored = [orjson.loads(r[0]) for r in db.execute("SELECT payload FROM events")]
    assert [(e["prompt"], e["response"]) for e in stored] == [("q", "late answer")]


async def test_calls_after_the_extension_stopped_are_answered_and_counted(
    sidecar: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    await sidecar.server.dify.stop()
    for _ in range(2):
        status, answer = await call(sidecar, "app.moderation.input",
                                    {"app_id": "a", "inputs": {}, "query": "q"})
        assert (status, answer["flagged"]) == (200, False)
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_dropped_total{reason="dify_shutting_down"} 2.0' in metrics
    assert [r.getMessage() for r in caplog.records if "no longer recorded" in r.getMessage()] \
        == ["shutting down: Dify extension calls are answered but no longer recorded (counted)"]
    # The count in the log as well: the last scrape came before these calls could.
    await sidecar.stop()
    assert "2 Dify extension calls came after the spool closed: answered, not recorded" in [
        r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("point", ["app.moderation.input", "app.moderation.output",
                                   "app.external_data_tool.query"])
async def test_an_oversize_call_passes_and_is_counted(
    sidecar: Sidecar, point: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Dify fails the user's chat on any answer but a 200 (a 413 here failed every chat
    with a document over server.max_body_bytes): it passes, unrecorded but counted."""
    text = "x" * (sidecar.config.server.max_body_bytes + 1)
    big = orjson.dumps({"point": point, "params": {
        "app_id": "a", "inputs": {}, "query": text, "text": text, "tool_variable": "v"}})
    status, body = await sidecar.post(PATH, data=big, headers=DIFY_HEADERS)
    # What Dify reads for each point: flagged (moderation), result (external data tool).
    assert (status, body["flagged"], body["result"]) == (200, False, "")
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_dropped_total{reason="dify_too_large"} 1.0' in metrics
    assert any("larger than server.max_body_bytes" in r.getMessage() for r in caplog.records)
