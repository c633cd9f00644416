"""Redaction in the running sidecar: secrets never reach the spool file or the upstream."""

from __future__ import annotations

import asyncio
import copy
import os
import re
import threading
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.redaction.stage import RedactionStage
from tests.conftest import EXAMPLE_EVENT, ROOT, StartSidecar, sidecar_command, write_config
from tests.fake_precogx import FakePrecogX

SECRETS = {
    "openai": "sk-proj-Zx9aQ2mN7vB4cL1kJ8hG5fD3sA6pO0iU",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "aws_secret": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "webhook": "hooks.slack.com/services/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",
    "github": "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
           "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "email": "jane.doe@example.com",
    "card": "4111 1111 1111 1111",
    "account": "DE89370400440532013000",
    # A line of a PuTTY key's private part, and of a PEM key cut before its END line.
    "putty": "AAAAIGFzZGZhc2RmYXNkZjEyMzQ1Njc4OTBhYmNkZWZnaGlq",
    "pem_line": "MIIEowIBAAKCAQEA75fVnq1Wx2Zc0kS9bT3uV7yW1xZ4aC6dE8fG0hJ2kL4mN6oP",
}
# In order: the account keeps its last four before the IBAN detector would mask it whole.
RULES: list[dict[str, Any]] = [
    {"name": "accounts", "path": "toolCalls[*].input.account", "action": "partial",
     "keep_last": 4},
    {"name": "pii", "detectors": ["email", "credit_card", "iban"], "action": "mask",
     "inline": True},
    {"name": "user", "path": "userId", "action": "hash"},
    {"name": "customer-email", "path": "metadata.customer_email", "action": "remove"},
]
HMAC_KEY = "k3y-for-pseudonyms-0123456789"


def seeded_event(i: int) -> dict[str, Any]:
    e: dict[str, Any] = copy.deepcopy(EXAMPLE_EVENT)
    e["prompt"] = (f"#{i} my key is {SECRETS['openai']} and {SECRETS['aws']}; mail "
                   f"{SECRETS['email']}, card {SECRETS['card']}\n"
                   f'{{"SecretAccessKey": "{SECRETS["aws_secret"]}"}}')
    e["response"] = {"answer": f"token {SECRETS['github']} / {SECRETS['jwt']}",
                     "alerts": f"https://{SECRETS['webhook']}"}
    e["userId"] = "user-42"
    e["metadata"]["customer_email"] = "private@example.org"
    e["toolCalls"] = [
        {"name": "pay", "input": {"account": SECRETS["account"]}},
        {"name": "read_file", "output": {
            "ppk": "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nPrivate-Lines: 1\n"
                   f"{SECRETS['putty']}\nPrivate-MAC: 5f1a2b3c4d5e6f70",
            "pem": ["-----BEGIN RSA PRIVATE KEY-----", SECRETS["pem_line"], "q1Wx2Zc="],
        }},
    ]
    return e


def assert_clean(blob: bytes) -> None:
    for name, secret in SECRETS.items():
        assert secret.encode() not in blob, name
    assert b"private@example.org" not in blob
    assert b"user-42" not in blob


