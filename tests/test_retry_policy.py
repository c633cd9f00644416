"""decide(), the backoff and Retry-After parsing: pure functions, as tables."""

from __future__ import annotations

import datetime as dt
import email.utils
import math
from collections.abc import Callable

import pytest

from sidecar.forwarder.retry import (
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
    retry_after_seconds,
)

POLICY = RetryPolicy(initial_backoff_s=2.0, max_backoff_s=60.0)
NOW = 1_700_000_000.0


def zero() -> float:
    return 0.0


def one() -> float:
    return 1.0


def fixed(value: float) -> Callable[[], float]:
    return lambda: value


def http_date(timestamp: float) -> str:
    return email.utils.format_datetime(
        dt.datetime.fromtimestamp(timestamp, tz=dt.UTC), usegmt=True
    )


# -- decide: one row per kind of outcome ------------------------------------------------

DECISIONS = [
    # delivered
    (Outcome(status=200), 5, Deliver()),
    (Outcome(status=202), 5, Deliver()),
    (Outcome(status=204), 1, Deliver()),
    (Outcome(status=299), 1, Deliver()),
    # no HTTP answer
    (Outcome(error="timeout"), 5, Retry(2.0, "timeout")),
    (Outcome(error="connection"), 5, Retry(2.0, "connection")),
    (Outcome(), 1, Retry(2.0, "connection")),
    # "not now" 4xx
    (Outcome(status=408), 5, Retry(2.0, "http_4xx")),
    (Outcome(status=425), 5, Retry(2.0, "http_4xx")),
    (Outcome(status=429), 5, Retry(2.0, "http_429")),
    (Outcome(status=429), 1, Retry(2.0, "http_429")),
    # every 5xx
    (Outcome(status=500), 5, Retry(2.0, "http_5xx")),
    (Outcome(status=501), 5, Retry(2.0, "http_5xx")),
    (Outcome(status=502), 5, Retry(2.0, "http_5xx")),
    (Outcome(status=503), 5, Retry(2.0, "http_5xx")),
    (Outcome(status=504), 5, Retry(2.0, "http_5xx")),
    (Outcome(status=505), 5, Retry(2.0, "http_5xx")),
    (Outcome(status=599), 1, Retry(2.0, "http_5xx")),
    # the key is wrong: pause, never dead-letter
    (Outcome(status=401), 5, PauseAuth(60.0)),
    (Outcome(status=403), 5, PauseAuth(60.0)),
    (Outcome(status=401), 1, PauseAuth(60.0)),
    # ... but a 403 for too many agents is a verdict on those events, not on the key
    (Outcome(status=403, body='{"error":{"code":"AGENT_LIMIT_EXCEEDED"}}'), 4,
     Split("rejected")),
    (Outcome(status=403, body='{"error":{"code":"AGENT_LIMIT_EXCEEDED"}}'), 1,
     DeadLetter("rejected")),
    # too large
    (Outcome(status=413), 2, Split("too_large")),
    (Outcome(status=413), 100, Split("too_large")),
    (Outcome(status=413), 1, DeadLetter("too_large")),
    # rejected content
    (Outcome(status=400), 2, Split("rejected")),
    (Outcome(status=400), 1, DeadLetter("rejected")),
    (Outcome(status=422), 7, Split("rejected")),
    (Outcome(status=422), 1, DeadLetter("rejected")),
    # the URL is wrong (every event would get the same): wait for the fix
    (Outcome(status=404), 5, Retry(2.0, "http_4xx")),
    (Outcome(status=405), 1, Retry(2.0, "http_4xx")),
    # other 4xx: never going to work
    (Outcome(status=409), 5, DeadLetter("client_error")),
    (Outcome(status=410), 5, DeadLetter("client_error")),
    (Outcome(status=418), 1, DeadLetter("client_error")),
    # unexpected statuses are retried
    (Outcome(status=302), 5, Retry(2.0, "http_other")),
    (Outcome(status=100), 5, Retry(2.0, "http_other")),
]


@pytest.mark.parametrize(
    ("outcome", "batch_size", "expected"),
    DECISIONS,
    ids=[f"{o.status or o.error or 'none'}-batch{n}" for o, n, _ in DECISIONS],
)
def test_decide(outcome: Outcome, batch_size: int, expected: Decision) -> None:
    assert decide(outcome, 1, batch_size, POLICY, rand=zero, now=NOW) == expected


@pytest.mark.parametrize("status", [200, 401, 403, 413, 400, 409])
def test_retry_after_ignored_when_not_retrying(status: int) -> None:
    plain = decide(Outcome(status=status), 3, 4, POLICY, rand=zero, now=NOW)
    hinted = decide(Outcome(status=status, retry_after="30"), 3, 4, POLICY, rand=zero, now=NOW)
    assert hinted == plain
    assert not isinstance(hinted, Retry)


def test_pause_auth_uses_max_backoff_whatever_the_attempt() -> None:
    policy = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=7.0)
    for attempt in (1, 2, 50, 10_000):
        assert decide(Outcome(status=401), attempt, 1, policy, rand=zero) == PauseAuth(7.0)


