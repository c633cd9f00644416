"""One hold for the whole forwarder while the upstream fails.

Without it, ``concurrency`` batches would each retry on their own schedule and a
struggling upstream would see a burst at every backoff. With it, the first failure
opens the circuit: everyone waits out one delay, then a single probe goes; its
success closes the circuit, its failure opens it again for a longer delay. Only an
answer to a request sent after the latest failure closes it: a success that was already
on its way says nothing against a 429 asking everyone to wait, or an outage that began
meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from sidecar.aio import wait_at_most


class Circuit:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = 0
        self._recorded = 0  # failures recorded ever: which requests were sent after which
        self._clock = clock
        self._open_until = 0.0
        self._probe = asyncio.Lock()
        self._woken = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return self.failures > 0

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[int]:
        """Hold the caller while open; then let one request through at a time. Yields
        the ticket that record_success takes."""
        if not self.failures:
            yield self._recorded
            return
        async with self._probe:
            await self._wait_out_hold()
            yield self._recorded

    async def _wait_out_hold(self) -> None:
        while self.failures and (remaining := self._open_until - self._clock()) > 0:
            self._woken.clear()
            await wait_at_most(self._woken, remaining)

    def record_success(self, ticket: int) -> None:
        """The request admitted with ``ticket`` got an answer from a working upstream."""
        if ticket == self._recorded:
            self.failures = 0

    def record_failure(self, delay_s: float) -> None:
        self.failures += 1
        self._recorded += 1
        self._open_until = self._clock() + delay_s

    def reset(self) -> None:
        """Closed, as if nothing had failed: there is nothing left to probe with."""
        self.failures = 0
        self._woken.set()

    def cut_short(self) -> None:
        """End the current hold now (a new API key arrived): the probe goes at once."""
        self._open_until = self._clock()
        self._woken.set()