async def test_seeded_secrets_reach_neither_disk_nor_upstream(
    start_sidecar: StartSidecar, fake: FakePrecogX, monkeypatch: Any
) -> None:
    monkeypatch.setenv("PRECOGX_SIDECAR_REDACTION_HMAC_KEY", HMAC_KEY)
    holding = await start_sidecar(redaction={"rules": RULES}, upstream={"api_key_file": ""})
    for i in range(5):
        status, _ = await holding.post("/api/v1/integrations/dify/telemetry", seeded_event(i))
        assert status == 202
    # Counted per hit, and still right after a scrape moved the first counts over.
    _, metrics = await holding.get("/metrics")
    assert 'precogx_sidecar_redactions_total{action="hash",rule="user"} 5.0' in metrics
    status, _ = await holding.post("/api/v1/telemetry/batch",
                                   {"interactions": [seeded_event(i) for i in range(5, 10)]})
    assert status == 202
    _, metrics = await holding.get("/metrics")
    assert 'precogx_sidecar_redactions_total{action="hash",rule="user"} 10.0' in metrics
    assert 'precogx_sidecar_redactions_total{action="mask",rule="pii"} 30.0' in metrics
    await holding.stop()
    spool = Path(holding.config.spool.path)
    assert_clean(b"".join(p.read_bytes() for p in spool.parent.glob(spool.name + "*")))

    sidecar = await start_sidecar(redaction={"rules": RULES})
    await fake.wait_for_received(10)
    assert_clean(b"".join(r.body for r in fake.requests))
    first = fake.received[0]
    assert "[REDACTED:openai_key]" in first["prompt"] and "[REDACTED:email]" in first["prompt"]
    assert first["userId"].startswith("hmac:")
    assert {r["userId"] for r in fake.received} == {first["userId"]}  # stable pseudonym
    assert "customer_email" not in first["metadata"]
    assert first["toolCalls"][0]["input"]["account"].endswith("3000")
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_redactions_total{action="hash",rule="user"}' in metrics


async def test_a_large_body_is_redacted_while_other_requests_are_answered(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """Redaction can take about a second per MiB (the e-mail detector on "a@a@..."), so a
    large body is redacted in a worker thread: here its redaction is held until a small
    request sent meanwhile has its 202. On the event loop, that request could not be
    answered, and the hold would time out. Both are redacted and counted as ever."""
    sidecar = await start_sidecar(
        redaction={"rules": [{"name": "mail", "detectors": ["email"], "action": "mask"}]})
    stage = sidecar.server.receiver.redact
    started, release = threading.Event(), threading.Event()
    released: list[bool] = []

    def held(event: dict[str, Any], possible_secrets: Any = None) -> Any:
        if len(event["prompt"]) > 100_000:
            started.set()
            released.append(release.wait(timeout=10))
        return RedactionStage.apply(stage, event, possible_secrets)

    stage.apply = held  # type: ignore[method-assign]
    path = "/api/v1/integrations/dify/telemetry"
    large = asyncio.create_task(sidecar.post(
        path, {**EXAMPLE_EVENT, "prompt": "x " * 60_000 + "jane@example.com"}))
    assert await asyncio.to_thread(started.wait, 10)
    try:
        status, _ = await sidecar.post(path, {**EXAMPLE_EVENT, "prompt": "mail bob@example.org"})
        assert status == 202
    finally:
        release.set()
    assert (await large)[0] == 202
    assert released == [True]  # let go by the test, not by the timeout
    await fake.wait_for_received(2)
    sent = orjson.dumps(fake.received)
    assert b"bob@example.org" not in sent and b"jane@example.com" not in sent
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_redactions_total{action="mask",rule="mail"} 2.0' in metrics


async def test_inline_rules_override_what_difys_model_sees(
    start_sidecar: StartSidecar, fake: FakePrecogX, monkeypatch: Any
) -> None:
    monkeypatch.setenv("PRECOGX_SIDECAR_REDACTION_HMAC_KEY", HMAC_KEY)
    sidecar = await start_sidecar(
        redaction={"rules": RULES},
        dify={"extension_token": "ext-key-1", "pair_idle_s": 0.05, "input_wait_s": 0.1},
    )
    body = {"point": "app.moderation.input", "params": {
        "app_id": "app-9", "inputs": {"contact": SECRETS["email"]},
        "query": f"charge card {SECRETS['card']} please"}}
    status, answer = await sidecar.post(
        "/dify/extension", data=orjson.dumps(body),
        headers={"Authorization": "Bearer ext-key-1", "Content-Type": "application/json"},
    )
    assert status == 200
    assert (answer["flagged"], answer["action"]) == (True, "overridden")
    assert answer["query"] == "charge card [REDACTED:credit_card] please"
    assert answer["inputs"] == {"contact": "[REDACTED:email]"}
    await fake.wait_for_received(1)
    assert_clean(fake.requests[0].body)


async def test_clean_input_is_not_overridden(
    start_sidecar: StartSidecar, monkeypatch: Any
) -> None:
    monkeypatch.setenv("PRECOGX_SIDECAR_REDACTION_HMAC_KEY", HMAC_KEY)
    sidecar = await start_sidecar(redaction={"rules": RULES}, dify={"extension_token": "ext-key-1"})
    body = {"point": "app.moderation.input",
            "params": {"app_id": "a", "inputs": {}, "query": "hello"}}
    _, answer = await sidecar.post(
        "/dify/extension", data=orjson.dumps(body),
        headers={"Authorization": "Bearer ext-key-1", "Content-Type": "application/json"},
    )
    assert answer["flagged"] is False


async def run_cli(tmp_path: Path, *args: str, stdin: bytes = b"",
                  env: dict[str, str] | None = None) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PRECOGX_")}
    base["PYTHONPATH"] = str(ROOT)
    proc = await asyncio.create_subprocess_exec(
        *sidecar_command(*args), cwd=tmp_path, env={**base, **(env or {})},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_redact_command_shows_the_stored_event_and_the_hits(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"redaction": {"rules": RULES}})
    env = {"PRECOGX_SIDECAR_REDACTION_HMAC_KEY": HMAC_KEY}
    code, out, err = await run_cli(tmp_path, "redact", "--config", str(config),
                                   stdin=orjson.dumps(seeded_event(1)), env=env)
    assert code == 0, err
    assert_clean(out.encode() + err.encode())
    stored = orjson.loads(out)
    assert stored["userId"].startswith("hmac:")
    assert "redacted: rule 'builtin-secrets' (mask) at prompt" in err
    assert "redacted: rule 'user' (hash) at userId" in err
    assert "redacted: rule 'customer-email' (remove) at metadata.customer_email" in err
    assert HMAC_KEY not in out + err


async def test_redact_command_masks_the_sidecars_own_secrets_as_the_sidecar_does(
    tmp_path: Path,
) -> None:
    token = "ingest-token-for-redact-0123456789"
    config = write_config(tmp_path, {"server": {"ingest_token": token}})
    event = {"agentId": "a", "prompt": f"the token is {token}", "response": "r"}
    code, out, err = await run_cli(tmp_path, "redact", "--config", str(config),
                                   stdin=orjson.dumps(event))
    assert code == 0, err
    assert orjson.loads(out)["prompt"] == "the token is [REDACTED:sidecar_secret]"


async def test_redact_command_reads_a_file_and_refuses_bad_events(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_bytes(orjson.dumps({"agentId": "a", "prompt": "p"}))
    code, out, err = await run_cli(tmp_path, "redact", str(event))
    assert (code, out) == (1, "")
    assert "response is required" in err
    event.write_bytes(b"{nope")
    code, _, err = await run_cli(tmp_path, "redact", str(event))
    assert code == 1 and "not valid JSON" in err


async def test_bad_rules_stop_start_and_check_config_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"redaction": {"rules": [
        {"name": "x", "detectors": ["emial"], "action": "mask"}]}})
    for command in ("check-config", "run"):
        code, _, err = await run_cli(tmp_path, command, "--config", str(config))
        assert code == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "unknown detector 'emial'" in lines[0], err