def test_retry_delay_follows_backoff() -> None:
    # attempt 4 with rand 1.0: initial * 2**3
    decision = decide(Outcome(status=503), 4, 1, POLICY, rand=one, now=NOW)
    assert decision == Retry(16.0, "http_5xx")


def test_decide_with_default_random_stays_in_bounds() -> None:
    for attempt in range(1, 40):
        decision = decide(Outcome(error="timeout"), attempt, 1, POLICY)
        assert isinstance(decision, Retry)
        assert POLICY.initial_backoff_s <= decision.delay_s <= POLICY.max_backoff_s


# -- backoff ----------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [-3, 0, 1, 2, 3, 10, 63, 64, 1000, 10_000])
def test_backoff_without_jitter_is_initial(attempt: int) -> None:
    assert POLICY.backoff(attempt, rand=zero) == 2.0


def test_backoff_full_jitter_doubles_then_caps() -> None:
    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=300.0)
    delays = [policy.backoff(attempt, rand=one) for attempt in range(1, 13)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0, 300.0, 300.0]


@pytest.mark.parametrize("attempt", [-1, 0])
def test_backoff_before_first_attempt_is_initial(attempt: int) -> None:
    assert POLICY.backoff(attempt, rand=one) == 2.0


def test_backoff_jitter_is_uniform_between_initial_and_ceiling() -> None:
    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=300.0)
    # attempt 3: ceiling 4, so rand 0.5 lands halfway between 1 and 4
    assert policy.backoff(3, rand=fixed(0.5)) == 2.5
    assert policy.backoff(3, rand=fixed(0.25)) == 1.75


@pytest.mark.parametrize("attempt", [1_000, 10_000, 10**9])
def test_backoff_huge_attempt_does_not_overflow(attempt: int) -> None:
    delay = POLICY.backoff(attempt, rand=one)
    assert delay == 60.0
    assert math.isfinite(delay)
    decision = decide(Outcome(status=503), attempt, 1, POLICY, rand=one, now=NOW)
    assert decision == Retry(60.0, "http_5xx")


@pytest.mark.parametrize(
    "policy",
    [RetryPolicy(), RetryPolicy(0.01, 0.05), RetryPolicy(5.0, 5.0), RetryPolicy(0.3, 1e6)],
)
def test_backoff_always_within_bounds(policy: RetryPolicy) -> None:
    for attempt in [*range(-2, 80), 10_000]:
        for r in (0.0, 0.001, 0.25, 0.5, 0.999, 1.0):
            delay = policy.backoff(attempt, rand=fixed(r))
            assert policy.initial_backoff_s <= delay <= policy.max_backoff_s


# -- Retry-After in decide --------------------------------------------------------------


def test_retry_after_seconds_longer_than_backoff_wins() -> None:
    decision = decide(Outcome(status=429, retry_after="7"), 1, 5, POLICY, rand=zero, now=NOW)
    assert decision == Retry(7.0, "http_429")


def test_retry_after_shorter_than_backoff_keeps_backoff() -> None:
    # attempt 5 with rand 1.0: 2 * 2**4 = 32 > 7
    decision = decide(Outcome(status=503, retry_after="7"), 5, 5, POLICY, rand=one, now=NOW)
    assert decision == Retry(32.0, "http_5xx")


@pytest.mark.parametrize("value", ["61", "3600", "9" * 400])
def test_retry_after_is_capped_at_max_backoff(value: str) -> None:
    decision = decide(Outcome(status=503, retry_after=value), 1, 5, POLICY, rand=zero, now=NOW)
    assert decision == Retry(60.0, "http_5xx")


def test_retry_after_http_date() -> None:
    outcome = Outcome(status=503, retry_after=http_date(NOW + 30))
    assert decide(outcome, 1, 5, POLICY, rand=zero, now=NOW) == Retry(30.0, "http_5xx")


def test_retry_after_http_date_beyond_max_is_capped() -> None:
    outcome = Outcome(status=429, retry_after=http_date(NOW + 86400))
    assert decide(outcome, 1, 5, POLICY, rand=zero, now=NOW) == Retry(60.0, "http_429")


def test_retry_after_past_date_gives_backoff() -> None:
    outcome = Outcome(status=503, retry_after=http_date(NOW - 3600))
    assert decide(outcome, 3, 5, POLICY, rand=one, now=NOW) == Retry(8.0, "http_5xx")


@pytest.mark.parametrize("value", ["soon", "", "-5", "1.5", "5 seconds", "Tomorrow"])
def test_unreadable_retry_after_is_ignored(value: str) -> None:
    outcome = Outcome(status=503, retry_after=value)
    assert decide(outcome, 3, 5, POLICY, rand=one, now=NOW) == Retry(8.0, "http_5xx")


def test_retry_after_zero_keeps_backoff() -> None:
    outcome = Outcome(status=429, retry_after="0")
    assert decide(outcome, 1, 5, POLICY, rand=zero, now=NOW) == Retry(2.0, "http_429")


