"""Leak hunt: where a secret or a value redaction should remove could escape.

Every test runs a real sidecar (in-process on real sockets, or as a process) against the
fake PrecogX. Tests marked xfail(strict=True) show a leak that exists today: each asserts
the behaviour the README promises, and its reason names the cause.
"""

from __future__ import annotations

import asyncio
import copy
import html
import logging
import os
import re
import signal
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import (
    EXAMPLE_EVENT,
    ROOT,
    TEST_KEY,
    Sidecar,
    StartSidecar,
    sidecar_command,
    sidecar_sections,
    write_config,
)
from tests.fake_precogx import FakePrecogX, Respond, error_body

SINGLE = "/api/v1/integrations/dify/telemetry"
BATCH = "/api/v1/telemetry/batch"
DIFY = "/dify/extension"
OPENAI = "sk-proj-Qw8eRt5yUi2oPa7sDf4gHj1kLz9xCv6bNm3"
INGEST_TOKEN = "ingest-token-leakhunt-0123456789"
EXT_TOKEN = "ext-token-leakhunt-0123456789"
HMAC_KEY = "hmac-key-leakhunt-0123456789abcdef"
# A truncated paste: without an END line everything after BEGIN is key material.
PRIVATE_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAv1x2y3z4KEYMATERIALxyz\n"
KEY_MATERIAL = "MIIEowIBAAKCAQEAv1x2y3z4KEYMATERIALxyz"
JSON = {"Content-Type": "application/json"}


def event(**fields: Any) -> dict[str, Any]:
    e: dict[str, Any] = copy.deepcopy(EXAMPLE_EVENT)
    e.update(fields)
    return e


def spool_bytes(sidecar: Sidecar) -> bytes:
    """Every byte of the spool file and its WAL."""
    path = Path(sidecar.config.spool.path)
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRECOGX_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


async def stored_and_sent(sidecar: Sidecar, fake: FakePrecogX, n: int) -> bytes:
    """What the spool file holds and what the upstream got, once n events arrived."""
    await fake.wait_for_received(n)
    return spool_bytes(sidecar) + b"".join(r.body for r in fake.requests)


async def dify(sidecar: Sidecar, point: str, params: dict[str, Any]) -> tuple[int, Any]:
    return await sidecar.post(
        DIFY, data=orjson.dumps({"point": point, "params": params}),
        headers={"Authorization": f"Bearer {EXT_TOKEN}", **JSON},
    )


# -- refusals: error bodies, nothing stored ------------------------------------------