async def test_hash_without_key_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"redaction": {"rules": [
        {"name": "u", "path": "userId", "action": "hash"}]}})
    code, _, err = await run_cli(tmp_path, "check-config", "--config", str(config))
    assert code == 1 and "PRECOGX_SIDECAR_REDACTION_HMAC_KEY" in err


async def test_hmac_key_in_the_config_file_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"redaction": {"hmac_key": "do-not-put-me-here"}})
    code, out, err = await run_cli(tmp_path, "check-config", "--config", str(config))
    assert code == 1
    assert "must not be set in" in err and "do-not-put-me-here" not in out + err


async def test_check_config_lists_the_rules(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"redaction": {"rules": RULES}})
    code, out, err = await run_cli(tmp_path, "check-config", "--config", str(config),
                                   env={"PRECOGX_SIDECAR_REDACTION_HMAC_KEY": HMAC_KEY})
    assert code == 0, err
    assert "# rules: 4 configured" in out
    for rule in ("builtin-secrets", "accounts", "pii", "user", "customer-email"):
        assert f"#   {rule}" in out
    assert HMAC_KEY not in out


SECRET_EXAMPLES = {
    "jwt": SECRETS["jwt"],
    "precogx_key": "px_live_abcdefghijklmnop1234",
    "openai_key": SECRETS["openai"],
    "aws_access_key": SECRETS["aws"],
    "aws_secret_key": "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "github_token": SECRETS["github"],
    "slack_token": "xoxb-123456789012-abcdefghijkl",
    "slack_webhook": "https://hooks.slack.com/services/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",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----",
}


