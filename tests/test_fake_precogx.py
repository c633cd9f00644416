"""The fake PrecogX must be trustworthy before other tests lean on it."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fake_precogx import Delay, Drop, DropMidResponse, FakePrecogX, Respond

KEY = "px_test_key"
AUTH = {"x-api-key": KEY}


def interaction(n: int = 0, **overrides: Any) -> dict[str, Any]:
    item = {
        "agentId": "dify-test-app",
        "prompt": f"hello {n}",
        "response": "hi",
        "metadata": {"platform": "dify", "sidecar_event_id": f"ev-{n}"},
    }
    item.update(overrides)
    return item


@pytest.fixture
async def fake() -> AsyncIterator[FakePrecogX]:
    async with FakePrecogX() as f:
        yield f


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    data = body if isinstance(body, bytes) else None
    js = None if isinstance(body, bytes) else body
    hdrs = AUTH if headers is None else headers
    async with session.post(url, json=js, data=data, headers=hdrs) as resp:
        return resp.status, await resp.json(content_type=None), resp


@pytest.mark.parametrize(
    "path",
    [
        "/telemetry/ingest",
        "/integrations/dify/telemetry",
        "/integrations/flowise/telemetry",
        "/integrations/n8n/telemetry",
        "/integrations/custom/telemetry",
    ],
)
async def test_single_interaction_accepted(
    fake: FakePrecogX, session: aiohttp.ClientSession, path: str
) -> None:
    status, body, _ = await post(session, fake.url + path, interaction(1))
    assert status == 200
    assert body["status"] == "success" and body["agentId"] == "dify-test-app"
    assert re.fullmatch(r"[0-9a-f-]{36}", body["interactionId"])
    assert fake.received == [interaction(1)]
    assert fake.received_ids() == ["ev-1"]
    [rec] = fake.requests
    assert (rec.path, rec.status) == ("/api/v1" + path, 200)
    assert rec.headers["x-api-key"] == KEY


async def test_batch_accepted_with_bearer(
    fake: FakePrecogX, session: aiohttp.ClientSession
) -> None:
    # Workflow apps send inputs/outputs objects rather than strings.
    items = [interaction(0), interaction(1, prompt={"q": "x"}, response={"a": "y"})]
    status, body, _ = await post(
        session,
        fake.url + "/telemetry/batch",
        {"interactions": items},
        {"Authorization": f"Bearer {KEY}"},
    )
    assert status == 200
    assert body["accepted"] == 2 and len(set(body["interactionIds"])) == 2
    assert fake.received == items
    assert fake.received_ids() == ["ev-0", "ev-1"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"x-api-key": "px_wrong"}, {"Authorization": "Bearer px_wrong"}, {"Authorization": KEY}],
)
async def test_bad_or_missing_key_is_401(
    fake: FakePrecogX, session: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    status, body, _ = await post(session, fake.url + "/telemetry/ingest", interaction(), headers)
    assert status == 401
    assert body["error"]["code"] == "INVALID_API_KEY"
    assert "px_wrong" not in str(body)
    assert fake.received == [] and fake.requests[0].status == 401


async def test_api_keys_can_change_at_runtime(
    fake: FakePrecogX, session: aiohttp.ClientSession
) -> None:
    fake.api_keys = {"px_rotated"}
    url = fake.url + "/telemetry/ingest"
    assert (await post(session, url, interaction()))[0] == 401
    assert (await post(session, url, interaction(), {"x-api-key": "px_rotated"}))[0] == 200


@pytest.mark.parametrize(
    ("item", "code", "field"),
    [
        ({"agentId": "a", "response": "r"}, "MISSING_REQUIRED_FIELD", "prompt"),
        ({"agentId": "", "prompt": "p", "response": "r"}, "MISSING_REQUIRED_FIELD", "agentId"),
        ({"agentId": 5, "prompt": "p", "response": "r"}, "INVALID_FIELD_TYPE", "agentId"),
        ({"agentId": "a", "prompt": "p", "response": [1]}, "INVALID_FIELD_TYPE", "response"),
        (interaction(metadata="x"), "INVALID_FIELD_TYPE", "metadata"),
        ("not an object", "INVALID_FIELD_TYPE", "interactions"),
    ],
)
async def test_invalid_batch_names_field_and_index(
    fake: FakePrecogX, session: aiohttp.ClientSession, item: Any, code: str, field: str
) -> None:
    batch = {"interactions": [interaction(0), item]}
    status, body, _ = await post(session, fake.url + "/telemetry/batch", batch)
    assert status == 400
    assert body["error"]["code"] == code
    assert body["error"]["details"] == {"field": field, "index": 1}
    assert fake.received == []  # all or nothing


async def test_invalid_single_and_malformed_bodies(
    fake: FakePrecogX, session: aiohttp.ClientSession
) -> None:
    url = fake.url + "/telemetry/ingest"
    status, body, _ = await post(session, url, {"agentId": "a", "prompt": "p"})
    assert (status, body["error"]["details"]) == (400, {"field": "response"})
    status, body, _ = await post(session, url, b"{not json")
    assert (status, body["error"]["code"]) == (400, "INVALID_JSON")
    batches: list[dict[str, Any]] = [{}, {"interactions": []}, {"interactions": {}}]
    for batch in batches:
        status, body, _ = await post(session, fake.url + "/telemetry/batch", batch)
        assert (status, body["error"]["details"]) == (400, {"field": "interactions"})
    status, body, _ = await post(session, fake.url + "/telemetry/nope", interaction())
    assert (status, body["error"]["code"]) == (404, "NOT_FOUND")
    assert fake.received == []


async def test_size_limits_give_413(fake: FakePrecogX, session: aiohttp.ClientSession) -> None:
    fake.max_batch_events = 2
    batch_url = fake.url + "/telemetry/batch"
    status, body, _ = await post(session, batch_url, {"interactions": [interaction()] * 3})
    assert (status, body["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE")
    assert (await post(session, batch_url, {"interactions": [interaction()] * 2}))[0] == 200
    # The event-count cap is a batch-endpoint thing; the byte cap applies everywhere.
    assert (await post(session, fake.url + "/telemetry/ingest", interaction()))[0] == 200
    fake.max_body_bytes = 50
    status, body, _ = await post(session, fake.url + "/telemetry/ingest", interaction())
    assert (status, body["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE")
    assert len(fake.received) == 3


async def test_rejected_agent_fails_whole_batch(session: aiohttp.ClientSession) -> None:
    async with FakePrecogX(reject_agent_ids=["evil"], max_batch_events=10) as fake:
        batch = {"interactions": [interaction(0), interaction(1, agentId="evil")]}
        status, body, _ = await post(session, fake.url + "/telemetry/batch", batch)
        assert status == 400
        assert body["error"]["code"] == "INVALID_FIELD_TYPE"
        assert body["error"]["details"] == {"field": "agentId", "index": 1}
        assert fake.received == []


async def test_script_runs_in_order_then_back_to_normal(
    fake: FakePrecogX, session: aiohttp.ClientSession
) -> None:
    fake.script(Respond(503), Respond(429, headers={"Retry-After": "1"}), Respond(202, {"x": 1}))
    url = fake.url + "/telemetry/ingest"
    status, body, _ = await post(session, url, interaction(0))
    assert (status, body["error"]["code"]) == (503, "INTERNAL_ERROR")
    status, body, resp = await post(session, url, interaction(1))
    assert (status, body["error"]["code"]) == (429, "RATE_LIMIT_EXCEEDED")
    assert resp.headers["Retry-After"] == "1"
    assert (await post(session, url, interaction(2)))[:2] == (202, {"x": 1})
    assert (await post(session, url, interaction(3)))[0] == 200
    assert [r.status for r in fake.requests] == [503, 429, 202, 200]
    assert fake.received_ids() == ["ev-3"]  # scripted answers never store anything


async def test_default_applies_when_script_is_empty(
    fake: FakePrecogX, session: aiohttp.ClientSession
) -> None:
    fake.default = Respond(403)
    fake.script(Respond(500))
    url = fake.url + "/telemetry/ingest"
    codes = [(await post(session, url, interaction()))[1]["error"]["code"] for _ in range(3)]
    assert codes == ["INTERNAL_ERROR", "INSUFFICIENT_PERMISSIONS", "INSUFFICIENT_PERMISSIONS"]
    fake.default = None
    assert (await post(session, url, interaction()))[0] == 200


async def test_drop_closes_without_response(
    fake: FakePrecogX, session: aiohttp.ClientSession
) -> None:
    fake.script(Drop())
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await post(session, fake.url + "/telemetry/ingest", interaction())
    assert fake.requests[0].status is None and fake.received == []
    assert (await post(session, fake.url + "/telemetry/ingest", interaction()))[0] == 200


async def test_drop_mid_response_breaks_the_body_after_accepting(
    fake: FakePrecogX, session: aiohttp.ClientSession
) -> None:
    fake.script(DropMidResponse())
    async with session.post(fake.url + "/telemetry/ingest", json=interaction(), headers=AUTH) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    # The server stored it; only the answer was lost (a retry would duplicate it).
    assert fake.received_ids() == ["ev-0"]


async def test_delay_outlasts_client_timeout_but_is_still_processed(
    fake: FakePrecogX, session: aiohttp.ClientSession
) -> None:
    fake.script(Delay(0.3))
    with pytest.raises(asyncio.TimeoutError):
        await session.post(
            fake.url + "/telemetry/ingest",
            json=interaction(),
            headers=AUTH,
            timeout=aiohttp.ClientTimeout(total=0.05),
        )
    assert fake.received == [] and fake.requests[0].status is None
    await fake.wait_for_received(1, timeout=2)
    assert fake.requests[0].status == 200


async def test_wait_for_received_wakes_on_accept(
    fake: FakePrecogX, session: aiohttp.ClientSession
) -> None:
    waiter = asyncio.create_task(fake.wait_for_received(2, timeout=5))
    await post(session, fake.url + "/telemetry/ingest", interaction(0))
    await asyncio.sleep(0)
    assert not waiter.done()
    await post(session, fake.url + "/telemetry/ingest", interaction(1))
    # Woken by the accept itself, not by a polling interval: no time needs to pass.
    for _ in range(3):
        await asyncio.sleep(0)
    assert waiter.done() and waiter.exception() is None
    await fake.wait_for_requests(2, timeout=0.01)


async def test_wait_for_received_timeout_says_how_many(
    fake: FakePrecogX, session: aiohttp.ClientSession
) -> None:
    await post(session, fake.url + "/telemetry/ingest", interaction())
    with pytest.raises(TimeoutError, match="1 of 3 interactions"):
        await fake.wait_for_received(3, timeout=0.05)
    with pytest.raises(TimeoutError, match="1 of 2 requests"):
        await fake.wait_for_requests(2, timeout=0.05)


async def test_subprocess_mode(session: aiohttp.ClientSession) -> None:
    script = Path(__file__).with_name("fake_precogx.py")
    with socket.socket() as s:  # a port free a moment ago: --port was once ignored
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), "--port", str(port), "--api-key", "px_sub",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        m = re.fullmatch(rf"listening (http://127\.0\.0\.1:{port}/api/v1)\n", line)
        assert m, line
        status, _, _ = await post(
            session, m[1] + "/integrations/dify/telemetry", interaction(), {"x-api-key": "px_sub"}
        )
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        rest = (await proc.stdout.read()).decode()
        assert rest == "stopped: 1 interactions in 1 requests\n"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