async def test_refusals_echo_no_secret_and_store_nothing(
    start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sidecar = await start_sidecar(server={"ingest_token": INGEST_TOKEN, "max_body_bytes": 2048})
    auth = {"x-api-key": INGEST_TOKEN, **JSON}
    leaky = orjson.dumps(event(metadata={"k": OPENAI}))
    cases: list[tuple[int, bytes, dict[str, str]]] = [
        (401, leaky, {"x-api-key": TEST_KEY, **JSON}),  # the upstream key as a wrong token
        (401, leaky, {"Authorization": f"Basic {INGEST_TOKEN}", **JSON}),
        (415, leaky, {"x-api-key": INGEST_TOKEN, "Content-Type": "text/html"}),
        (400, b'{"agentId": "a", "prompt": "' + OPENAI.encode() + b'" x}', auth),
        (400, b'{"prompt": "' + OPENAI.encode() + b'", "response": "r"}', auth),
        (400, orjson.dumps(event(prompt=5, metadata={"k": OPENAI})), auth),
        (400, orjson.dumps({"interactions": [event(metadata={"k": OPENAI}), 7]}), auth),
        (400, leaky, {**auth, "Idempotency-Key": OPENAI * 10}),
        (413, orjson.dumps(event(prompt=OPENAI * 100)), auth),
    ]
    cases += [
        # What the answer echoes of the request: the Content-Type, the path, a form field.
        (415, leaky, {**auth, "Content-Type": f"x/{INGEST_TOKEN}"}),
        (404, leaky, {**auth, "path": f"/api/v1/{INGEST_TOKEN}"}),
        # Cut to 200 characters where the token starts: the cut must not unmask it.
        (404, leaky, {**auth, "path": "/" + "a" * 190 + INGEST_TOKEN}),
        (400, f"agentId=a&prompt=p&response=r&{TEST_KEY}=1".encode(),
         {**auth, "Content-Type": "application/x-www-form-urlencoded"}),
    ]
    for status, body, headers in cases:
        path = BATCH if b"interactions" in body else SINGLE
        path = headers.pop("path", path)
        got, answer = await sidecar.post(path, data=body, headers=headers)
        assert got == status, (status, answer)
        text = orjson.dumps(answer)
        for secret in (OPENAI, INGEST_TOKEN, TEST_KEY):
            assert secret.encode() not in text, (status, secret)
            assert secret[:8].lower().encode() not in text.lower(), (status, secret)
    assert sidecar.server.spool.counts.pending == 0
    blob = spool_bytes(sidecar)
    assert OPENAI.encode() not in blob and INGEST_TOKEN.encode() not in blob
    logged = "".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert OPENAI not in logged and INGEST_TOKEN not in logged and TEST_KEY not in logged


async def test_health_readiness_and_metrics_hold_no_secret(
    start_sidecar: StartSidecar, fake: FakePrecogX, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRECOGX_SIDECAR_REDACTION_HMAC_KEY", HMAC_KEY)
    sidecar = await start_sidecar(
        server={"ingest_token": INGEST_TOKEN},
        dify={"extension_token": EXT_TOKEN},
        redaction={"rules": [{"name": "user", "path": "userId", "action": "hash"}]},
    )
    headers = {"x-api-key": INGEST_TOKEN, **JSON}
    status, _ = await sidecar.post(SINGLE, data=orjson.dumps(event(prompt=OPENAI)),
                                   headers=headers)
    assert status == 202
    await sidecar.post(SINGLE, data=b"{", headers={"x-api-key": "wrong-" + OPENAI, **JSON})
    await fake.wait_for_received(1)
    pages = [await sidecar.get(p) for p in ("/healthz", "/readyz", "/metrics")]
    text = "".join(str(body) for _, body in pages)
    for secret in (OPENAI, INGEST_TOKEN, EXT_TOKEN, HMAC_KEY, TEST_KEY, "user-789"):
        assert secret not in text, secret


# -- JSON shapes on the receive path ---------------------------------------------------


async def test_escaped_duplicated_and_plain_text_bodies_are_masked(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar = await start_sidecar()
    escaped = OPENAI.replace("s", "\\u0073").replace("-", "\\u002d")
    bodies = [
        # \u escapes hide the trigger literal from the raw pre-check.
        b'{"agentId":"a","prompt":"key ' + escaped.encode() + b'","response":"r"}',
        # Duplicate keys: the parser keeps the last, which is what is checked and stored.
        b'{"agentId":"a","prompt":"ok","prompt":"' + OPENAI.encode() + b'","response":"r"}',
        # A nested agentId is scanned (only the top-level one is not).
        orjson.dumps(event(metadata={"agentId": OPENAI, "deep": [[[{"x": OPENAI}]]]})),
    ]
    for body in bodies:
        status, answer = await sidecar.post(SINGLE, data=body, headers={
            "Content-Type": "text/plain; charset=utf-8"})
        assert status == 202, answer
    blob = await stored_and_sent(sidecar, fake, len(bodies))
    assert OPENAI.encode() not in blob
    assert escaped.encode() not in blob


async def test_idempotent_repeat_answers_without_echo(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar()
    body = orjson.dumps(event(prompt=OPENAI))
    headers = {"Idempotency-Key": "run-1", **JSON}
    first = await sidecar.post(SINGLE, data=body, headers=headers)
    again = await sidecar.post(SINGLE, data=body, headers=headers)
    assert first == again and first[0] == 202
    assert OPENAI not in str(again[1])
    reused = await sidecar.post(SINGLE, data=orjson.dumps(event(prompt="x" + OPENAI)),
                                headers=headers)
    assert reused[0] == 422 and OPENAI not in str(reused[1])
    assert sidecar.server.spool.counts.pending <= 1


async def test_deeply_nested_event_is_refused_without_storing(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar = await start_sidecar()
    # orjson reads 1024 levels but writes only 255: the stored event cannot be written.
    inner = b"[" * 300 + orjson.dumps(OPENAI) + b"]" * 300
    for prompt in (b'"p"', b'"\\u0070"'):  # a \u escape: credentials checked per event
        body = (b'{"agentId":"a","prompt":' + prompt + b',"response":"r","metadata":{"d":'
                + inner + b"}}")
        status, answer = await sidecar.post(SINGLE, data=body, headers=JSON)
        assert status == 400, answer
        assert answer["error"]["code"] == "INVALID_FIELD_TYPE"
        assert "cannot be stored" in answer["error"]["message"]
        assert OPENAI not in str(answer)
    assert OPENAI.encode() not in spool_bytes(sidecar)
    assert not fake.requests


# -- rules that a marker-shaped text switches off ---------------------------------------


async def test_region_pattern_covering_a_masked_credential(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar = await start_sidecar(redaction={"rules": [
        {"name": "notes", "patterns": ["ACCOUNT NOTE: [^\\n]+"], "action": "mask"}]})
    prompt = f"ACCOUNT NOTE: John Q. Customer owes 5000, key {OPENAI}"
    status, _ = await sidecar.post(SINGLE, data=orjson.dumps(event(prompt=prompt)),
                                   headers=JSON)
    assert status == 202
    blob = await stored_and_sent(sidecar, fake, 1)
    assert OPENAI.encode() not in blob
    assert b"John Q. Customer" not in blob


async def test_credential_inside_a_fake_marker(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar = await start_sidecar()
    status, _ = await sidecar.post(
        SINGLE, data=orjson.dumps(event(prompt=f"use [REDACTED:{OPENAI}] please")),
        headers=JSON)
    assert status == 202
    assert OPENAI.encode() not in await stored_and_sent(sidecar, fake, 1)


@pytest.mark.parametrize("sent", [
    # No rule hashes, so "hmac:..." is no pseudonym of this configuration.
    pytest.param(event(prompt="card hmac:4111111111111111 thanks"), id="after-hmac-prefix"),
    pytest.param(event(metadata={"card": 4111111111111111}, toolCalls=[
        {"name": "pay", "input": {"card": 4111111111111111}}]),
        id="as-json-number"),
])
async def test_card_number_written_oddly(
    start_sidecar: StartSidecar, fake: FakePrecogX, sent: dict[str, Any]
) -> None:
    sidecar = await start_sidecar(redaction={"rules": [
        {"name": "cards", "detectors": ["credit_card"], "action": "mask"}]})
    status, _ = await sidecar.post(SINGLE, data=orjson.dumps(sent), headers=JSON)
    assert status == 202
    assert b"4111111111111111" not in await stored_and_sent(sidecar, fake, 1)


# -- the Dify extension ---------------------------------------------------------------


async def with_extension(start_sidecar: StartSidecar, rule: dict[str, Any]) -> Sidecar:
    """A sidecar answering Dify's extension calls, pairing them quickly, with one rule."""
    return await start_sidecar(
        dify={"extension_token": EXT_TOKEN, "pair_idle_s": 0.05, "input_wait_s": 0.2},
        redaction={"rules": [rule]},
    )


async def test_dify_inline_rule_masks_what_the_model_sees(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar = await with_extension(
        start_sidecar, {"name": "pii", "detectors": ["email"], "action": "mask", "inline": True}
    )
    status, answer = await dify(sidecar, "app.moderation.input", {
        "app_id": "a1", "query": "mail jane@example.com", "inputs": {"to": "bob@example.org"}})
    assert status == 200 and answer["action"] == "overridden"
    assert "jane@example.com" not in str(answer) and "bob@example.org" not in str(answer)
    await dify(sidecar, "app.moderation.output", {"app_id": "a1", "text": f"ok {OPENAI}"})
    blob = await stored_and_sent(sidecar, fake, 1)
    for secret in (b"jane@example.com", b"bob@example.org", OPENAI.encode()):
        assert secret not in blob


async def test_dify_inputs_without_query_meet_an_inputs_rule(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar = await with_extension(
        start_sidecar, {"name": "ssn", "path": "metadata.inputs.ssn", "action": "mask"}
    )
    status, _ = await dify(sidecar, "app.moderation.input", {
        "app_id": "a2", "query": "", "inputs": {"ssn": "078-05-1120"}})
    assert status == 200
    await dify(sidecar, "app.moderation.output", {"app_id": "a2", "text": "done"})
    assert b"078-05-1120" not in await stored_and_sent(sidecar, fake, 1)


async def test_dify_inline_marker_unmasks_a_private_key(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar = await with_extension(
        start_sidecar, {"name": "pii", "detectors": ["email"], "action": "mask", "inline": True}
    )
    await dify(sidecar, "app.moderation.input", {
        "app_id": "a3", "query": f"{PRIVATE_KEY} mail jane@example.com", "inputs": {}})
    await dify(sidecar, "app.moderation.output", {"app_id": "a3", "text": "noted"})
    assert KEY_MATERIAL.encode() not in await stored_and_sent(sidecar, fake, 1)


# -- what the upstream answers --------------------------------------------------------


# How an upstream's answer may write the key: as it is, or each character escaped by
# JSON ("px\\u005ftest..."), percent-encoded (a URL in the answer) or as an HTML
# character reference (a proxy's error page).
KEY_FORMS: dict[str, Callable[[str], str]] = {
    "plain": lambda c: c,
    "json": lambda c: f"\\u{ord(c):04x}",
    "percent": lambda c: f"%{ord(c):02X}",
    "html": lambda c: f"&#{ord(c)};",
    "html-hex": lambda c: f"&#x{ord(c):x};",
    "html-padded": lambda c: f"&#x{ord(c):04x};",
    "html-no-semicolon": lambda c: "&#95" if c == "_" else c,
    "html-named": lambda c: "&lowbar;" if c == "_" else c,
    "percent-twice": lambda c: f"%25{ord(c):02X}",
    "json-then-percent": lambda c: f"\\u0025{ord(c):02X}",
}


@pytest.mark.parametrize("form", KEY_FORMS)
async def test_upstream_error_echoing_the_key_stays_out_of_dead_letters(
    start_sidecar: StartSidecar, fake: FakePrecogX, form: str
) -> None:
    sidecar = await start_sidecar()
    quoted = "".join(KEY_FORMS[form](c) for c in TEST_KEY)
    body = orjson.dumps(error_body("CONFLICT", "key QUOTED may not use this path"))
    fake.script(Respond(409, body.replace(b"QUOTED", quoted.encode())))
    status, _ = await sidecar.post(SINGLE, data=orjson.dumps(event()), headers=JSON)
    assert status == 202
    spool = sidecar.server.spool
    await asyncio.wait_for(spool.wait_until(lambda: spool.counts.dead == 1), 10)
    config = Path(sidecar.config.spool.path).parent / "sidecar.toml"
    proc = await asyncio.create_subprocess_exec(
        *sidecar_command("dead-letters", "list", "--json", "--config", str(config)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env())
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert b"may not use" in out
    assert TEST_KEY.encode() not in out
    # Read back as text: no escaped form of the key either, nor one a reader can undo.
    error = orjson.loads(out)[0]["error"]
    assert quoted not in error
    for _ in range(4):
        error = html.unescape(urllib.parse.unquote(
            re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m[1], 16)), error)))
    assert TEST_KEY not in error


# -- the command line -----------------------------------------------------------------


def test_check_config_and_redact_print_no_secret(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("px_live_FileKeyLeakHunt0123456789\n")
    hmac_file = tmp_path / "hmac-key"
    hmac_file.write_text(HMAC_KEY + "\n")
    rules = [{"name": "user", "path": "userId", "action": "hash"},
             {"name": "pii", "detectors": ["email"], "action": "mask"}]
    path = write_config(tmp_path, {
        "server": {"ingest_token": INGEST_TOKEN},
        "upstream": {"api_key_file": str(key_file)},
        "redaction": {"hmac_key_file": str(hmac_file), "rules": rules},
        "dify": {"extension_token": EXT_TOKEN},
    })
    secrets = [INGEST_TOKEN, EXT_TOKEN, HMAC_KEY, "px_live_FileKeyLeakHunt0123456789",
               "px_live_EnvKeyLeakHunt0123456789", "env-ingest-token-leakhunt"]
    env_only = tmp_path / "env-only.toml"
    env_only.write_text('[redaction]\n[[redaction.rules]]\nname = "u"\npath = "userId"\n'
                        'action = "hash"\n')
    runs = [
        (["check-config", "--config", str(path)], {}),
        (["check-config", "--config", str(env_only)], {
            "PRECOGX_API_KEY": "px_live_EnvKeyLeakHunt0123456789",
            "PRECOGX_SIDECAR_INGEST_TOKEN": "env-ingest-token-leakhunt",
            "PRECOGX_SIDECAR_REDACTION_HMAC_KEY": HMAC_KEY,
            "PRECOGX_SIDECAR_DIFY_EXTENSION_TOKEN": EXT_TOKEN}),
    ]
    for args, env in runs:
        result = subprocess.run(sidecar_command(*args), cwd=tmp_path, env=clean_env(**env),
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        for secret in secrets:
            assert secret not in result.stdout + result.stderr, (args, secret)
    body = orjson.dumps(event(userId="jane@example.com", prompt=f"{OPENAI} jane@example.com",
                              metadata={"n": [{"m": "jane@example.com"}]}))
    result = subprocess.run(sidecar_command("redact", "--config", str(path), "-"),
                            input=body.decode(), cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "redacted: rule 'user' (hash) at userId" in result.stderr
    for secret in [*secrets, OPENAI, "jane@example.com"]:
        assert secret not in result.stdout + result.stderr, secret


# -- logs of a running process --------------------------------------------------------


async def test_malformed_request_bytes_stay_out_of_the_log(
    tmp_path: Path, fake: FakePrecogX
) -> None:
    sections = sidecar_sections(tmp_path, fake.url, log={"level": "info", "format": "json"})
    config = write_config(tmp_path, sections)
    proc = await asyncio.create_subprocess_exec(
        *sidecar_command("run", "--config", str(config)),
        stderr=asyncio.subprocess.PIPE, env=clean_env())
    assert proc.stderr is not None
    lines: list[bytes] = []
    port = 0
    while not port:
        line = await asyncio.wait_for(proc.stderr.readline(), 15)
        assert line, b"".join(lines)
        lines.append(line)
        if b"listening on http://" in line:
            port = int(line.split(b"listening on http://")[1].split(b":")[1].split(b" ")[0])
    body = b'{"agentId":"a","prompt":"' + OPENAI.encode() + b'","response":"r"}'
    requests = [
        b"POST " + SINGLE.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n" + body + b"\r\n0\r\n\r\n",
        b"POST " + SINGLE.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Note: " + OPENAI.encode()
        + b"\x01\r\nContent-Length: 2\r\n\r\n{}",
    ]
    for raw in requests:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.")
        writer.close()
    proc.send_signal(signal.SIGTERM)
    rest = await asyncio.wait_for(proc.stderr.read(), 15)
    await proc.wait()
    log = b"".join(lines) + rest
    assert proc.returncode == 0
    assert b"Error handling request" in log
    assert OPENAI.encode() not in log


async def test_the_sidecars_own_secrets_in_an_event_never_reach_disk_or_upstream(
    start_sidecar: StartSidecar, fake: FakePrecogX, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user pasting the ingest token (or the API key) into a chat: the built-in
    credential rule knows only their formats, and these were stored and forwarded."""
    monkeypatch.setenv("PRECOGX_SIDECAR_REDACTION_HMAC_KEY", HMAC_KEY)
    sidecar = await start_sidecar(
        server={"ingest_token": INGEST_TOKEN}, dify={"extension_token": EXT_TOKEN},
        redaction={"mask_secrets": False,  # not needed for these: always masked
                   "rules": [{"name": "user", "path": "userId", "action": "hash"}]},
    )
    own = (INGEST_TOKEN, EXT_TOKEN, HMAC_KEY, TEST_KEY)
    prompt = f"my token is {INGEST_TOKEN}, ext={EXT_TOKEN}; key:{HMAC_KEY} and {TEST_KEY}!"
    status, _ = await sidecar.post(SINGLE, data=orjson.dumps(event(prompt=prompt)),
                                   headers={"x-api-key": INGEST_TOKEN, **JSON})
    assert status == 202
    dify = {"Authorization": f"Bearer {EXT_TOKEN}", **JSON}
    for point, params in (("app.moderation.input", {"app_id": "a", "query": prompt}),
                          ("app.moderation.output", {"app_id": "a", "text": prompt})):
        status, _ = await sidecar.post(
            DIFY, data=orjson.dumps({"point": point, "params": params}), headers=dify)
        assert status == 200
    await sidecar.server.dify.stop()  # records the open conversation now
    await fake.wait_for_received(2)
    stored = spool_bytes(sidecar)
    for secret in own:
        assert secret.encode() not in stored
        assert all(secret not in orjson.dumps(r).decode() for r in fake.received)
    assert fake.received[0]["prompt"] == (
        "my token is [REDACTED:sidecar_secret], ext=[REDACTED:sidecar_secret]; "
        "key:[REDACTED:sidecar_secret] and [REDACTED:sidecar_secret]!")


async def test_an_idempotency_key_is_kept_only_as_a_digest(
    start_sidecar: StartSidecar,
) -> None:
    """The key is the client's to choose: one holding a credential sat in the spool for
    a day as sent."""
    sidecar = await start_sidecar(upstream={"api_key_file": ""})
    headers = {"Idempotency-Key": f"run-{OPENAI}", **JSON}
    first = await sidecar.post(SINGLE, data=orjson.dumps(event()), headers=headers)
    assert first[0] == 202
    assert await sidecar.post(SINGLE, data=orjson.dumps(event()), headers=headers) == first
    assert OPENAI.encode() not in spool_bytes(sidecar)