# Each detector's literals: the fast check must name exactly the detectors whose literal
# a body holds, so that the credential rule can be narrowed to them.
TRIGGER_LITERALS = {
    "jwt": [b"eyJ"],
    "precogx_key": [b"px_live_", b"px_test_"],
    "openai_key": [b"sk-"],
    "aws_access_key": [b"AKIA", b"ASIA"],
    "aws_secret_key": [b"secret_access_key", b"SECRET_ACCESS_KEY", b"SecretAccessKey",
                       b"secretAccessKey"],
    "github_token": [b"github_pat_", *(b"gh%c_" % c for c in b"pousr")],
    "slack_token": [*(b"xox%c-" % c for c in b"abeprs"), b"xapp-"],
    "slack_webhook": [b"hooks.slack.com/", b"hooks.slack.com\\/"],  # JSON may write "\/"
    "private_key": [b"-----BEGIN", b"PuTTY-User-Key-File-", b"---- BEGIN SSH2 "],
}
# All of them at once, as the pre-check must find them: one regex, slow but plain.
TRIGGER_REGEX = re.compile(b"|".join(
    re.escape(literal) for literals in TRIGGER_LITERALS.values() for literal in literals))


def test_secret_triggers_cover_every_credential_detector() -> None:
    """The cheap pre-check may only skip events that no credential detector would hit."""
    from sidecar.redaction import DETECTORS, SECRET_DETECTORS

    assert set(SECRET_EXAMPLES) == set(SECRET_DETECTORS)  # a new detector needs a trigger
    for name, example in SECRET_EXAMPLES.items():
        assert DETECTORS[name].find(f"see {example} here"), name
        assert TRIGGER_REGEX.search(orjson.dumps({"prompt": f"see {example} here"})), name


# Bytes of the trigger literals and their neighbours, so random bodies hold near misses
# ("sk_", "xoxz-", "px_x", "-----BEGON") as often as hits.
_TRIGGER_ALPHABET = b"eyJpx_livetsk-AKIASghpousrbtxoxa-----BEGINZ9 \""


@settings(max_examples=3000, database=None, deadline=None)
@given(st.lists(st.sampled_from(_TRIGGER_ALPHABET), max_size=40).map(bytes))
def test_the_fast_trigger_check_agrees_with_the_trigger_regex(body: bytes) -> None:
    from sidecar.redaction.stage import secret_detectors_in

    assert bool(secret_detectors_in(body)) == (TRIGGER_REGEX.search(body) is not None)


# Pieces of long bodies: each literal, and the near misses left by cutting its first or
# last byte off; the bytes the check hops between; filler.
_LONG_BODY_PIECES = sorted({
    piece
    for literals in TRIGGER_LITERALS.values() for literal in literals
    for piece in (literal, literal[1:], literal[:-1])
} | {b"J", b"_", b"-", b"A", b"/", b"x" * 40, b" " * 700})


@settings(max_examples=400, database=None, deadline=None)
@given(st.lists(st.sampled_from(_LONG_BODY_PIECES), max_size=60).map(b"".join))
def test_the_fast_trigger_check_agrees_with_the_trigger_regex_on_long_bodies(
    text: bytes,
) -> None:
    """Past stage._HOP_FROM bytes the check hops from one place a group's byte occurs to
    the next, handing over to the regex's scan where they lie close: it must still name
    exactly the detectors whose literals the body holds, and no later start."""
    from sidecar.redaction import SECRET_DETECTORS
    from sidecar.redaction.stage import _HOP_FROM, secret_triggers_in

    body = b" " * _HOP_FROM + text
    names, start = secret_triggers_in(body)
    expected = [name for name in SECRET_DETECTORS
                if any(literal in body for literal in TRIGGER_LITERALS[name])]
    assert list(names) == expected
    first = TRIGGER_REGEX.search(body)
    assert start <= (first.start() if first else len(body))


