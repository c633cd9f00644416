"""Waiting without losing a cancellation (sidecar/aio.py)."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.aio import cancel_and_wait, wait_at_most


async def test_wait_at_most_keeps_a_cancellation_that_comes_as_the_event_is_set() -> None:
    event = asyncio.Event()
    waiter = asyncio.create_task(wait_at_most(event, 60))
    await asyncio.sleep(0)  # the waiter is now in event.wait()
    event.set()
    waiter.cancel()  # in the same turn: asyncio.wait_for returned True here
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_wait_at_most_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_at_most(event, 0.01) is False
    event.set()
    assert await wait_at_most(event, 60) is True


async def test_cancel_and_wait_lets_the_callers_own_cancellation_through() -> None:
    """Awaiting the cancelled task under suppress(CancelledError) swallowed a
    cancellation of the caller as well: a stop() could not itself be stopped."""
    release = asyncio.Event()

    async def slow_to_end() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()  # cleans up for a while after being cancelled

    task = asyncio.create_task(slow_to_end())
    await asyncio.sleep(0)
    caller = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(0)  # the caller waits for the task to end
    caller.cancel()
    done, _ = await asyncio.wait({caller}, timeout=30)  # swallowed, it waits for release
    release.set()
    assert caller in done and caller.cancelled()
    await asyncio.wait({task})
    assert task.cancelled()
