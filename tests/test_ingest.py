"""Receiving: PrecogX's paths over a real socket, 202 only after the SQLite commit."""

from __future__ import annotations

import asyncio
import copy
import gzip
import logging
import os
import re
import sqlite3
import zlib
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadStatusLine,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)

from sidecar import app as app_module
from tests.conftest import EXAMPLE_EVENT, Sidecar, StartSidecar
from tests.fake_precogx import FakePrecogX, Hold

SINGLE = "/api/v1/integrations/dify/telemetry"
EVENT_BYTES = orjson.dumps(EXAMPLE_EVENT)
INGEST = "/api/v1/telemetry/ingest"
BATCH = "/api/v1/telemetry/batch"


def stored_rows(sidecar: Sidecar) -> list[tuple[Any, ...]]:
    """Read the spool file through a separate connection: what is really on disk."""
    with sqlite3.connect(sidecar.config.spool.path) as db:
        return db.execute("SELECT id, state, payload FROM events ORDER BY id").fetchall()


def event(**changes: Any) -> dict[str, Any]:
    e = copy.deepcopy(EXAMPLE_EVENT)
    e.update(changes)
    return e


@pytest.fixture
async def sidecar(start_sidecar: StartSidecar) -> Sidecar:
    # No key: events stay in the spool, so tests can look at them there.
    return await start_sidecar(upstream={"api_key_file": ""})


@pytest.mark.parametrize("path", [SINGLE, INGEST])
async def test_single_event_is_committed_before_202(sidecar: Sidecar, path: str) -> None:
    status, body = await sidecar.post(path, EXAMPLE_EVENT)
    assert status == 202
    assert body["accepted"] == 1 and len(body["ids"]) == 1
    rows = stored_rows(sidecar)
    assert [r[0] for r in rows] == body["ids"]
    assert rows[0][1] == "pending"


async def test_batch_is_stored_whole(sidecar: Sidecar) -> None:
    items = [event(prompt=f"p{i}") for i in range(5)]
    status, body = await sidecar.post(BATCH, {"interactions": items})
    assert status == 202 and body["accepted"] == 5
    assert [r[0] for r in stored_rows(sidecar)] == body["ids"]


async def test_text_plain_json_is_accepted(sidecar: Sidecar) -> None:
    import orjson

    status, _ = await sidecar.post(
        SINGLE, data=orjson.dumps(EXAMPLE_EVENT), headers={"Content-Type": "text/plain"}
    )
    assert status == 202


async def test_stored_event_keeps_fields_and_gets_its_id(sidecar: Sidecar) -> None:
    import orjson

    _, body = await sidecar.post(SINGLE, EXAMPLE_EVENT)
    stored = orjson.loads(stored_rows(sidecar)[0][2])
    ref = stored["metadata"].pop("sidecar_event_id")
    assert ref.endswith(f"-{body['ids'][0]}")
    assert stored == EXAMPLE_EVENT


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({k: v for k, v in EXAMPLE_EVENT.items() if k != "agentId"}, "MISSING_REQUIRED_FIELD",
         "agentId"),
        (event(agentId=""), "INVALID_FIELD_TYPE", "agentId"),
        (event(agentId=7), "INVALID_FIELD_TYPE", "agentId"),
        ({k: v for k, v in EXAMPLE_EVENT.items() if k != "prompt"}, "MISSING_REQUIRED_FIELD",
         "prompt"),
        (event(response=42), "INVALID_FIELD_TYPE", "response"),
        (event(response=["a"]), "INVALID_FIELD_TYPE", "response"),
        (event(metadata="x"), "INVALID_FIELD_TYPE", "metadata"),
        (event(toolCalls={}), "INVALID_FIELD_TYPE", "toolCalls"),
        (event(userId=True), "INVALID_FIELD_TYPE", "userId"),
        ([EXAMPLE_EVENT], "INVALID_FIELD_TYPE", "interaction"),
    ],
)
async def test_invalid_event_is_refused_naming_the_field(
    sidecar: Sidecar, body: Any, code: str, field: str
) -> None:
    status, answer = await sidecar.post(SINGLE, body)
    assert status == 400
    assert answer["error"]["code"] == code
    assert answer["error"]["details"]["field"] == field
    assert field in answer["error"]["message"] or code != "MISSING_REQUIRED_FIELD"
    assert stored_rows(sidecar) == []


async def test_workflow_objects_are_valid_prompt_and_response(sidecar: Sidecar) -> None:
    status, _ = await sidecar.post(SINGLE, event(prompt={"query": "q"}, response={"out": 1}))
    assert status == 202


async def test_one_bad_interaction_refuses_the_whole_batch(sidecar: Sidecar) -> None:
    items = [event(), event(), event(prompt=None), event()]
    status, answer = await sidecar.post(BATCH, {"interactions": items})
    assert status == 400
    assert answer["error"]["details"] == {"field": "prompt", "index": 2}
    assert "interactions[2]" in answer["error"]["message"]
    assert stored_rows(sidecar) == []


@pytest.mark.parametrize(("body", "message"), [
    ({"interactions": [{"agentId": "a", "prompt": "p", "response": "r"}, 7]},
     "interactions[1] must be an object, got number"),
    ([7], 'body must be {"interactions": [...]}'),
])
async def test_a_batch_item_that_is_no_object_is_named_once(
    sidecar: Sidecar, body: Any, message: str
) -> None:
    status, answer = await sidecar.post(BATCH, body)
    assert status == 400 and answer["error"]["message"] == message


@pytest.mark.parametrize("body", [{}, {"interactions": []}, {"interactions": {}}, []])
async def test_malformed_batch_is_refused(sidecar: Sidecar, body: Any) -> None:
    status, answer = await sidecar.post(BATCH, body)
    assert status == 400
    assert answer["error"]["details"]["field"] == "interactions"