def test_the_fast_trigger_check_names_each_detector_by_its_literals() -> None:
    from sidecar.redaction import SECRET_DETECTORS
    from sidecar.redaction.stage import secret_detectors_in

    assert list(TRIGGER_LITERALS) == list(SECRET_DETECTORS)
    for name, literals in TRIGGER_LITERALS.items():
        for literal in literals:
            for body in (literal, b"x" + literal, literal + b"x", b'{"a":"' + literal + b'"}'):
                assert secret_detectors_in(body) == (name,), body
            assert secret_detectors_in(literal[:-1]) == (), literal
    every = b" ".join(literals[-1] for literals in reversed(TRIGGER_LITERALS.values()))
    assert secret_detectors_in(every) == SECRET_DETECTORS  # in catalogue order, once each
    # Literals sharing one byte of the body: both named.
    assert secret_detectors_in(b"sk-----BEGIN") == ("openai_key", "private_key")
    assert secret_detectors_in(b"xoxb-----BEGIN sk-") == (
        "openai_key", "slack_token", "private_key"
    )


def test_the_fast_trigger_check_says_where_credentials_can_start() -> None:
    """No literal starts before the position it gives, nor (in text) does a match."""
    from sidecar.redaction.stage import secret_triggers_in

    for literals in TRIGGER_LITERALS.values():
        for literal in literals:
            for before in (b"", b"x", b"\xc3\xa9" * 4, b"a-b_c A J " * 3):
                body = before + literal + b" " + literal
                names, start = secret_triggers_in(body)
                assert names and 0 <= start <= len(before), body
    assert secret_triggers_in(b"nothing here") == ((), 12)


@settings(max_examples=500, database=None, deadline=None)
@given(st.lists(st.sampled_from([*SECRET_EXAMPLES.values(), "sk-", "x", " ", "_", "-", "J"]),
                max_size=6).map("".join))
def test_only_the_detectors_the_fast_check_names_can_find_anything(text: str) -> None:
    """Narrowing the credential rule to the named detectors loses no match."""
    from sidecar.redaction import DETECTORS, SECRET_DETECTORS
    from sidecar.redaction.stage import secret_detectors_in

    named = secret_detectors_in(orjson.dumps({"prompt": text}))
    for name in SECRET_DETECTORS:
        if name not in named:
            assert DETECTORS[name].find(text) == [], name


