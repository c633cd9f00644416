"""Waiting in asyncio without losing a cancellation.

On Python 3.11, ``asyncio.wait_for`` returns normally when the task is cancelled in the
same turn of the loop as the awaited event is set (gh-86296): the cancellation is lost
and the task goes on. The forwarder, lingering for a batch while events kept arriving,
then outlived its stop(), and a SIGTERM under load hung the sidecar for good.
"""

from __future__ import annotations

import asyncio


async def wait_at_most(event: asyncio.Event, seconds: float) -> bool:
    """``event.wait()`` for at most ``seconds``; whether the event is set."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(task: asyncio.Task[object]) -> None:
    """Cancel ``task`` and wait until it has ended. Unlike awaiting it under
    ``suppress(CancelledError)``, a cancellation of the caller itself still goes through."""
    task.cancel()
    await asyncio.wait({task})