# -- retry_after_seconds ----------------------------------------------------------------

RETRY_AFTER_ROWS = [
    pytest.param(None, None, id="absent"),
    pytest.param("7", 7.0, id="seconds"),
    pytest.param(" 7 ", 7.0, id="seconds-padded"),
    pytest.param("0", 0.0, id="zero"),
    pytest.param("120", 120.0, id="minutes"),
    pytest.param("1.5", None, id="fraction"),
    pytest.param("-5", None, id="negative"),
    pytest.param("+5", None, id="plus-sign"),
    pytest.param("", None, id="empty"),
    pytest.param("   ", None, id="blank"),
    pytest.param("soon", None, id="garbage"),
    pytest.param(http_date(NOW + 30), 30.0, id="date-future"),
    pytest.param(http_date(NOW), 0.0, id="date-now"),
    pytest.param(http_date(NOW - 30), 0.0, id="date-past"),
    pytest.param("Tue, 14 Nov 2023 22:13:50 +0000", 30.0, id="date-numeric-zone"),
    pytest.param("Tue, 14 Nov 2023 23:13:50 +0100", 30.0, id="date-other-zone"),
    pytest.param("Tue, 14 Nov 2023 22:13:50 -0000", None, id="date-unknown-zone"),
    pytest.param("Tue, 32 Nov 2023 22:13:50 GMT", None, id="date-impossible-day"),
]


@pytest.mark.parametrize(("value", "expected"), RETRY_AFTER_ROWS)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert retry_after_seconds(value, now=NOW) == expected


def test_http_date_helper_matches_fixed_rows() -> None:
    # guards the rows above: NOW + 30 is Tue, 14 Nov 2023 22:13:50 GMT
    assert http_date(NOW + 30) == "Tue, 14 Nov 2023 22:13:50 GMT"


@pytest.mark.parametrize("value", ["\u00b2", "3\u00b3"])
def test_retry_after_unicode_digits_are_ignored(value: str) -> None:
    assert retry_after_seconds(value, now=NOW) is None
    outcome = Outcome(status=503, retry_after=value)
    assert decide(outcome, 1, 1, POLICY, rand=zero, now=NOW) == Retry(2.0, "http_5xx")


# -- failure_reason ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (Outcome(error="timeout"), "timeout"),
        (Outcome(error="connection"), "connection"),
        (Outcome(), "connection"),
        (Outcome(status=429), "http_429"),
        (Outcome(status=408), "http_4xx"),
        (Outcome(status=425), "http_4xx"),
        (Outcome(status=400), "http_4xx"),
        (Outcome(status=401), "http_4xx"),
        (Outcome(status=404), "http_4xx"),
        (Outcome(status=499), "http_4xx"),
        (Outcome(status=500), "http_5xx"),
        (Outcome(status=503), "http_5xx"),
        (Outcome(status=599), "http_5xx"),
        (Outcome(status=600), "http_other"),
        (Outcome(status=999), "http_other"),
        (Outcome(status=302), "http_other"),
        (Outcome(status=304), "http_other"),
        (Outcome(status=101), "http_other"),
    ],
)
def test_failure_reason(outcome: Outcome, reason: str) -> None:
    assert failure_reason(outcome) == reason


@pytest.mark.parametrize(("body", "refused"), [
    ("", False),
    ('{"status": "success", "message": "Telemetry received"}', False),
    ('{"status": "success", "accepted": 2, "interactionIds": ["a", "b"]}', False),
    ('{"accepted": 2, "interactionIds": ["a", ' + '"x", ' * 600 + "...", False),  # cut short
    ("OK", False),
    ("[12 bytes, Content-Encoding: gzip]", False),
    ("  <!DOCTYPE html><html>Sign in</html>", True),
    ('{"error": {"code": "INTERNAL_ERROR", "message": "m", "details": {}}}', True),
    ('{"error": {"code": "X", "message": "' + "m" * 3000 + "...", True),  # cut short
    ('{"accepted": 0, "status": "Error"}', True),
    ('{"status": "failed"}', True),
    ('["error"]', False),
    ('{"status": "success", "message": "Telemetry received", "error": null}', False),
    ('{"status": "success", "error": false, "errors": []}', False),
    # A success status wins: resending a batch taken but for some events would send
    # all of them again and again.
    ('{"status": "success", "accepted": 98, "errors": [{"index": 3}]}', False),
    ('{"error": null, "interactionIds": ["a", ' + '"x", ' * 600 + "...", False),  # cut short
    ('{"status": "fail", "data": {}}', True),
    ('{"success": false, "message": "quota"}', True),
    ('{"errors": [{"message": "m"}]}', True),
    ("\ufeff<html>Sign in</html>", True),
])
def test_a_2xx_is_delivered_unless_its_answer_refuses(body: str, refused: bool) -> None:
    decision = decide(Outcome(status=200, body=body), 1, 10, POLICY, rand=lambda: 0.0)
    assert isinstance(decision, Retry if refused else Deliver)
    if refused:
        assert decision == Retry(POLICY.initial_backoff_s, "http_other")