async def test_escaped_credentials_in_the_raw_body_are_still_masked(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """The request-wide pre-check must not be fooled by JSON escapes."""
    sidecar = await start_sidecar()
    escaped = SECRETS["openai"].replace("-", "\\u002d", 1)  # "sk\u002dproj-..."
    plain = orjson.dumps({"interactions": [EXAMPLE_EVENT, EXAMPLE_EVENT]}).decode()
    body = plain.replace('"Hello, this', f'"key {escaped} Hello, this', 1).encode()
    status, _ = await sidecar.post("/api/v1/telemetry/batch", data=body,
                                   headers={"Content-Type": "application/json"})
    assert status == 202
    await fake.wait_for_received(2)
    assert_clean(b"".join(r.body for r in fake.requests))
    assert "[REDACTED:openai_key]" in fake.received[0]["prompt"]


# Pieces of text around which masking in the raw body and the walk over the parsed
# event could disagree: escapes before and after a key ("\\n", quotes, backslashes),
# letters glued to it, masks already there, non-ASCII text.
_RAW_PIECES = [
    *SECRET_EXAMPLES.values(), "sk-", "x", "n", " ", "\n", "\t", '"', "\\", "\\n", "-", "J",
    "é", "[REDACTED:jwt]", "eyJ",
]
_raw_texts = st.lists(st.sampled_from(_RAW_PIECES), max_size=5).map("".join)


@settings(max_examples=1500, database=None, deadline=None)
@given(prompt=_raw_texts, inner=_raw_texts, key=_raw_texts, agent=_raw_texts,
       nested_agent=_raw_texts, batch=st.booleans(), indent=st.booleans())
def test_masking_in_the_body_redacts_as_the_walk_over_the_event(
    prompt: str, inner: str, key: str, agent: str, nested_agent: str, batch: bool, indent: bool,
) -> None:
    """What the receive path stores (credentials masked in the body where it can, the rest
    by the narrowed rule) is what the whole credential rule makes of the parsed event,
    with as many redactions counted."""
    from sidecar.metrics import Metrics
    from sidecar.redaction import build_redactor
    from sidecar.redaction.stage import BUILTIN_SECRETS, BUILTIN_SECRETS_RULE, RedactionStage

    whole = build_redactor([BUILTIN_SECRETS], None)
    metrics = Metrics()
    stage = RedactionStage(build_redactor([], None), whole, metrics)
    event: dict[str, Any] = {
        "agentId": agent or "a", "prompt": prompt,
        "response": {"r": [inner, 1, None], key: inner, "m": {"agentId": nested_agent}},
    }
    doc: dict[str, Any] = {"interactions": [event, copy.deepcopy(event)]} if batch else event
    body = orjson.dumps(doc, option=orjson.OPT_INDENT_2 if indent else 0)

    masked, secrets = stage.mask_body(body)
    stored = orjson.loads(masked)
    for item in stored["interactions"] if batch else [stored]:
        stage(item, secrets)

    expected = copy.deepcopy(doc)
    items: list[dict[str, Any]] = expected["interactions"] if batch else [expected]
    hits = sum(len(whole.redact(item)) for item in items)
    assert stored == expected
    metrics.render()
    counted = metrics.registry.get_sample_value(
        "precogx_sidecar_redactions_total", {"rule": BUILTIN_SECRETS_RULE, "action": "mask"}
    )
    assert counted == hits


def test_a_credential_in_a_mask_s_label_is_left_alone_in_the_body_too() -> None:
    """A rule named like a key writes masks a detector finds inside: the body is left to
    the walk, which leaves the mask as it is and masks the key beside it."""
    from sidecar.redaction import build_redactor
    from sidecar.redaction.stage import BUILTIN_SECRETS, RedactionStage

    label = "sk-proj-abcdefghijklmnop1234"
    rules = build_redactor([{"name": label, "path": "x", "action": "mask"}], None)
    whole = build_redactor([BUILTIN_SECRETS], None, rules)
    stage = RedactionStage(rules, whole)
    for prompt in (f"[REDACTED:{label}]", f"[REDACTED:{label}] and {SECRETS['openai']}"):
        event = {"agentId": "a", "prompt": prompt, "response": "r"}
        masked, secrets = stage.mask_body(orjson.dumps(event))
        stored = orjson.loads(masked)
        stage(stored, secrets)
        whole.redact(event)
        assert stored == event
        assert stored["prompt"].startswith(f"[REDACTED:{label}]")


def test_masking_in_the_body_leaves_keys_and_agent_ids_to_the_walk() -> None:
    from sidecar.redaction import build_redactor
    from sidecar.redaction.stage import BUILTIN_SECRETS, RedactionStage

    stage = RedactionStage(build_redactor([], None), build_redactor([BUILTIN_SECRETS], None))
    key = SECRETS["openai"]
    in_prompt = orjson.dumps({"agentId": "a", "prompt": f"use {key}", "response": "no"})
    masked, secrets = stage.mask_body(in_prompt)
    assert key.encode() not in masked and secrets == ()
    for body in (
        orjson.dumps({"agentId": key, "prompt": f"use {key}", "response": "no"}),
        orjson.dumps({"agentId": "a", "prompt": "p", "response": {key: "v"}}),
        b'{"agentId": "a", "prompt": "p", "response": {"' + key.encode() + b'" : "v"}}',
        orjson.dumps({"agentId": "a", "prompt": "p", "response": {"agentId": key}}),
    ):
        assert stage.mask_body(body) == (body, ("openai_key",)), body