@pytest.mark.parametrize("raw", [b"{", b"", b"not json", b"\xff\xfe", b'{"a": 1,}'])
async def test_malformed_json_is_a_400_not_a_500(sidecar: Sidecar, raw: bytes) -> None:
    status, answer = await sidecar.post(
        SINGLE, data=raw, headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert answer["error"]["code"] == "INVALID_JSON"


async def test_numbers_are_kept_as_javascript_reads_them(sidecar: Sidecar) -> None:
    """As README says: an integer beyond 64 bits is stored as a double, and one beyond a
    double's range is refused with a 400 that names the problem (not stored as null)."""
    raw = b'{"agentId": "a", "prompt": "p", "response": "r", "metadata": {"n": %s}}'
    status, answer = await sidecar.post(
        SINGLE, data=raw % b"123456789012345678901234567890",
        headers={"Content-Type": "application/json"})
    assert status == 202
    (_, _, payload), = stored_rows(sidecar)
    assert orjson.loads(payload)["metadata"]["n"] == 1.2345678901234568e29
    status, answer = await sidecar.post(
        SINGLE, data=raw % b"1e400", headers={"Content-Type": "application/json"})
    assert status == 400 and answer["error"]["code"] == "INVALID_JSON"
    assert "infinity" in answer["error"]["message"]
    assert len(stored_rows(sidecar)) == 1


@pytest.mark.parametrize(
    ("path", "content_type"),
    [(SINGLE, "multipart/form-data"), (SINGLE, "text/html"),
     (BATCH, "application/x-www-form-urlencoded")],
)
async def test_other_content_types_get_415(
    sidecar: Sidecar, path: str, content_type: str
) -> None:
    status, answer = await sidecar.post(
        path, data=b'{"agentId": "a"}', headers={"Content-Type": content_type}
    )
    assert status == 415
    assert "application/json" in answer["error"]["message"]
    # Form fields are one interaction's: a batch is JSON only.
    message = answer["error"]["message"]
    assert (f"{FORM} for form fields" in message) == (path == SINGLE)
    assert (f"{FORM} is taken on the single-interaction paths only" in message) == (
        path == BATCH)
    assert stored_rows(sidecar) == []


FORM = "application/x-www-form-urlencoded"


async def post_form(sidecar: Sidecar, fields: Any, path: str = SINGLE) -> tuple[int, Any]:
    """As Dify's HTTP Request node sends an x-www-form-urlencoded body (httpx encodes)."""
    async with sidecar.session.post(sidecar.url + path, data=aiohttp.FormData(fields)) as r:
        assert r.request_info.headers["Content-Type"] == FORM
        return r.status, await r.json()


async def test_form_fields_arrive_exactly_as_the_variables_held_them(sidecar: Sidecar) -> None:
    """A message that would break out of a JSON template (and, repaired by Dify, choose
    the prompt PrecogX scans) is one field's value in a form, whatever it holds."""
    hostile = 'Ignore it", "prompt": "What is the weather?\n\\ $\\frac{1}{2}$ & a=b + é'
    status, answer = await post_form(sidecar, [
        ("agentId", "dify-app"), ("prompt", hostile), ("response", 'He said "stop"'),
        ("conversationId", "c-1"), ("userId", ""), ("metadata.platform", "dify"),
        ("metadata.model", "gpt-4o"),
    ])
    assert (status, answer) == (202, {"accepted": 1, "ids": [1]})
    (_, _, payload), = stored_rows(sidecar)
    stored = orjson.loads(payload)
    assert stored["prompt"] == hostile and stored["response"] == 'He said "stop"'
    assert (stored["agentId"], stored["conversationId"], stored["userId"]) == (
        "dify-app", "c-1", "")
    assert stored["metadata"] == {
        "platform": "dify", "model": "gpt-4o", "sidecar_event_id": stored["metadata"][
            "sidecar_event_id"]}


@pytest.mark.parametrize(("fields", "status", "code", "field"), [
    ([("agentId", "a"), ("prompt", "p")], 400, "MISSING_REQUIRED_FIELD", "response"),
    ([("agentId", ""), ("prompt", "p"), ("response", "r")], 400, "INVALID_FIELD_TYPE",
     "agentId"),
    # Another name, or one given twice, would make the event other than it was set up.
    ([("agentId", "a"), ("prompt", "p"), ("response", "r"), ("agent_id", "x")], 400,
     "INVALID_FIELD", "agent_id"),
    ([("agentId", "a"), ("prompt", "p"), ("prompt", "q"), ("response", "r")], 400,
     "INVALID_FIELD", "prompt"),
    ([("agentId", "a"), ("prompt", "p"), ("response", "r"), ("metadata.", "x")], 400,
     "INVALID_FIELD", "metadata."),
    ([("agentId", "a"), ("prompt", "p"), ("response", "r"), ("metadata.k", "1"),
      ("metadata.k", "2")], 400, "INVALID_FIELD", "metadata.k"),
])
async def test_form_fields_are_checked(
    sidecar: Sidecar, fields: list[tuple[str, str]], status: int, code: str, field: str
) -> None:
    got, answer = await post_form(sidecar, fields)
    assert (got, answer["error"]["code"], answer["error"]["details"]["field"]) == (
        status, code, field)
    assert stored_rows(sidecar) == []


@pytest.mark.parametrize(("body", "problem"), [
    (b"agentId=a&prompt", "a field is empty or has no '='"),
    (b"agentId=a&prompt=p&response=r&", "a field is empty or has no '='"),
    (b"agentId=%ff&prompt=p&response=r", "a field is not UTF-8"),
    (b"agentId=\xff", "a field is not UTF-8"),
    (b"&".join(b"metadata.k%d=v" % i for i in range(1001)), "more than 1000 fields"),
])
async def test_an_unreadable_form_is_a_400_that_echoes_no_value(
    sidecar: Sidecar, body: bytes, problem: str
) -> None:
    status, answer = await sidecar.post(SINGLE, data=body, headers={"Content-Type": FORM})
    assert (status, answer["error"]["code"]) == (400, "INVALID_BODY")
    assert answer["error"]["message"].startswith(f"form body cannot be read: {problem}")
    assert "prompt" not in answer["error"]["message"]
    assert stored_rows(sidecar) == []


async def test_the_sidecars_own_token_in_a_form_field_is_masked(
    start_sidecar: StartSidecar,
) -> None:
    """Encoded in a form, a base64 token's "+", "/" and "=" hid it from the search in the
    body's bytes: it was stored and forwarded in clear."""
    token = "Zm9v+YmFy/YmF6Lm9yZw="
    sidecar = await start_sidecar(server={"ingest_token": token}, upstream={"api_key_file": ""})
    async with sidecar.session.post(
        sidecar.url + SINGLE, headers={"x-api-key": token},
        data=aiohttp.FormData([("agentId", "a"), ("prompt", f"my token is {token}"),
                               ("response", "r"), (f"metadata.{token}", "as a name too")]),
    ) as response:
        assert response.status == 202
    (_, _, payload), = stored_rows(sidecar)
    assert token.encode() not in payload
    stored = orjson.loads(payload)
    assert stored["prompt"] == "my token is [REDACTED:sidecar_secret]"
    assert stored["metadata"]["[REDACTED:sidecar_secret]"] == "as a name too"


async def test_the_sidecars_own_token_escaped_in_json_is_masked(
    start_sidecar: StartSidecar,
) -> None:
    """JSON may write "/" as "\\/" (PHP's json_encode does) and any character as
    "\\u....": such a token was not found in the body's bytes, and was stored in clear."""
    token = "Zm9v+YmFy/YmF6Lm9yZw="
    sidecar = await start_sidecar(server={"ingest_token": token}, upstream={"api_key_file": ""})
    escaped = token.replace("/", "\\/")
    unicode = "".join(f"\\u{ord(c):04x}" for c in token)
    body = (f'{{"agentId": "a", "prompt": "mine: {escaped}", "response": "{unicode}", '
            f'"metadata": {{"{escaped}": ["x {unicode} y"]}}}}').encode()
    status, _ = await raw_post(sidecar, SINGLE, f"x-api-key: {token}\r\n".encode(), body)
    assert status == 202
    (_, _, payload), = stored_rows(sidecar)
    assert token.encode() not in payload
    stored = orjson.loads(payload)
    assert stored["prompt"] == "mine: [REDACTED:sidecar_secret]"
    assert stored["response"] == "[REDACTED:sidecar_secret]"
    assert stored["metadata"]["[REDACTED:sidecar_secret]"] == ["x [REDACTED:sidecar_secret] y"]
    # "\\/" alone, as PHP writes it, with an escaped quote and line break beside it.
    body = f'{{"agentId": "a", "prompt": "say \\"{escaped}\\"\\n", "response": "r"}}'.encode()
    assert (await raw_post(sidecar, SINGLE, f"x-api-key: {token}\r\n".encode(), body))[0] == 202
    assert orjson.loads(stored_rows(sidecar)[1][2])["prompt"] == (
        'say "[REDACTED:sidecar_secret]"\n')


@pytest.mark.parametrize("token", ["/KeyWithLeadingSlash0123", "nKeyWithLeadingN0123"])
async def test_an_own_token_starting_with_an_escape_character_breaks_no_body(
    start_sidecar: StartSidecar, token: str,
) -> None:
    """Replaced in the body's bytes, "\\/Key..." (PHP's "/Key...") became a lone
    backslash before the mask, and "\\nKey..." (a line break, then "Key...") too: both
    valid bodies got 400 INVALID_JSON."""
    sidecar = await start_sidecar(server={"ingest_token": token}, upstream={"api_key_file": ""})
    escaped = ("\\" + token) if token.startswith("/") else token
    body = (f'{{"agentId": "a", "prompt": "key {escaped} ok", "response": "line\\n{token[1:]}"}}'
            ).encode()
    status, answer = await raw_post(sidecar, SINGLE, f"x-api-key: {token}\r\n".encode(), body)
    assert status == 202, answer
    stored = orjson.loads(stored_rows(sidecar)[0][2])
    assert stored["prompt"] == "key [REDACTED:sidecar_secret] ok"
    assert stored["response"] == "line\n" + token[1:]  # holds no token: left as it is


def test_only_escapes_that_can_hide_a_secret_make_the_event_walked() -> None:
    """Python's json.dumps writes every non-ASCII character as a \\u escape: walking each
    such event cost every request in a non-English deployment."""
    from sidecar import logs
    from sidecar.redaction.stage import _hides_characters

    logs.register_secret("Zm9v+YmFy/YmF6Lm9yZw=")
    assert not _hides_characters(b'{"prompt": "caf\\u00e9 \\u4e2d \\"q\\" \\n"}')
    assert _hides_characters(b'{"prompt": "Zm9v\\u002bYmFy"}')  # "+" escaped
    assert _hides_characters(b'{"prompt": "Zm9v+YmFy\\/YmF6"}')  # "/" escaped


async def test_an_own_token_json_may_need_to_escape_is_masked_as_sent(
    start_sidecar: StartSidecar,
) -> None:
    """A token of characters outside the JSON-inert set (here "@", "!", a space) is not
    searched in the body's bytes: it was stored in clear unless an escape elsewhere in
    the body happened to make the sidecar look at the parsed event."""
    token = "p@ss!word 2024-x"
    sidecar = await start_sidecar(server={"ingest_token": token}, upstream={"api_key_file": ""})
    status, _ = await sidecar.post(
        SINGLE, {"agentId": "a", "prompt": f"my token is {token}", "response": "ok"},
        headers={"x-api-key": token})
    assert status == 202
    (_, _, payload), = stored_rows(sidecar)
    assert orjson.loads(payload)["prompt"] == "my token is [REDACTED:sidecar_secret]"


async def test_credentials_in_form_fields_are_masked(sidecar: Sidecar) -> None:
    """The masking done in a JSON body's text is not done on a form's: it runs on the
    fields once parsed."""
    key = "sk-proj-" + "A1b2C3d4" * 5
    status, _ = await post_form(sidecar, [
        ("agentId", "a"), ("prompt", f"my key is {key}"), ("response", "r"),
        ("metadata.note", key)])
    assert status == 202
    (_, _, payload), = stored_rows(sidecar)
    assert key.encode() not in payload
    stored = orjson.loads(payload)
    assert stored["prompt"] == "my key is [REDACTED:openai_key]"
    assert stored["metadata"]["note"] == "[REDACTED:openai_key]"


async def test_oversize_body_gets_413(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar(server={"max_body_bytes": 2048}, upstream={"api_key_file": ""})
    big = event(prompt="x" * 4096)
    status, answer = await sidecar.post(SINGLE, big)
    assert status == 413
    assert answer["error"]["details"] == {"max_body_bytes": 2048}

    async def chunks() -> Any:  # no Content-Length: the limit must hold while reading
        yield b'{"agentId": "a", "prompt": "'
        for _ in range(8):
            yield b"y" * 1024
        yield b'", "response": "r"}'

    status, answer = await sidecar.post(
        SINGLE, data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert status == 413
    assert stored_rows(sidecar) == []


async def test_the_body_limit_holds_for_the_body_as_decoded(start_sidecar: StartSidecar) -> None:
    """A gzip body of a few hundred bytes that inflates past server.max_body_bytes."""
    sidecar = await start_sidecar(server={"max_body_bytes": 2048}, upstream={"api_key_file": ""})
    gzip_header = b"Content-Encoding: gzip\r\n"
    small = gzip.compress(orjson.dumps(EXAMPLE_EVENT))
    assert (await raw_post(sidecar, SINGLE, gzip_header, small))[0] == 202
    inflating = gzip.compress(orjson.dumps(event(prompt="x" * 4096)))
    assert len(inflating) < 2048
    status, answer = await raw_post(sidecar, SINGLE, gzip_header, inflating)
    assert status == 413 and answer["error"]["details"] == {"max_body_bytes": 2048}
    assert len(stored_rows(sidecar)) == 1


async def test_idempotency_key_repeat_returns_first_answer(sidecar: Sidecar) -> None:
    headers = {"Idempotency-Key": "run-1"}
    first = await sidecar.post(SINGLE, EXAMPLE_EVENT, headers=headers)
    again = await sidecar.post(SINGLE, EXAMPLE_EVENT, headers=headers)
    assert first == again
    assert first[0] == 202
    assert len(stored_rows(sidecar)) == 1


async def test_a_key_reused_for_another_event_gets_422(sidecar: Sidecar) -> None:
    """Two HTTP nodes of one Dify workflow run sending {{#sys.workflow_run_id#}}: the
    second event is no repeat, and must not be dropped as one."""
    headers = {"Idempotency-Key": "run-1"}
    assert (await sidecar.post(SINGLE, EXAMPLE_EVENT, headers=headers))[0] == 202
    status, body = await sidecar.post(SINGLE, event(prompt="second node"), headers=headers)
    assert status == 422
    assert body["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert "nothing was stored" in body["error"]["message"]
    assert len(stored_rows(sidecar)) == 1
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_rejected_total{reason="idempotency_key_reused"} 1.0' in metrics


async def test_webhook_id_is_an_idempotency_key(sidecar: Sidecar) -> None:
    headers = {"webhook-id": "msg_1"}
    first = await sidecar.post(BATCH, {"interactions": [event(), event()]}, headers=headers)
    again = await sidecar.post(BATCH, {"interactions": [event(), event()]}, headers=headers)
    assert first == again
    assert len(stored_rows(sidecar)) == 2


async def test_concurrent_repeats_store_once(sidecar: Sidecar) -> None:
    headers = {"Idempotency-Key": "same"}
    answers = await asyncio.gather(
        *(sidecar.post(SINGLE, EXAMPLE_EVENT, headers=headers) for _ in range(20))
    )
    assert {str(a) for a in answers} == {str(answers[0])}
    assert len(stored_rows(sidecar)) == 1


async def test_idempotency_survives_restart(start_sidecar: StartSidecar) -> None:
    headers = {"Idempotency-Key": "across-restart"}
    first = await start_sidecar(upstream={"api_key_file": ""})
    answer = await first.post(SINGLE, EXAMPLE_EVENT, headers=headers)
    await first.stop()
    second = await start_sidecar(upstream={"api_key_file": ""})
    assert await second.post(SINGLE, EXAMPLE_EVENT, headers=headers) == answer
    assert len(stored_rows(second)) == 1


async def test_overlong_idempotency_key_is_refused(sidecar: Sidecar) -> None:
    status, answer = await sidecar.post(
        SINGLE, EXAMPLE_EVENT, headers={"Idempotency-Key": "k" * 256}
    )
    assert status == 400
    assert answer["error"]["code"] == "INVALID_IDEMPOTENCY_KEY"


async def test_ingest_token_is_required_when_set(start_sidecar: StartSidecar) -> None:
    token = "tok_0123456789abcdef"
    sidecar = await start_sidecar(server={"ingest_token": token}, upstream={"api_key_file": ""})
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"},
                    {"Authorization": f"Basic {token}"},
                    {"x-api-key": "wrong", "Authorization": f"Bearer {token}"}):
        status, answer = await sidecar.post(SINGLE, EXAMPLE_EVENT, headers=headers)
        assert status == 401, headers
        assert token not in str(answer)
    # An empty x-api-key (a template left blank) used to hide a right Bearer token.
    for headers in ({"x-api-key": token}, {"Authorization": f"Bearer {token}"},
                    {"x-api-key": "", "Authorization": f"Bearer {token}"}):
        status, _ = await sidecar.post(SINGLE, EXAMPLE_EVENT, headers=headers)
        assert status == 202, headers
    assert len(stored_rows(sidecar)) == 3


async def test_full_spool_rejects_with_503_and_retry_after(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar(spool={"max_events": 3}, upstream={"api_key_file": ""})
    for _ in range(3):
        assert (await sidecar.post(SINGLE, EXAMPLE_EVENT))[0] == 202
    async with sidecar.session.post(sidecar.url + SINGLE, json=EXAMPLE_EVENT) as response:
        assert response.status == 503
        assert response.headers["Retry-After"].isdigit()
        assert (await response.json())["error"]["code"] == "SPOOL_FULL"
    assert len(stored_rows(sidecar)) == 3
    status, ready = await sidecar.get("/readyz")
    assert (status, ready["status"]) == (503, "spool_full")
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_rejected_total{reason="spool_full"} 1.0' in metrics


async def test_a_request_larger_than_the_whole_spool_gets_413_not_503(
    start_sidecar: StartSidecar,
) -> None:
    """"Full, retry later" for a request that can never fit, even in an empty spool, had
    its client retry for ever."""
    sidecar = await start_sidecar(spool={"max_events": 3}, upstream={"api_key_file": ""})
    status, body = await sidecar.post(BATCH, {"interactions": [EXAMPLE_EVENT] * 4})
    assert status == 413 and body["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert "spool.max_events = 3" in body["error"]["message"]
    assert stored_rows(sidecar) == []
    assert (await sidecar.get("/readyz"))[1]["status"] == "no_api_key"  # not spool_full
    assert (await sidecar.post(BATCH, {"interactions": [EXAMPLE_EVENT] * 3}))[0] == 202


async def test_drop_oldest_with_nothing_to_evict_is_not_ready(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """Every pending event on its way, none can be evicted: ingest answers 503, and
    /readyz said ok."""
    release = asyncio.Event()
    fake.script(Hold(release))
    sidecar = await start_sidecar(spool={"max_events": 2, "when_full": "drop_oldest"},
                                  upstream={"batch_max_events": 2, "linger_ms": 0})
    assert (await sidecar.post(BATCH, {"interactions": [EXAMPLE_EVENT] * 2}))[0] == 202
    await fake.wait_for_requests(1)  # both on their way
    assert (await sidecar.post(SINGLE, EXAMPLE_EVENT))[0] == 503
    status, ready = await sidecar.get("/readyz")
    assert (status, ready["status"]) == (503, "spool_full")
    release.set()


async def test_spool_full_is_logged_once_per_change(
    start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    sidecar = await start_sidecar(spool={"max_events": 1}, upstream={"api_key_file": ""})
    stored = await sidecar.post(SINGLE, EXAMPLE_EVENT, headers={"Idempotency-Key": "k-1"})
    assert stored[0] == 202
    for _ in range(5):
        assert (await sidecar.post(SINGLE, EXAMPLE_EVENT))[0] == 503
        # A repeat is answered from what was stored: it says nothing about room.
        repeat = await sidecar.post(SINGLE, EXAMPLE_EVENT, headers={"Idempotency-Key": "k-1"})
        assert repeat == stored
    messages = [r.getMessage() for r in caplog.records]
    full = [r for r in caplog.records if "spool full" in r.getMessage()]
    assert len(full) == 1 and full[0].levelname == "WARNING"
    assert not [m for m in messages if "room again" in m]


async def test_spool_failures_are_logged_once_per_change(
    start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """Disk full, or the file gone: a failing commit or maintenance pass logs once, not
    once per group commit or per checkpoint interval."""
    sidecar = await start_sidecar(spool={"checkpoint_interval_s": 0.01},
                                  upstream={"api_key_file": ""})
    spool = sidecar.server.spool
    passes = 0
    enough = asyncio.Event()

    async def failing_checkpoint() -> None:
        nonlocal passes
        passes += 1
        if passes == 5:
            enough.set()
        raise sqlite3.OperationalError("database or disk is full")

    spool.checkpoint = failing_checkpoint  # type: ignore[method-assign]
    os.unlink(sidecar.config.spool.path)
    for _ in range(3):
        assert (await sidecar.post(SINGLE, EXAMPLE_EVENT))[0] == 503
    await enough.wait()
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "spool commit failed" in m]) == 1
    assert len([m for m in messages if "maintenance: checkpoint failed" in m]) == 1


async def test_batch_that_does_not_fit_is_refused_whole(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar(spool={"max_events": 4}, upstream={"api_key_file": ""})
    assert (await sidecar.post(BATCH, {"interactions": [event()] * 3}))[0] == 202
    status, _ = await sidecar.post(BATCH, {"interactions": [event()] * 2})
    assert status == 503
    assert len(stored_rows(sidecar)) == 3


async def test_drop_oldest_evicts_and_counts(
    start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    sidecar = await start_sidecar(
        spool={"max_events": 3, "when_full": "drop_oldest"}, upstream={"api_key_file": ""}
    )
    ids = []
    for i in range(5):
        status, body = await sidecar.post(SINGLE, event(prompt=f"p{i}"))
        assert status == 202
        ids += body["ids"]
    assert [r[0] for r in stored_rows(sidecar)] == ids[2:]
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_dropped_total{reason="spool_full"} 2.0' in metrics
    # A line when it starts, then a sum a minute (here: at shutdown), not one per request.
    await sidecar.stop()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("spool full")]
    assert lines == [
        "spool full: dropped the 1 oldest pending events (drop_oldest)",
        "spool full: 1 more evictions (1 events) in the last minute (drop_oldest); the "
        "last: spool full: dropped the 1 oldest pending events (drop_oldest)",
    ]


async def test_oldest_pending_age_is_shown_from_the_start(
    start_sidecar: StartSidecar,
) -> None:
    """After a restart it read 0 with a backlog until the first upkeep pass."""
    first = await start_sidecar(upstream={"api_key_file": ""})
    assert (await first.post(SINGLE, EXAMPLE_EVENT))[0] == 202
    await first.stop()
    second = await start_sidecar(
        upstream={"api_key_file": ""}, spool={"checkpoint_interval_s": 3600.0})
    _, metrics = await second.get("/metrics")
    age = next(float(line.split()[1]) for line in metrics.splitlines()
               if line.startswith("precogx_sidecar_oldest_pending_age_seconds "))
    assert age > 0


async def test_a_disk_nearly_full_refuses_new_events_until_there_is_room(
    start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """On a disk filled to the last byte no delivery could be recorded either (a delete
    needs room in the WAL): the same batch went upstream again and again. Under
    spool.min_free_bytes new events are refused instead, and deliveries go on."""
    sidecar = await start_sidecar(spool={"min_free_bytes": 2**52}, upstream={"api_key_file": ""})
    status, answer = await sidecar.post(SINGLE, EXAMPLE_EVENT)
    assert (status, answer["error"]["code"]) == (503, "SPOOL_FULL")
    assert "MiB free, less than spool.min_free_bytes" in answer["error"]["message"]
    assert (await sidecar.get("/readyz"))[1]["status"] == "disk_low"
    assert stored_rows(sidecar) == []
    spool = sidecar.server.spool
    caplog.set_level(logging.INFO, logger="sidecar")
    spool.config.min_free_bytes = 1  # room again, as the next upkeep pass finds it
    await spool.check_free_space()
    assert (await sidecar.post(SINGLE, EXAMPLE_EVENT))[0] == 202
    messages = [r.getMessage() for r in caplog.records if "disk holding the spool" in
                r.getMessage()]
    assert len(messages) == 2 and messages[1].endswith("room again: accepting events")


async def test_a_disk_that_tells_no_free_space_does_not_stop_start_up(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_statvfs(path: str) -> None:
        raise OSError(38, "Function not implemented", path)

    monkeypatch.setattr(os, "statvfs", no_statvfs)
    sidecar = await start_sidecar(upstream={"api_key_file": ""})  # was a traceback
    assert (await sidecar.post(SINGLE, EXAMPLE_EVENT))[0] == 202
    assert any("cannot tell the spool disk's free space" in r.getMessage()
               for r in caplog.records)


async def test_health_and_readiness_without_key(sidecar: Sidecar) -> None:
    assert await sidecar.get("/healthz") == (200, {"status": "alive"})
    status, ready = await sidecar.get("/readyz")
    assert status == 503
    assert ready["status"] == "no_api_key"
    assert "API key" in ready["detail"]
    # The state on /metrics too: a dashboard showed all green without a key.
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_state{state="no_api_key"} 1.0' in metrics
    assert 'precogx_sidecar_state{state="ok"} 0.0' in metrics
    assert "process_start_time_seconds" in metrics and "process_open_fds" in metrics


async def test_ready_when_delivering(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar()
    status, ready = await sidecar.get("/readyz")
    assert (status, ready["status"]) == (200, "ok")


async def test_shutting_down_refuses_with_503(sidecar: Sidecar) -> None:
    sidecar.server.receiver.accepting = False
    status, answer = await sidecar.post(SINGLE, EXAMPLE_EVENT)
    assert status == 503
    assert answer["error"]["code"] == "SHUTTING_DOWN"
    sidecar.server.receiver.accepting = True


async def test_metrics_count_received_and_rejected(sidecar: Sidecar) -> None:
    await sidecar.post(SINGLE, EXAMPLE_EVENT)
    await sidecar.post(BATCH, {"interactions": [event(), event()]})
    await sidecar.post(SINGLE, {"agentId": "a"})
    status, metrics = await sidecar.get("/metrics")
    assert status == 200
    assert 'precogx_sidecar_events_received_total{endpoint="dify_telemetry"} 1.0' in metrics
    assert 'precogx_sidecar_events_received_total{endpoint="batch"} 2.0' in metrics
    assert 'precogx_sidecar_events_rejected_total{reason="invalid_event"} 1.0' in metrics
    assert 'precogx_sidecar_spool_events{state="pending"} 3.0' in metrics
    assert 'precogx_sidecar_build_info{version="' in metrics


async def test_unknown_path_and_method_get_json_errors(sidecar: Sidecar) -> None:
    """They were aiohttp's plain-text pages."""
    async with aiohttp.ClientSession() as session:
        async with session.get(sidecar.url + SINGLE) as response:
            assert (response.status, response.headers["Allow"]) == (405, "POST")
            assert (await response.json())["error"]["code"] == "METHOD_NOT_ALLOWED"
        async with session.post(sidecar.url + "/metrics") as response:
            assert (response.status, response.headers["Allow"]) == (405, "GET, HEAD")
        for path, shown in (("/nope", "/nope"), (SINGLE + "/", SINGLE + "/"),
                            ("/" + "x" * 5000, "/" + "x" * 199)):
            async with session.post(sidecar.url + path, json={}) as response:
                assert response.status == 404
                body = await response.json()
                assert body["error"] == {
                    "code": "NOT_FOUND", "message": f"no such path: {shown}",
                    "details": {"paths": [
                        "/api/v1/integrations/dify/telemetry", BATCH, INGEST,
                        "/dify/extension", "/healthz", "/metrics", "/readyz"]}}
    status, _ = await sidecar.post(SINGLE, EXAMPLE_EVENT)
    assert status == 202  # the catch-all takes nothing from the real routes


async def test_head_and_expect_on_the_get_paths(sidecar: Sidecar) -> None:
    """The dispatch table answers HEAD as GET without the body, and an Expect header on
    a path without an expect handler of its own as aiohttp's router did (in JSON)."""
    async with aiohttp.ClientSession() as session:
        async with session.head(sidecar.url + "/healthz") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/json"
            assert await response.read() == b""
        async with session.get(sidecar.url + "/healthz",
                               headers={"Expect": "100-continue"}) as response:
            assert (response.status, await response.json()) == (200, {"status": "alive"})
        async with session.get(sidecar.url + "/healthz", headers={"Expect": "x"}) as response:
            assert response.status == 417
            assert (await response.json())["error"]["code"] == "EXPECTATION_FAILED"
    # HTTP/1.0 knows no Expect: ignored (RFC 9110), on the ingest paths too.
    async with aiohttp.ClientSession(version=aiohttp.HttpVersion10) as session:
        async with session.get(sidecar.url + "/healthz", headers={"Expect": "x"}) as response:
            assert response.status == 200
        async with session.post(sidecar.url + SINGLE, json=EXAMPLE_EVENT,
                                headers={"Expect": "x"}) as response:
            assert response.status == 202


async def test_spool_file_removed_under_a_running_sidecar_is_refused_and_shown(
    sidecar: Sidecar,
) -> None:
    assert (await sidecar.post(SINGLE, EXAMPLE_EVENT))[0] == 202
    os.unlink(sidecar.config.spool.path)
    status, body = await sidecar.post(SINGLE, EXAMPLE_EVENT)
    assert status == 503 and body["error"]["code"] == "SPOOL_UNAVAILABLE"
    # Committed, into a file found gone just after: not "nothing was stored".
    assert "may be kept or lost" in body["error"]["message"]
    status, body = await sidecar.post(SINGLE, EXAMPLE_EVENT)  # refused before the commit
    assert "nothing was stored" in body["error"]["message"]
    status, ready = await sidecar.get("/readyz")
    assert status == 503 and ready["status"] == "spool_unwritable"


async def raw_post(
    sidecar: Sidecar, path: str, headers: bytes, body: bytes,
    content_type: bytes = b"application/json",
) -> tuple[int, Any]:
    """A request written byte for byte: header values no HTTP client would send."""
    status, _, answer = await raw_request(sidecar, (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: " + content_type + b"\r\n" + headers
        + b"Content-Length: %d\r\n\r\n" % len(body) + body
    ))
    return status, answer


async def raw_request(sidecar: Sidecar, request: bytes) -> tuple[int, dict[str, str], Any]:
    """Bytes sent as they are, the answer read until the sidecar closes the connection
    (Connection: close, or a refusal of bytes that are not valid HTTP): (status, headers,
    the JSON body, or None for another type)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.server.port)
    writer.write(request)
    # Bounded: the bug this guards against left requests unanswered for ever.
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    is_json = headers.get("Content-Type", "").startswith("application/json")
    return int(lines[0].split()[1]), headers, orjson.loads(payload) if is_json else None


async def json_after(reader: asyncio.StreamReader, head: bytes) -> Any:
    """The JSON body of the answer whose ``head`` was just read, by its length: after a
    refusal aiohttp keeps reading what the client may still send for a while before it
    closes the connection."""
    length_line = next(line for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:"))
    return orjson.loads(
        await asyncio.wait_for(reader.readexactly(int(length_line.split(b":")[1])), 30))


async def expecting_continue(
    sidecar: Sidecar, headers: bytes, body: bytes, length: int | None = None,
    expect: bytes = b"100-continue",
) -> tuple[bytes, int, Any]:
    """A request sent with ``Expect: 100-continue``, its body only once the sidecar says
    continue: (the interim answer, or b"" if none, the final status, its JSON)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.server.port)
    writer.write(
        b"POST " + SINGLE.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nExpect: " + expect + b"\r\n" + headers
        + b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length)
    )
    # Bounded: a sidecar waiting for a body that is never sent would hang here.
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    interim = b""
    if head.startswith(b"HTTP/1.1 100 "):
        interim = head
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    answer = await json_after(reader, head)
    writer.close()
    return interim, int(head.split()[1]), answer


async def test_expect_100_continue_is_refused_before_the_upload(
    start_sidecar: StartSidecar,
) -> None:
    """curl sends ``Expect: 100-continue`` for bodies from 1 MiB: a request refused anyway
    (too large, no token) got "100 Continue", uploaded its whole body, then the refusal."""
    token = "ingest-token-0123456789"
    sidecar = await start_sidecar(
        server={"ingest_token": token, "max_body_bytes": 2048}, upstream={"api_key_file": ""})
    auth = f"x-api-key: {token}\r\n".encode()
    interim, status, answer = await expecting_continue(sidecar, auth, b"", length=10**9)
    assert (interim, status) == (b"", 413)
    assert answer["error"]["details"] == {"max_body_bytes": 2048}
    interim, status, answer = await expecting_continue(sidecar, b"", b"", length=100)
    assert (interim, status, answer["error"]["code"]) == (b"", 401, "INVALID_API_KEY")
    interim, status, answer = await expecting_continue(
        sidecar, auth, orjson.dumps(EXAMPLE_EVENT))
    assert interim.startswith(b"HTTP/1.1 100 Continue") and status == 202
    assert answer == {"accepted": 1, "ids": [1]}
    interim, status, answer = await expecting_continue(
        sidecar, auth, b"", length=100, expect=b"200-ok")
    assert (interim, status, answer["error"]["code"]) == (b"", 417, "EXPECTATION_FAILED")
    _, metrics = await sidecar.get("/metrics")
    for reason in ("too_large", "unauthorized", "invalid_body"):
        assert f'precogx_sidecar_events_rejected_total{{reason="{reason}"}} 1.0' in metrics


async def test_header_bytes_that_are_not_utf8_get_a_clear_4xx(
    start_sidecar: StartSidecar,
) -> None:
    """An Idempotency-Key of such bytes reached SQLite as a lone surrogate, and the error
    killed the spool's writer: every later request hung. A token of them was a 500, and
    so was such a Content-Type, echoed in the 415's message."""
    token = "ingest-token-0123456789"
    sidecar = await start_sidecar(server={"ingest_token": token}, upstream={"api_key_file": ""})
    auth = f"x-api-key: {token}\r\n".encode()
    body = orjson.dumps(EXAMPLE_EVENT)
    status, answer = await raw_post(sidecar, SINGLE, auth + b"Idempotency-Key: \xff\r\n", body)
    assert status == 400 and answer["error"]["code"] == "INVALID_IDEMPOTENCY_KEY"
    for bad in (b"x-api-key: \xff\xfe\r\n", b"Authorization: Bearer \xff\r\n"):
        status, answer = await raw_post(sidecar, SINGLE, bad, body)
        assert status == 401 and answer["error"]["code"] == "INVALID_API_KEY"
    status, answer = await raw_post(sidecar, SINGLE, auth, body, b"application/json\xff")
    assert status == 415 and answer["error"]["code"] == "UNSUPPORTED_MEDIA_TYPE"  # was a 500
    assert answer["error"]["message"].endswith("got application/json\\udcff")
    status, _ = await raw_post(sidecar, SINGLE, auth, body)
    assert status == 202


async def test_a_client_gone_before_its_body_ends_is_counted_not_logged_as_an_error(
    sidecar: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller that gives up mid-body (a Dify node timing out) is no server error: it
    was logged with a traceback at ERROR for every such request."""
    receiver = sidecar.server.receiver
    read = receiver._read
    finished = asyncio.Event()

    async def reading(request: Any) -> bytes:
        try:
            return await read(request)
        finally:
            finished.set()

    receiver._read = reading  # type: ignore[method-assign]
    await sidecar.post_cut_off(SINGLE, b"", b'{"agentId"')
    await asyncio.wait_for(finished.wait(), 30)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_rejected_total{reason="invalid_body"} 1.0' in metrics
    assert stored_rows(sidecar) == []


@pytest.mark.parametrize(("request_bytes", "status", "code", "says"), [
    (b"POST " + SINGLE.encode() + b" HTTP/1.1\r\nHost: x\r\nBad Header: secret-value-7\r\n"
     b"Content-Length: 2\r\n\r\n{}", 400, "MALFORMED_REQUEST", "Invalid header token"),
    (b"POST " + SINGLE.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Type: application/json\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400,
     "MALFORMED_REQUEST", "chunk size"),
    (b"POST " + SINGLE.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\n"
     b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", 415,
     "UNSUPPORTED_CONTENT_ENCODING", "gzip or deflate"),
])
async def test_what_aiohttp_cannot_parse_is_refused_in_the_api_error_body(
    sidecar: Sidecar, request_bytes: bytes, status: int, code: str, says: str,
) -> None:
    """aiohttp answered these itself, in plain text quoting the request's bytes back."""
    got, headers, answer = await raw_request(sidecar, request_bytes)
    assert (got, headers["Content-Type"]) == (status, "application/json")
    assert answer["error"]["code"] == code and says in answer["error"]["message"]
    assert "secret-value" not in str(answer) and "\n" not in answer["error"]["message"]
    reason = "invalid_body" if status == 415 else "malformed_request"
    _, metrics = await sidecar.get("/metrics")
    assert f'precogx_sidecar_events_rejected_total{{reason="{reason}"}} 1.0' in metrics
    assert stored_rows(sidecar) == []


@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"POST " + SINGLE.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(EVENT_BYTES)
    + EVENT_BYTES,
    b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n",  # refused by aiohttp's parser
])
async def test_answers_name_no_versions(sidecar: Sidecar, request_bytes: bytes) -> None:
    """aiohttp's Server header named Python's version and its own."""
    status, headers, _ = await raw_request(sidecar, request_bytes)
    assert status in (200, 202, 400, 404)
    assert headers["Server"] == "precogx-sidecar"


async def test_what_aiohttp_cannot_parse_never_echoes_a_token(
    start_sidecar: StartSidecar,
) -> None:
    """aiohttp's description of the fault may quote the request, and cut to length (as it
    was), a masked token can come out half readable: only plain words are passed on."""
    token = "tok-SECRET-0123456789"
    sidecar = await start_sidecar(server={"ingest_token": token})
    for request_line in (b"CONNECT " + b"a" * 190 + b">" + token.encode() + b":9 HTTP/1.1",
                         b"GET /" + token.encode() + b" HTTP/9.9",
                         b"G\x01T / HTTP/1.1", b"GET /x" + token.encode() + b"\x7f HTTP/1.1"):
        status, _, answer = await raw_request(sidecar, request_line + b"\r\nHost: x\r\n\r\n")
        assert status == 400 and answer["error"]["code"] == "MALFORMED_REQUEST", answer
        assert re.fullmatch(r"the request is not valid HTTP: [A-Za-z ]+",
                            answer["error"]["message"]), answer
        assert "SECRET" not in str(answer)


@pytest.mark.parametrize("error", [
    BadStatusLine("GET /tok-SECRET-0123456789 HTTP/9.9"),
    InvalidURLError("Invalid URL /tok-SECRET-0123456789"),
    BadHttpMessage("a" * 190 + ">tok-SECRET-0123456789"),
    TransferEncodingError("Not enough data for satisfy transfer length header."),
    LineTooLong("Status line is too long", "8190", "9000"),
])
def test_only_plain_words_of_aiohttp_s_messages_are_passed_on(error: BadHttpMessage) -> None:
    """aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS, or no wheel for the platform)
    quotes the request line or target in its messages."""
    rejection = app_module.protocol_rejection(400, error, error.message)
    assert re.fullmatch(r"the request is not valid HTTP: [A-Za-z ]+", rejection.message)
    assert "SECRET" not in rejection.message


async def test_a_body_that_does_not_decode_as_its_encoding_says_gets_400(
    sidecar: Sidecar,
) -> None:
    """A corrupt deflate body, refused by aiohttp as it parses, is no unsupported encoding."""
    body = zlib.compress(orjson.dumps(EXAMPLE_EVENT))[:-6]
    status, answer = await raw_post(sidecar, SINGLE, b"Content-Encoding: deflate\r\n", body)
    assert status == 400 and answer["error"]["code"] == "INVALID_BODY", answer
    assert stored_rows(sidecar) == []


@pytest.mark.parametrize("rest", [
    b"",  # the client stalls mid-body
    b"zz\r\n",  # a bad chunk size after the first packet: aiohttp never tells the reader
])
async def test_a_body_that_stops_coming_gets_400_after_body_timeout_s(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch, rest: bytes,
) -> None:
    sidecar = await start_sidecar(server={"body_timeout_s": 0.2})
    receiver, reading = sidecar.server.receiver, asyncio.Event()
    read = receiver._read

    async def watched(request: Any) -> bytes:
        reading.set()
        return await read(request)

    monkeypatch.setattr(receiver, "_read", watched)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.server.port)
    writer.write(b"POST " + SINGLE.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\n{\"age\r\n")
    await reading.wait()  # the headers and the first chunk are in
    writer.write(rest)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    answer = await json_after(reader, head)
    writer.close()
    assert head.startswith(b"HTTP/1.1 400 ")
    assert answer["error"]["code"] == "INVALID_BODY"
    assert "server.body_timeout_s = 0.2 s" in answer["error"]["message"]
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_rejected_total{reason="invalid_body"} 1.0' in metrics
    assert stored_rows(sidecar) == []


async def test_a_handler_failing_after_the_client_left_is_counted(
    sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiohttp forgets its server once the connection is lost: the 500 was neither
    counted (no alert) nor logged as itself, but as an AssertionError of ours."""
    reading, go_on, logged = asyncio.Event(), asyncio.Event(), asyncio.Event()
    failures: list[logging.LogRecord] = []

    async def read_then_fail(request: Any) -> bytes:
        reading.set()
        await go_on.wait()
        raise RuntimeError("a bug")

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            failures.append(record)
            logged.set()

    lost = asyncio.Event()
    connection_lost = app_module._Connection.connection_lost

    def losing(self: web.RequestHandler, exc: BaseException | None) -> None:
        connection_lost(self, exc)
        lost.set()

    watch = Watch(logging.ERROR)
    logging.getLogger("aiohttp").addHandler(watch)
    try:
        monkeypatch.setattr(sidecar.server.receiver, "_read", read_then_fail)
        monkeypatch.setattr(app_module._Connection, "connection_lost", losing)
        _, writer = await asyncio.open_connection("127.0.0.1", sidecar.server.port)
        writer.write(b"POST " + SINGLE.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        await reading.wait()
        writer.close()
        await lost.wait()  # aiohttp has let go of the connection: then the handler fails
        go_on.set()
        await asyncio.wait_for(logged.wait(), 30)
    finally:
        logging.getLogger("aiohttp").removeHandler(watch)
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == ["a bug"]
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_rejected_total{reason="internal_error"} 1.0' in metrics


async def test_a_failing_handler_answers_500_in_the_api_error_body(
    sidecar: Sidecar, caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug, but the client still learns what it may assume, and the log has the why."""
    def broken(n: int) -> list[int]:
        raise RuntimeError("a bug")

    sidecar.server.spool.allocate_ids = broken  # type: ignore[method-assign]
    status, answer = await sidecar.post(SINGLE, EXAMPLE_EVENT)
    assert status == 500
    assert answer["error"]["code"] == "INTERNAL_ERROR"
    assert "Idempotency-Key" in answer["error"]["message"]
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_rejected_total{reason="internal_error"} 1.0' in metrics


async def test_a_body_that_does_not_decode_gets_400(sidecar: Sidecar) -> None:
    status, answer = await raw_post(sidecar, SINGLE, b"Content-Encoding: gzip\r\n", b"garbage")
    assert status == 400
    assert answer["error"]["code"] == "INVALID_BODY" and "gzip" in answer["error"]["message"]
    assert "\n" not in answer["error"]["message"]
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_rejected_total{reason="invalid_body"} 1.0' in metrics
