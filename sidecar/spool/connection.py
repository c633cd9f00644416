"""A SQLite connection that lives in its own thread and runs whole functions there.

A group commit is then one hop to the thread and one hop back, however many
statements it holds. (aiosqlite hops once per statement; under load each hop back
waits for the event loop to give up the GIL, and that wait is what a p99 sees.)
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Above any WAL of steady load (the spool checkpoints each second), so that the file is
# overwritten in place then, not cut and grown again at every rewind.
WAL_SIZE_LIMIT = 64 * 1024 * 1024

# Room for the INSERT of every group size (store.MAX_INSERT_ROWS) besides the rest.
CACHED_STATEMENTS = 512

# sqlite3 binds a bytes value (every payload) only after looking for an adapter, and
# without one it raises and formats two AttributeErrors per value (__adapt__, then
# __conform__). An identity adapter turns that into one dict lookup and a C call:
# 49 instead of 59 us for the INSERT of a group of 22 events.
sqlite3.register_adapter(bytes, bytes)

_Job = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]] | None


class DbThread:
    def __init__(self, path: Path, synchronous: str, name: str) -> None:
        self._path = path
        self._synchronous = synchronous
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        await self.call(self._configure)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in the connection's thread; its exceptions are re-raised."""
        assert self._loop is not None, "start() first"
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((fn, future))
        return await future

    async def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join)

    def _configure(self, db: sqlite3.Connection) -> None:
        # Before the WAL switch writes the file's first page: only a file without tables
        # takes it (a spool made before this stays as it was until `spool compact`).
        # Incremental: pages that delivered events freed can be given back to the disk
        # (Spool.reclaim), a few at a time, instead of the file keeping its largest size.
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("PRAGMA journal_mode = WAL")
        # SQLite rewinds a WAL that a checkpoint copied, but keeps its file at the largest
        # size it ever had (a burst, a long checkpoint); cut back to this on each rewind.
        db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        db.execute(f"PRAGMA synchronous = {self._synchronous}")
        # Another process (the CLI) may hold the write lock briefly: wait, don't fail.
        db.execute("PRAGMA busy_timeout = 5000")

    def _serve(self) -> None:
        db: sqlite3.Connection | None = None
        while (job := self._jobs.get()) is not None:
            fn, future = job
            try:
                if db is None:
                    db = sqlite3.connect(
                        self._path, isolation_level=None, check_same_thread=True,
                        cached_statements=CACHED_STATEMENTS,
                    )
                result = fn(db)
            except BaseException as e:  # handed to the awaiting task, which decides
                self._resolve(future, None, e)
            else:
                self._resolve(future, result, None)
        if db is not None:
            db.close()

    def _resolve(
        self, future: asyncio.Future[Any], result: Any, error: BaseException | None
    ) -> None:
        assert self._loop is not None
        # RuntimeError: the loop is closed, nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
