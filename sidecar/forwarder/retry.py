"""What to do after one upstream request: a pure function, tested as a table.

    decide(outcome, attempt, batch_size, policy) -> Deliver | Retry | Split | DeadLetter | PauseAuth

No I/O and no clock here: the forwarder carries the decision out.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

# Statuses that say "not now" rather than "never": the same events may succeed later.
RETRYABLE_4XX = frozenset({408, 425, 429})
REJECTED = frozenset({400, 422})
AUTH = frozenset({401, 403})
# Say the URL is wrong (a path, a base URL without /api/v1, a proxy's page): the same
# answer awaits every event, so they wait for the fix instead of all becoming dead letters.
WRONG_ENDPOINT = frozenset({404, 405})
# A 403 with this code is a verdict on an agent (too many for the plan), not on the key.
AGENT_LIMIT = "AGENT_LIMIT_EXCEEDED"


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int | None = None  # None: no HTTP answer at all
    error: str | None = None  # "timeout" or "connection" when status is None
    retry_after: str | None = None  # the Retry-After header, as sent
    body: str = ""  # an excerpt of the response body, for dead letters and logs


@dataclass(frozen=True, slots=True)
class Deliver:
    pass


@dataclass(frozen=True, slots=True)
class Retry:
    delay_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class Split:
    """Send the two halves separately: to fit a size limit, or to find the bad event."""

    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str


@dataclass(frozen=True, slots=True)
class PauseAuth:
    """The key is wrong: hold everything and probe now and then, never spend the backlog."""

    delay_s: float


Decision = Deliver | Retry | Split | DeadLetter | PauseAuth


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 300.0

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Full jitter: uniform between the initial delay and the doubled ceiling, capped."""
        doublings = min(max(attempt - 1, 0), 62)  # 2.0**1024 would overflow after long outages
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2.0**doublings)
        return self.initial_backoff_s + rand() * (ceiling - self.initial_backoff_s)


def decide(
    outcome: Outcome,
    attempt: int,
    batch_size: int,
    policy: RetryPolicy,
    rand: Callable[[], float] = random.random,
    now: float | None = None,
) -> Decision:
    """``attempt`` counts consecutive failures including this one (1 = first failure)."""
    status = outcome.status
    if status is not None and 200 <= status < 300 and not refused_in_body(outcome.body):
        return Deliver()
    if status == 413:
        return Split("too_large") if batch_size > 1 else DeadLetter("too_large")
    if status in REJECTED or (status == 403 and AGENT_LIMIT in outcome.body):
        # Bisected down to the events refused: the others are delivered.
        return Split("rejected") if batch_size > 1 else DeadLetter("rejected")
    if status in AUTH:
        return PauseAuth(policy.max_backoff_s)
    if (status is not None and 400 <= status < 500
            and status not in RETRYABLE_4XX and status not in WRONG_ENDPOINT):
        return DeadLetter("client_error")
    # Timeouts, lost connections, 408/425/429, 404/405, every 5xx (501 and 505
    # included: a proxy in between can answer them for a passing fault), unexpected
    # 1xx/3xx, and a 2xx whose answer refuses the events.
    delay = policy.backoff(attempt, rand)
    hinted = retry_after_seconds(outcome.retry_after, now)
    if hinted is not None:
        delay = min(max(delay, hinted), policy.max_backoff_s)
    return Retry(delay, failure_reason(outcome))


# The start of an answer that cannot be PrecogX's: an error envelope when the excerpt
# was cut short (and so cannot be parsed).
_ERROR_FIRST = re.compile(r'\A\{\s*"errors?"\s*:(?!\s*(?:null|false|\[\s*\]|\{\s*\}))')
_FAILED = frozenset({"error", "fail", "failed", "failure"})


def refused_in_body(body: str) -> bool:
    """Whether a 2xx's answer says the events were not taken: a proxy's or captive
    portal's HTML page, or an error envelope that some gateways send with 200 (a
    ``"status"`` that is an error word; with no status, ``"error"`` or ``"errors"`` set or
    ``"success": false``). Any other answer counts as the 2xx says, an empty or
    unreadable one included, and so does a success status beside errors (a batch taken
    but for some events, in a form PrecogX does not document): retrying a delivery that
    did succeed would send every event again, at every backoff, until retry.max_age_s."""
    text = body.lstrip("\ufeff \t\r\n")
    if text.startswith("<"):
        return True
    try:
        answer = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _ERROR_FIRST.match(text) is not None
    if not isinstance(answer, dict):
        return False
    status = answer.get("status")
    if status is not None:
        return str(status).lower() in _FAILED
    return bool(answer.get("error")) or bool(answer.get("errors")) or answer.get("success") is False


def failure_reason(outcome: Outcome) -> str:
    """The label of precogx_sidecar_delivery_failures_total."""
    status = outcome.status
    if status is None:
        return outcome.error or "connection"
    if status == 429:
        return "http_429"
    if 400 <= status < 500:
        return "http_4xx"
    if 500 <= status < 600:
        return "http_5xx"
    return "http_other"


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as delta-seconds or an HTTP-date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
