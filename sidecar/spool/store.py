"""The durable queue between receiving and forwarding: one SQLite file in WAL mode.

Every write goes through one writer task and one connection. Writes that arrive
while a transaction is committing wait and then share the next transaction
(group commit): each caller still learns of its own commit, yet a thousand
concurrent requests cost one fsync instead of a thousand. Reads (claims for
the forwarder) use a second connection and never wait for the writer; WAL
checkpoints run on a third, on a timer, so no request ever pays for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from sidecar.config import SpoolConfig
from sidecar.spool.schema import MIGRATIONS, SCHEMA_VERSION, SpoolVersionError, new_spool_id

log = logging.getLogger("sidecar.spool")

IDEMPOTENCY_PRUNE_EVERY_S = 60.0


class SpoolFull(Exception):
    """Not enough room for the events; nothing of the request was stored."""


class SpoolUnavailable(Exception):
    """The spool could not commit (disk full, I/O error, shutting down); nothing was stored."""


@dataclass(slots=True)
class StoredEvent:
    id: int
    received_at: float
    attempts: int
    size: int
    payload: bytes


@dataclass(slots=True)
class _Append:
    ids: list[int]
    payloads: list[bytes]
    size: int
    received_at: float
    idempotency_key: str | None
    future: asyncio.Future[list[int]]


@dataclass(slots=True)
class _Op:
    """Any other write, run inside the next group transaction."""

    run: Callable[[aiosqlite.Connection], Awaitable[Any]]
    after_commit: Callable[[Any], None]
    future: asyncio.Future[Any]


@dataclass
class SpoolCounts:
    pending: int = 0
    dead: int = 0
    bytes: int = 0

    @property
    def events(self) -> int:
        return self.pending + self.dead


@dataclass
class Spool:
    config: SpoolConfig
    idempotency_ttl_s: float = 86400.0
    spool_id: str = ""
    counts: SpoolCounts = field(default_factory=SpoolCounts)
    inflight: set[int] = field(default_factory=set)
    dropped: Callable[[str, int], None] = lambda reason, n: None
    # Set whenever new pending events are committed; the forwarder waits on it.
    data_ready: asyncio.Event = field(default_factory=asyncio.Event)
    unclaimed_since: float | None = None
    write_error: str | None = None

    def __post_init__(self) -> None:
        self._next_id = 1
        self._appends: list[_Append] = []
        self._ops: list[_Op] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._claim_cursor = 0
        self._data_version = 0
        self._wdb: aiosqlite.Connection | None = None
        self._rdb: aiosqlite.Connection | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._committed = asyncio.Event()

    # -- life cycle ------------------------------------------------------------

    async def open(self) -> None:
        path = Path(self.config.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._wdb = await _connect(path, self.config.synchronous)
        await _migrate(self._wdb)
        # Checkpoints are run by checkpoint(), off the commit path.
        await self._wdb.execute("PRAGMA wal_autocheckpoint = 0")
        self._rdb = await _connect(path, self.config.synchronous)
        self.spool_id = await self._meta("spool_id")
        self._next_id = max(int(await self._meta("next_id")), await self._max_id() + 1)
        self.counts = await self._count(self._wdb)
        self._writer_task = asyncio.create_task(self._writer(), name="spool-writer")

    async def close(self) -> None:
        """Commit everything already handed in, then close. New appends are refused."""
        self._closing = True
        self._wake.set()
        if self._writer_task:
            await self._writer_task
        for db in (self._rdb, self._wdb):
            if db is not None:
                with contextlib.suppress(aiosqlite.Error):
                    await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                await db.close()
        self._rdb = self._wdb = None

    # -- receiving ---------------------------------------------------------------

    def allocate_ids(self, n: int) -> list[int]:
        """Ids are handed out before the commit so they can be stamped into the payload."""
        first = self._next_id
        self._next_id += n
        return list(range(first, first + n))

    def event_ref(self, event_id: int) -> str:
        """The event's name upstream: unique across sidecars, stable across retries."""
        return f"{self.spool_id}-{event_id}"

    def is_full(self) -> bool:
        c = self.counts
        return c.events >= self.config.max_events or c.bytes >= self.config.max_bytes

    def append(
        self, ids: list[int], payloads: list[bytes], idempotency_key: str | None = None
    ) -> asyncio.Future[list[int]]:
        """Queue events for the next group commit; the future resolves once they are on disk.

        Resolves with the stored ids, or with the ids first answered for the same
        idempotency key. Raises SpoolFull or SpoolUnavailable through the future.
        """
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        if self._closing:
            future.set_exception(SpoolUnavailable("shutting down"))
            return future
        size = sum(map(len, payloads))
        self._appends.append(_Append(ids, payloads, size, time.time(), idempotency_key, future))
        self._wake.set()
        return future

    # -- forwarding --------------------------------------------------------------

    @property
    def unclaimed(self) -> int:
        return self.counts.pending - len(self.inflight)

    async def claim(self, max_events: int, max_bytes: int) -> list[StoredEvent]:
        """The oldest pending events nobody is sending, up to the batch limits."""
        assert self._rdb is not None
        batch = await self._claim_after(self._claim_cursor, max_events, max_bytes)
        if not batch and self.unclaimed > 0 and self._claim_cursor:
            # Events behind the cursor became pending again (a replay, a restart of a
            # batch): look from the start, skipping what is in flight.
            batch = await self._claim_after(0, max_events, max_bytes)
        if batch:
            self._claim_cursor = max(self._claim_cursor, batch[-1].id)
            self.inflight.update(e.id for e in batch)
        if self.unclaimed <= 0:
            self.unclaimed_since = None
        return batch

    async def _claim_after(self, cursor: int, max_events: int, max_bytes: int) -> list[StoredEvent]:
        assert self._rdb is not None
        rows = await self._rdb.execute_fetchall(
            "SELECT id, received_at, attempts, size, payload FROM events "
            "WHERE state = 'pending' AND id > ? ORDER BY id LIMIT ?",
            (cursor, max_events + len(self.inflight)),
        )
        batch: list[StoredEvent] = []
        total = 0
        for row in rows:
            if row[0] in self.inflight:
                continue
            if batch and (len(batch) >= max_events or total + row[3] > max_bytes):
                break
            batch.append(StoredEvent(*row))
            total += row[3]
        return batch

    def release(self, events: Iterable[StoredEvent]) -> None:
        """Give events back without writing: the next claim (or next start) sends them."""
        for e in events:
            self.inflight.discard(e.id)
        self._claim_cursor = 0

    async def delete(self, events: Sequence[StoredEvent]) -> None:
        """Delivered: remove for good."""
        ids = [(e.id,) for e in events]

        async def run(db: aiosqlite.Connection) -> None:
            await db.executemany("DELETE FROM events WHERE id = ?", ids)

        def after(_: Any) -> None:
            self.counts.pending -= len(events)
            self.counts.bytes -= sum(e.size for e in events)
            self.inflight.difference_update(e.id for e in events)

        await self._submit(run, after)

    async def reschedule(
        self, events: Sequence[StoredEvent], next_attempt_at: float, status: int | None, error: str
    ) -> None:
        """A failed attempt: count it and record why, for `spool stats` and the dead letters."""
        rows = [(next_attempt_at, status, error[:500], e.id) for e in events]

        async def run(db: aiosqlite.Connection) -> None:
            await db.executemany(
                "UPDATE events SET attempts = attempts + 1, next_attempt_at = ?, "
                "last_status = ?, last_error = ? WHERE id = ?",
                rows,
            )

        def after(_: Any) -> None:
            for e in events:
                e.attempts += 1

        await self._submit(run, after)

    async def dead_letter(
        self, events: Sequence[StoredEvent], reason: str, status: int | None, error: str
    ) -> None:
        """Keep the events, with why they could not be delivered, for list and replay."""
        now = time.time()
        rows = [(reason, now, status, error[:500], e.id) for e in events]

        async def run(db: aiosqlite.Connection) -> tuple[int, int]:
            await db.executemany(
                "UPDATE events SET state = 'dead', dead_reason = ?, dead_at = ?, "
                "last_status = ?, last_error = ?, attempts = attempts + 1 WHERE id = ?",
                rows,
            )
            return await self._prune_dead(db, self.counts.dead + len(events))

        def after(pruned: tuple[int, int]) -> None:
            self.counts.pending -= len(events)
            self.counts.dead += len(events) - pruned[0]
            self.counts.bytes -= pruned[1]
            self.inflight.difference_update(e.id for e in events)
            if pruned[0]:
                self.dropped("dead_letter_pruned", pruned[0])
                log.warning(
                    "dead letters over spool.max_dead_events: pruned the %d oldest", pruned[0]
                )

        await self._submit(run, after)

    async def _prune_dead(self, db: aiosqlite.Connection, dead: int) -> tuple[int, int]:
        excess = dead - self.config.max_dead_events
        if excess <= 0:
            return 0, 0
        rows = list(await db.execute_fetchall(
            "SELECT id, size FROM events WHERE state = 'dead' ORDER BY dead_at, id LIMIT ?",
            (excess,),
        ))
        await db.executemany("DELETE FROM events WHERE id = ?", [(r[0],) for r in rows])
        return len(rows), sum(r[1] for r in rows)

    async def oldest_pending_received_at(self) -> float | None:
        assert self._rdb is not None
        rows = list(
            await self._rdb.execute_fetchall(
                "SELECT received_at FROM events WHERE state = 'pending' ORDER BY id LIMIT 1"
            )
        )
        return float(rows[0][0]) if rows else None

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait for a commit after which ``predicate()`` holds (for tests and shutdown)."""
        while not predicate():
            await self._committed.wait()

    # -- maintenance -----------------------------------------------------------

    async def checkpoint(self) -> None:
        """Copy the WAL into the database file without blocking the writer."""
        assert self._rdb is not None
        await self._rdb.execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def prune_idempotency_keys(self) -> None:
        cutoff = time.time() - self.idempotency_ttl_s

        async def run(db: aiosqlite.Connection) -> None:
            await db.execute("DELETE FROM idempotency WHERE created_at < ?", (cutoff,))

        await self._submit(run, lambda _: None)

    async def sync_external_changes(self) -> None:
        """Recount when another process (the CLI's replay or purge) changed the file."""

        async def run(db: aiosqlite.Connection) -> SpoolCounts | None:
            rows = list(await db.execute_fetchall("PRAGMA data_version"))
            version = int(rows[0][0])
            changed = version != self._data_version
            self._data_version = version
            return await self._count(db) if changed else None

        def after(counts: Any) -> None:
            if counts is not None:
                self.counts = counts
                self._claim_cursor = 0
                self._signal_data()

        await self._submit(run, after)

    # -- the writer --------------------------------------------------------------

    async def _submit(
        self, run: Callable[[aiosqlite.Connection], Awaitable[Any]], after: Callable[[Any], None]
    ) -> Any:
        if self._writer_task is None or self._writer_task.done():
            raise SpoolUnavailable("spool is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops.append(_Op(run, after, future))
        self._wake.set()
        return await future

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._appends or self._ops:
                appends = self._take_appends()
                ops, self._ops = self._ops, []
                await self._commit(appends, ops)
            if self._closing:
                return

    def _take_appends(self) -> list[_Append]:
        taken = 0
        n = 0
        for n, a in enumerate(self._appends, 1):  # noqa: B007
            taken += len(a.ids)
            if taken >= self.config.commit_max_events:
                break
        else:
            n = len(self._appends)
        group, self._appends = self._appends[:n], self._appends[n:]
        return group

    async def _commit(self, appends: list[_Append], ops: list[_Op]) -> None:
        db = self._wdb
        assert db is not None
        try:
            await db.execute("BEGIN IMMEDIATE")
            # Ops first: a recount among them then sees the file before this group's inserts.
            results = [await op.run(db) for op in ops]
            accepted, answers, evicted = await self._admit(db, appends)
            await self._insert(db, accepted)
            await db.execute("COMMIT")
        except (aiosqlite.Error, OSError) as e:
            with contextlib.suppress(aiosqlite.Error):
                await db.execute("ROLLBACK")
            self._fail(appends, ops, e)
            return
        self.write_error = None
        for op, result in zip(ops, results, strict=True):
            op.after_commit(result)
            if not op.future.done():
                op.future.set_result(result)
        self._count_evicted(*evicted)
        for a in accepted:
            self.counts.pending += len(a.ids)
            self.counts.bytes += a.size
        # Wake everyone waiting for "the next commit", then start a fresh round.
        self._committed.set()
        self._committed = asyncio.Event()
        for a, answer in answers:
            if a.future.done():
                continue
            if isinstance(answer, BaseException):
                a.future.set_exception(answer)
            else:
                a.future.set_result(answer)
        if accepted:
            self._signal_data()

    def _count_evicted(self, events: int, size: int) -> None:
        if not events:
            return
        self.counts.pending -= events
        self.counts.bytes -= size
        self.dropped("spool_full", events)
        log.warning("spool full: dropped the %d oldest pending events (drop_oldest)", events)

    def _fail(self, appends: list[_Append], ops: list[_Op], error: BaseException) -> None:
        self.write_error = f"{type(error).__name__}: {error}"
        log.error("spool commit failed, %d requests refused: %s", len(appends), self.write_error)
        futures: list[asyncio.Future[Any]] = [a.future for a in appends]
        futures += [op.future for op in ops]
        for future in futures:
            if not future.done():
                future.set_exception(SpoolUnavailable(self.write_error))

    async def _admit(
        self, db: aiosqlite.Connection, appends: list[_Append]
    ) -> tuple[list[_Append], list[tuple[_Append, list[int] | BaseException]], tuple[int, int]]:
        """Decide each append's fate inside the transaction: store, answer as a repeat, refuse.

        Returns the appends to insert, every append's answer, and what drop_oldest evicted.
        """
        earlier = await self._known_keys(db, [a.idempotency_key for a in appends])
        accepted: list[_Append] = []
        answers: list[tuple[_Append, list[int] | BaseException]] = []
        events, size = self.counts.events, self.counts.bytes
        evicted_events = evicted_bytes = 0
        for a in appends:
            key = a.idempotency_key
            if key is not None and key in earlier:
                answers.append((a, earlier[key]))
                continue
            over = events + len(a.ids) - self.config.max_events
            over_bytes = size + a.size - self.config.max_bytes
            if over > 0 or over_bytes > 0:
                freed = await self._make_room(db, over, over_bytes)
                if freed is None:
                    answers.append((a, SpoolFull("spool is full")))
                    continue
                events -= freed[0]
                size -= freed[1]
                evicted_events += freed[0]
                evicted_bytes += freed[1]
            events += len(a.ids)
            size += a.size
            accepted.append(a)
            answers.append((a, a.ids))
            if key is not None:
                earlier[key] = a.ids
        return accepted, answers, (evicted_events, evicted_bytes)

    async def _known_keys(
        self, db: aiosqlite.Connection, keys: list[str | None]
    ) -> dict[str, list[int]]:
        wanted = [k for k in keys if k is not None]
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        rows = await db.execute_fetchall(
            f"SELECT key, ids FROM idempotency WHERE key IN ({marks}) AND created_at >= ?",
            (*wanted, time.time() - self.idempotency_ttl_s),
        )
        return {row[0]: orjson.loads(row[1]) for row in rows}

    async def _make_room(
        self, db: aiosqlite.Connection, events: int, size: int
    ) -> tuple[int, int] | None:
        """Evict the oldest pending events (drop_oldest), or None when not allowed or not enough."""
        if self.config.when_full != "drop_oldest":
            return None
        rows = await db.execute_fetchall(
            "SELECT id, size FROM events WHERE state = 'pending' ORDER BY id LIMIT ?",
            (max(events, 0) + len(self.inflight) + 1000,),
        )
        victims: list[tuple[int, int]] = []
        freed_events = freed_bytes = 0
        for event_id, event_size in rows:
            if freed_events >= events and freed_bytes >= size:
                break
            if event_id in self.inflight:
                continue
            victims.append((event_id, event_size))
            freed_events += 1
            freed_bytes += event_size
        if freed_events < events or freed_bytes < size:
            return None
        await db.executemany("DELETE FROM events WHERE id = ?", [(v[0],) for v in victims])
        return freed_events, freed_bytes

    async def _insert(self, db: aiosqlite.Connection, accepted: list[_Append]) -> None:
        if not accepted:
            return
        await db.executemany(
            "INSERT INTO events (id, received_at, size, payload) VALUES (?, ?, ?, ?)",
            [
                (event_id, a.received_at, len(payload), payload)
                for a in accepted
                for event_id, payload in zip(a.ids, a.payloads, strict=True)
            ],
        )
        keyed = [
            (a.idempotency_key, a.received_at, orjson.dumps(a.ids).decode())
            for a in accepted
            if a.idempotency_key is not None
        ]
        if keyed:
            await db.executemany(
                "INSERT OR REPLACE INTO idempotency (key, created_at, ids) VALUES (?, ?, ?)", keyed
            )
        await db.execute(
            "UPDATE meta SET value = ? WHERE key = 'next_id'", (str(self._next_id),)
        )

    def _signal_data(self) -> None:
        if self.unclaimed > 0:
            if self.unclaimed_since is None:
                self.unclaimed_since = time.monotonic()
            self.data_ready.set()

    # -- helpers -----------------------------------------------------------------

    async def _meta(self, key: str) -> str:
        assert self._wdb is not None
        sql = "SELECT value FROM meta WHERE key = ?"
        rows = list(await self._wdb.execute_fetchall(sql, (key,)))
        return str(rows[0][0])

    async def _max_id(self) -> int:
        assert self._wdb is not None
        rows = list(await self._wdb.execute_fetchall("SELECT coalesce(max(id), 0) FROM events"))
        return int(rows[0][0])

    async def _count(self, db: aiosqlite.Connection) -> SpoolCounts:
        counts = SpoolCounts()
        rows = await db.execute_fetchall(
            "SELECT state, count(*), coalesce(sum(size), 0) FROM events GROUP BY state"
        )
        for state, n, size in rows:
            if state == "dead":
                counts.dead = n
            else:
                counts.pending += n
            counts.bytes += size
        return counts


async def _connect(path: Path, synchronous: str) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path, isolation_level=None)
    await db.execute("PRAGMA journal_mode = WAL")
    await db.execute(f"PRAGMA synchronous = {synchronous}")
    # Another process (the CLI) may hold the write lock briefly; wait rather than fail.
    await db.execute("PRAGMA busy_timeout = 5000")
    return db


async def _migrate(db: aiosqlite.Connection) -> None:
    rows = list(await db.execute_fetchall("PRAGMA user_version"))
    version = int(rows[0][0])
    if version > SCHEMA_VERSION:
        raise SpoolVersionError(
            f"spool schema version {version} is newer than this sidecar's ({SCHEMA_VERSION}): "
            "upgrade the sidecar, or point spool.path at a new file"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        await db.executescript(
            "BEGIN IMMEDIATE;" + MIGRATIONS[target - 1] + f"; PRAGMA user_version = {target};"
            + (_seed_meta() if target == 1 else "") + "COMMIT;"
        )
        log.info("spool schema migrated to version %d", target)


def _seed_meta() -> str:
    return (
        f"INSERT INTO meta (key, value) VALUES ('spool_id', '{new_spool_id()}'), "
        "('next_id', '1');"
    )
