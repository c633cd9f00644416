"""The tier's request rate, enforced on our side so PrecogX never has to say 429."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    """``rate_per_minute`` tokens a minute, at most ``burst`` saved; 0 means unlimited."""

    def __init__(
        self, rate_per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate_per_minute / 60.0
        self.burst = float(max(burst, 1))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._updated = clock()
        self._lock = asyncio.Lock()

    def wait_time(self) -> float:
        """Seconds until one token is free, taking it when it already is."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate

    async def take(self) -> float:
        """Wait for a token; returns how long the caller was held, queueing behind the
        others (with concurrency > 1) included."""
        if self.rate <= 0:
            return 0.0
        start = self._clock()
        waited = self._lock.locked()
        async with self._lock:  # first come, first served
            while (wait := self.wait_time()) > 0:
                waited = True
                await self._sleep(wait)
        return self._clock() - start if waited else 0.0
