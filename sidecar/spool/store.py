"""The durable queue between receiving and forwarding: one SQLite file in WAL mode.

Every write goes through one writer task and one connection. Writes that arrive
while a transaction is committing wait and then share the next transaction
(group commit): each caller still learns of its own commit, yet a thousand
concurrent requests cost one fsync instead of a thousand. The whole transaction is
one function run in the connection's thread. Reads (claims for the forwarder) use
a second connection and never wait for the writer; WAL checkpoints run there too,
on a timer, so no request ever pays for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sidecar.config import MIB, SpoolConfig
from sidecar.logs import Summarised
from sidecar.spool.connection import DbThread
from sidecar.spool.schema import (
    MIGRATIONS,
    REMEMBER_IDS,
    SCHEMA_VERSION,
    SpoolVersionError,
    new_spool_id,
)

log = logging.getLogger("sidecar.spool")

Db = sqlite3.Connection

# A WAL longer than this (pages; 4 KiB each) is checkpointed to the end and rewound.
WAL_REWIND_FRAMES = 1024
# The writer finishes a checkpoint (see checkpoint()) once at most this much is left to
# copy, or after this many passes of the reader's have not got there.
WAL_FINISH_FRAMES = 64
CHECKPOINT_PASSES = 8
# A commit still running after this long means the disk stalls (a frozen or hung file
# system): said once in the log and on /readyz, while the requests go on waiting.
COMMIT_STALL_S = 5.0
LOCK_TRIES, LOCK_RETRY_S = 5, 0.02
# Free pages (4 KiB each) kept in the file for new events to reuse: a steady flow frees
# and reuses about this many, and giving them back only to grow the file again costs
# writes for nothing. Beyond it, each upkeep pass gives back this many more (about 5 ms
# of the writer's time), so that commits never wait long behind it.
RECLAIM_SLACK_PAGES = 2048
RECLAIM_STEP_PAGES = 256
AUTO_VACUUM_INCREMENTAL = 2


class SpoolFull(Exception):
    """Not enough room for the events; nothing of the request was stored."""


class DiskLow(SpoolFull):
    """The disk holding the spool has less than spool.min_free_bytes free."""


class LargerThanSpool(Exception):
    """The events alone exceed spool.max_events or spool.max_bytes: they never fit."""


class SpoolUnavailable(Exception):
    """The spool could not commit (disk full, I/O error, shutting down); nothing was stored,
    unless ``maybe_stored``: committed into a file found replaced right after (a -wal's
    a clean shutdown keeps and a crash loses; a removed spool file's the next start
    does not see)."""

    def __init__(self, message: str, maybe_stored: bool = False) -> None:
        super().__init__(message)
        self.maybe_stored = maybe_stored


class SpoolInUse(Exception):
    """Another process serves the same spool file."""


class SpoolCompacting(SpoolInUse):
    """`spool compact` holds the spool's lock while it rewrites the file."""


class IdempotencyKeyReused(Exception):
    """The idempotency key was first used for a different request; nothing was stored."""


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
    fingerprint: str | None  # of the request that carried the key
    future: asyncio.Future[list[int]]


@dataclass(slots=True)
class _Op:
    """Any other write: ``run`` inside the next group transaction (in the connection's
    thread), then ``after_commit`` with its result back on the event loop."""

    run: Callable[[Db], Any]
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


@dataclass(slots=True)
class _GroupResult:
    """What one group transaction decided, handed back from the connection's thread."""

    op_results: list[Any]
    accepted: list[_Append]
    answers: list[tuple[_Append, list[int] | BaseException]]
    evicted: tuple[int, int]
    # The counts as the file held them before this group, when another process (the CLI)
    # had changed it since the loop's counts were taken; None if it had not.
    recounted: SpoolCounts | None = None


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
    # Free bytes on the spool's disk when under spool.min_free_bytes, else None: new
    # events are refused, so that deletes and checkpoints (which need room in the WAL
    # and the file) still work. A disk filled to the last byte recorded no delivery, and
    # the same batch went upstream again and again.
    disk_low: int | None = None
    # When the commit now running began, once it has run COMMIT_STALL_S; else None.
    stalled_since: float | None = None

    def __post_init__(self) -> None:
        self._next_id = 1
        # Under drop_oldest a full spool evicts for every request: a line a minute at most.
        self._eviction_lines = Summarised(
            log, logging.WARNING,
            "spool full: %d more evictions (%d events) in the last minute (drop_oldest)")
        # Past spool.max_dead_events, every dead letter prunes one: a line a minute too.
        self._prune_lines = Summarised(
            log, logging.WARNING,
            "dead letters over spool.max_dead_events: %d more prunings (%d events) in the "
            "last minute")
        self._appends: list[_Append] = []
        self._ops: list[_Op] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._claim_cursor = 0
        self._data_version = 0
        # A slow-path transaction's recount, for the ops it runs (writer thread only).
        self._recounted: SpoolCounts | None = None
        self._finish_checkpoint = False
        self._path = path = Path(self.config.path)
        self._writer_db = DbThread(path, self.config.synchronous, "spool-writer")
        self._reader_db = DbThread(path, self.config.synchronous, "spool-reader")
        self._writer_task: asyncio.Task[None] | None = None
        self._committed = asyncio.Event()
        self._lock: int | None = None
        # Device and inode of the open file, its -wal and its -shm.
        self._files: tuple[tuple[int, int] | None, ...] | None = None
        self._unverifiable = False  # stat() of spool.path failed for a reason besides ENOENT
        # The file through spool.path (symlinks followed), its -wal and -shm (SQLite names
        # those after the resolved path), as strings: this is looked at after every commit.
        self._watched: tuple[str, ...] = (str(self._path),)
        # Their directories' inode and times: unchanged, nothing in them was added,
        # removed or renamed, and one stat a commit spares the three of the files.
        self._dirs: tuple[str, ...] = ()
        self._dir_stamps: tuple[_Stamp | None, ...] = ()
        self._replaced = False
        self._reclaims = False  # the file gives freed pages back (auto_vacuum incremental)
        self._loop: asyncio.AbstractEventLoop  # set by open()

    # -- life cycle ------------------------------------------------------------

    async def open(self) -> None:
        # Kept: on Python 3.11 each get_running_loop() is a getpid() system call, and
        # append runs once per request.
        self._loop = asyncio.get_running_loop()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = lock_spool(self._path)
        try:
            _refuse_foreign(self._path)
        except BaseException:
            self._unlock()
            raise
        await self._writer_db.start()
        try:
            await self._writer_db.call(self._load_state)
            self._watched = spool_files(self._path)
            wal_dir = str(Path(self._watched[1]).parent)
            self._dirs = tuple(dict.fromkeys((str(self._path.parent), wal_dir)))
            self._dir_stamps = _trusted(_stamps(self._dirs))  # first: a change after shows
            self._files = _identities(self._watched)
            _record_side_files(self._lock, self._files)
            await self._reader_db.start()
        except BaseException:
            await self._writer_db.close()
            self._unlock()
            raise
        self._writer_task = asyncio.create_task(self._writer(), name="spool-writer")

    def _load_state(self, db: Db) -> None:
        _migrate(db)
        # A file this process may read but not write (owned by another user, as a spool
        # brought into a bind mount can be) opens, migrates nothing and reads fine: only
        # the first insert would fail. Write once now, so start-up says so instead.
        try:
            _probe_write(db)
        except sqlite3.OperationalError as e:
            raise sqlite3.OperationalError(
                f"{e} (running as uid {os.getuid()}: the spool file, its -wal and -shm "
                "files and their directory must be writable by it)"
            ) from None
        # Checkpoints are run by checkpoint(), off the commit path.
        db.execute("PRAGMA wal_autocheckpoint = 0")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        next_id = str(meta.get("next_id"))
        if not meta.get("spool_id") or not next_id.isdigit():
            # Hand-edited, or not written by this program: refused with the reason, as
            # `spool check` reports it, rather than a traceback.
            raise sqlite3.DatabaseError(
                "the meta table lacks a spool_id, or its next_id is not a number "
                "(see `precogx-sidecar spool check`)"
            )
        self.spool_id = meta["spool_id"]
        max_id = db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        self._next_id = max(int(next_id), max_id + 1)
        self._data_version = db.execute("PRAGMA data_version").fetchone()[0]
        self.counts = _count(db)
        self._reclaims = gives_back_space(db)
        if not self._reclaims:
            log.info("the spool file, made by an earlier version, keeps the room that "
                     "delivered events freed: `precogx-sidecar spool compact`, with the "
                     "sidecar stopped, makes it give that back to the disk")

    async def close(self) -> None:
        """Commit everything already handed in, then close. New appends are refused."""
        self._closing = True
        self._wake.set()
        if self._writer_task:
            await self._writer_task
        self._eviction_lines.flush()
        self._prune_lines.flush()
        if self._lock is not None:
            # SQLite removes the -wal as the last connection closes: a CLI command must not
            # take that for the file replaced under a running sidecar.
            _mark(self._lock, b'{"state": "closing"}')
        try:
            await self._reader_db.call(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        except sqlite3.Error as e:
            log.warning("final checkpoint failed (the WAL is replayed at the next start): %s", e)
        finally:
            await self._reader_db.close()
            await self._writer_db.close()
            self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the lock; the file stays, harmless
            self._lock = None

    # -- receiving ---------------------------------------------------------------

    def allocate_ids(self, n: int) -> list[int]:
        """Ids are handed out before the commit so they can be stamped into the payload."""
        first = self._next_id
        self._next_id += n
        return list(range(first, first + n))

    def event_ref(self, event_id: int) -> str:
        """The event's name upstream: unique across sidecars, stable across retries."""
        return f"{self.spool_id}-{event_id}"

    def event_refs(self, ids: list[int]) -> list[str]:
        prefix = f"{self.spool_id}-"
        return [f"{prefix}{event_id}" for event_id in ids]

    def is_full(self) -> bool:
        c = self.counts
        return c.events >= self.config.max_events or c.bytes >= self.config.max_bytes

    def append(
        self, ids: list[int], payloads: list[bytes], idempotency_key: str | None = None,
        fingerprint: str | None = None,
    ) -> asyncio.Future[list[int]]:
        """Queue events for the next group commit; the future resolves once they are on disk.

        Resolves with the stored ids, or with the ids first answered for the same
        idempotency key (``fingerprint``: of the request, which a repeat must match).
        Raises SpoolFull, LargerThanSpool, SpoolUnavailable or IdempotencyKeyReused through
        the future.
        """
        future: asyncio.Future[list[int]] = self._loop.create_future()
        if self._closing:
            future.set_exception(SpoolUnavailable("shutting down"))
            return future
        if self.disk_low is not None:
            future.set_exception(DiskLow(
                f"the disk holding the spool has {self.disk_low // MIB} MiB free, less than "
                f"spool.min_free_bytes = {self.config.min_free_bytes}"
            ))
            return future
        size = sum(map(len, payloads))
        if len(ids) > self.config.max_events or size > self.config.max_bytes:
            # "Full, retry later" would have the client retry for ever.
            future.set_exception(LargerThanSpool(
                f"{len(ids)} events of {size} bytes: more than spool.max_events = "
                f"{self.config.max_events} or spool.max_bytes = {self.config.max_bytes}"
            ))
            return future
        self._appends.append(
            _Append(ids, payloads, size, time.time(), idempotency_key, fingerprint, future)
        )
        self._wake.set()
        return future

    # -- forwarding --------------------------------------------------------------

    @property
    def unclaimed(self) -> int:
        return self.counts.pending - len(self.inflight)

    async def claim(self, max_events: int, max_bytes: int) -> list[StoredEvent]:
        """The oldest pending events nobody is sending, up to the batch limits."""
        batch = await self._claim_after(self._claim_cursor, max_events, max_bytes)
        if not batch and self.unclaimed > 0 and self._claim_cursor:
            # Events behind the cursor became pending again (a replay, a released
            # batch): look from the start, skipping what is in flight.
            self._claim_cursor = 0
            batch = await self._claim_after(0, max_events, max_bytes)
        if batch:
            self.inflight.update(e.id for e in batch)
            # Past everything in flight, not just this batch: a claim from the start
            # (after a replay) may take ids below a batch still on its way, and claims
            # after the cursor skip nothing.
            self._claim_cursor = max(self.inflight)
        if self.unclaimed <= 0:
            self.unclaimed_since = None
        return batch

    async def _claim_after(self, cursor: int, max_events: int, max_bytes: int) -> list[StoredEvent]:
        # Ahead of the cursor nothing is in flight; from the start, skip what is.
        skip = frozenset(self.inflight) if cursor == 0 else frozenset()
        sql = (
            "SELECT id, received_at, attempts, size, payload FROM events "
            "WHERE state = 'pending' AND id > ? ORDER BY id LIMIT ?"
        )
        params = (cursor, max_events + len(skip))
        rows = await self._reader_db.call(lambda db: db.execute(sql, params).fetchall())
        batch: list[StoredEvent] = []
        total = 0
        for row in rows:
            if row[0] in skip:
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
        # A forwarder waiting for data would otherwise wait for the next new event.
        self._signal_data()

    async def delete(self, events: Sequence[StoredEvent]) -> set[int]:
        """Delivered: remove for good. The ids that were still in the file."""
        ids = [e.id for e in events]

        def run(db: Db) -> set[int]:
            present = _present(db, ids)
            _delete_events(db, [(i,) for i in present])
            return present

        def after(present: set[int]) -> None:
            # Only events still in the file count: drop_oldest may have evicted some while
            # they were being sent (and counted them then), because a claim reads its rows
            # before the loop marks them in flight.
            self.counts.pending -= len(present)
            self.counts.bytes -= sum(e.size for e in events if e.id in present)
            self.inflight.difference_update(ids)

        present: set[int] = await self._submit(run, after)
        return present

    async def reschedule(
        self, events: Sequence[StoredEvent], next_attempt_at: float, status: int | None, error: str
    ) -> None:
        """A failed attempt: count it and record why, for `spool stats` and the dead letters."""
        rows = [(next_attempt_at, status, error[:500], e.id) for e in events]
        sql = (
            "UPDATE events SET attempts = attempts + 1, next_attempt_at = ?, "
            "last_status = ?, last_error = ? WHERE id = ?"
        )

        def after(_: Any) -> None:
            for e in events:
                e.attempts += 1

        await self._submit(lambda db: db.executemany(sql, rows), after)

    async def dead_letter(
        self, events: Sequence[StoredEvent], reason: str, status: int | None, error: str
    ) -> int:
        """Keep the events, with why they could not be delivered, for list and replay. How
        many were still in the file (drop_oldest may have evicted some meanwhile)."""
        now = time.time()
        ids = [e.id for e in events]
        dead_before = self.counts.dead

        def run(db: Db) -> tuple[set[int], tuple[int, int]]:
            present = _present(db, ids)
            db.executemany(
                # An answer is an attempt; expiring (no status) is none.
                "UPDATE events SET state = 'dead', dead_reason = ?, dead_at = ?, "
                "last_status = ?, last_error = ?, attempts = attempts + (? IS NOT NULL) "
                "WHERE id = ?",
                [(reason, now, status, error[:500], status, i) for i in present],
            )
            # After a CLI replay or purge the loop's count is stale: pruning by it would
            # delete dead letters the cap has room for.
            dead = self._recounted.dead if self._recounted is not None else dead_before
            return present, self._prune_dead(db, dead + len(present))

        def after(result: tuple[set[int], tuple[int, int]]) -> None:
            present, pruned = result
            self.counts.pending -= len(present)  # as in delete()
            self.counts.dead += len(present) - pruned[0]
            self.counts.bytes -= pruned[1]
            self.inflight.difference_update(ids)
            if pruned[0]:
                self.dropped("dead_letter_pruned", pruned[0])
                self._prune_lines(
                    "dead letters over spool.max_dead_events: pruned the %d oldest",
                    pruned[0], events=pruned[0],
                )

        present, _ = await self._submit(run, after)
        return len(present)

    def _prune_dead(self, db: Db, dead: int) -> tuple[int, int]:
        excess = dead - self.config.max_dead_events
        if excess <= 0:
            return 0, 0
        rows = db.execute(
            "SELECT id, size FROM events WHERE state = 'dead' ORDER BY dead_at, id LIMIT ?",
            (excess,),
        ).fetchall()
        _delete_events(db, [(r[0],) for r in rows])
        return len(rows), sum(r[1] for r in rows)

    async def check_free_space(self) -> None:
        """Look at the room left for the spool; logs each change of disk_low.

        The room is the disk's free space plus the file's own free pages: new events reuse
        the pages delivered events freed, and reclaim() gives them back to the disk only a
        step a pass (a spool made by an earlier version, never), so after a backlog
        drained the disk looks fuller than the spool is. Low below spool.min_free_bytes; room
        again only from a quarter above it, so that hovering at the line does not flip
        events between refused and accepted every pass. The disk itself must keep a
        quarter of the reserve all the same: new commits go to the -wal first, and free
        pages are used only once a checkpoint copied them in."""
        reserve = self.config.min_free_bytes
        low = None
        if reserve:
            st = os.statvfs(self._dirs[-1])  # where the -wal is
            if not st.f_blocks:  # a file system that tells nothing of its size
                return
            disk = st.f_bavail * st.f_frsize
            free = disk + await self._reader_db.call(free_pages_bytes)
            margin = 0 if self.disk_low is None else reserve // 4
            if disk < reserve // 4 + margin:
                low = disk  # the -wal needs real disk; the file's free pages do not count
            elif free < reserve + margin:
                low = free
        if (low is None) != (self.disk_low is None):
            if low is not None:
                log.error("the disk holding the spool has %d MiB free, less than "
                          "spool.min_free_bytes: refusing events until there is room",
                          low // MIB)
            else:
                log.info("the disk holding the spool has room again: accepting events")
        self.disk_low = low

    def file_bytes(self) -> int:
        return size_on_disk(self._watched)

    async def oldest_pending_received_at(self) -> float | None:
        sql = "SELECT received_at FROM events WHERE state = 'pending' ORDER BY id LIMIT 1"
        row = await self._reader_db.call(lambda db: db.execute(sql).fetchone())
        return float(row[0]) if row else None

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait for a commit after which ``predicate()`` holds (for tests and shutdown)."""
        while not predicate():
            await self._committed.wait()

    # -- maintenance -----------------------------------------------------------

    async def checkpoint(self) -> None:
        """Copy the WAL into the database file without blocking the writer.

        Under steady load one pass never quite catches up (commits keep adding frames
        while it copies), and SQLite only rewinds a WAL that is fully copied, so the file
        would grow forever and every commit would pay for growing it. So a long WAL gets
        further passes, each copying what arrived during the last, until what is left is
        small; then the writer finishes the job between two groups. (Finishing after a
        single pass held up the commit behind it by 40-60 ms with 2 KB events.)
        """
        sql = "PRAGMA wal_checkpoint(PASSIVE)"
        for _ in range(CHECKPOINT_PASSES):
            _, frames, copied = await self._reader_db.call(lambda db: db.execute(sql).fetchone())
            if frames < WAL_REWIND_FRAMES or frames == copied:
                return  # short, or fully copied: the next commit rewinds it by itself
            if frames - copied <= WAL_FINISH_FRAMES:
                break
        self._finish_checkpoint = True

    async def reclaim(self) -> None:
        """Give the disk back some of the pages delivered events freed, RECLAIM_STEP_PAGES
        a pass, past the RECLAIM_SLACK_PAGES kept for reuse. The file shrinks when a
        checkpoint has copied the change into it."""
        self._check_open()
        if not self._reclaims:
            return
        excess = await self._reader_db.call(_free_pages) - RECLAIM_SLACK_PAGES
        if excess <= 0:
            return
        # A job of its own, between two group commits, not an op in a group's
        # transaction: see _give_back_pages.
        pages = min(excess, RECLAIM_STEP_PAGES)
        await self._writer_db.call(functools.partial(_give_back_pages, pages))

    async def prune_idempotency_keys(self) -> None:
        cutoff = (time.time() - self.idempotency_ttl_s,)
        sql = "DELETE FROM idempotency WHERE created_at < ?"
        await self._submit(lambda db: db.execute(sql, cutoff), lambda _: None)

    async def sync_external_changes(self) -> None:
        """Recount when another process (the CLI's replay or purge) changed the file."""

        def run(db: Db) -> SpoolCounts | None:
            return self._recount_if_changed(db)

        def after(counts: SpoolCounts | None) -> None:
            if counts is not None:
                self._recounted_as(counts)

        await self._submit(run, after)

    def _recounted_as(self, counts: SpoolCounts) -> None:
        self.counts = counts
        self._claim_cursor = 0  # replayed events may lie behind it
        self._signal_data()

    def _recount_if_changed(self, db: Db) -> SpoolCounts | None:
        """In the writer's thread: the counts, if another process changed the file since
        this connection last looked."""
        version = db.execute("PRAGMA data_version").fetchone()[0]
        changed = version != self._data_version
        self._data_version = version
        return _count(db) if changed else None

    # -- the writer --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._writer_task is None or self._writer_task.done():
            raise SpoolUnavailable("spool is closed")

    async def _submit(self, run: Callable[[Db], Any], after: Callable[[Any], None]) -> Any:
        self._check_open()
        future: asyncio.Future[Any] = self._loop.create_future()
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
        taken = n = 0
        for a in self._appends:
            n += 1
            taken += len(a.ids)
            if taken >= self.config.commit_max_events:
                break
        group, self._appends = self._appends[:n], self._appends[n:]
        return group

    async def _commit(self, appends: list[_Append], ops: list[_Op]) -> None:
        # Snapshots, so the connection's thread never reads state the loop is changing.
        counts = (self.counts.events, self.counts.bytes)
        inflight = frozenset(self.inflight) if self.config.when_full == "drop_oldest" else None
        checkpoint, self._finish_checkpoint = self._finish_checkpoint, False
        started = time.monotonic()
        watchdog = self._loop.call_later(COMMIT_STALL_S, self._stalled, started)
        # After a failure, only a group that really wrote proves the spool commits again:
        # a read-only op (or BEGIN/COMMIT) succeeds on a read-only file too.
        probe = self.write_error is not None
        committed = False
        try:
            if self._replaced:
                # Known to be replaced: check before writing, so that refused requests
                # are not stored after all (in a file the next start may still see).
                self._check_file()
            result = await self._writer_db.call(
                lambda db: self._transaction(db, appends, ops, counts, inflight, checkpoint, probe)
            )
            committed = True
            # Here, not in the connection's thread: there the stat would hand the GIL
            # to the busy event loop and wait (up to a switch interval) to get it back.
            self._check_file()
        except Exception as e:  # whatever it is, the writer must go on
            # sqlite3 and OS errors above all, but anything a bad value raises in binding
            # too: those requests are refused, and the spool keeps taking the others.
            self._fail(appends, ops, e, maybe_stored=committed)
            return
        finally:
            watchdog.cancel()
            if self.stalled_since is not None:
                log.info("spool commit finished after %.1f s", time.monotonic() - started)
                self.stalled_since = None
        if self.write_error is not None:
            log.info("spool commits again")
            self.write_error = None
        if result.recounted is not None:  # before anything this group changed
            self._recounted_as(result.recounted)
        for op, op_result in zip(ops, result.op_results, strict=True):
            op.after_commit(op_result)
            if not op.future.done():
                op.future.set_result(op_result)
        self._count_evicted(*result.evicted)
        for a in result.accepted:
            self.counts.pending += len(a.ids)
            self.counts.bytes += a.size
        for a, answer in result.answers:
            if a.future.done():
                continue
            if isinstance(answer, BaseException):
                a.future.set_exception(answer)
            else:
                a.future.set_result(answer)
        if result.accepted:
            self._signal_data()
        # Wake everyone waiting for "the next commit", then start a fresh round.
        self._committed.set()
        self._committed = asyncio.Event()

    def _transaction(
        self, db: Db, appends: list[_Append], ops: list[_Op],
        counts: tuple[int, int], inflight: frozenset[int] | None, checkpoint: bool,
        probe: bool = False,
    ) -> _GroupResult:
        """One group commit, run in the writer connection's thread."""
        if probe:
            _probe_write(db)
        if not ops and not checkpoint and self._plain(appends, counts):
            # The common case as one statement in autocommit mode, which SQLite commits
            # as a transaction of its own. Every statement costs this thread a wait for
            # the GIL (up to a switch interval while the event loop is busy), so four
            # statements where one does would make each commit, and its p99, longer.
            self._insert(db, appends)
            return _GroupResult([], appends, [(a, a.ids) for a in appends], (0, 0))
        if checkpoint:  # see checkpoint(): no other writer now, so it completes
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        db.execute("BEGIN IMMEDIATE")
        try:
            # Decisions below go by the counts: after a CLI purge or replay, the loop's are
            # stale (too high), and drop_oldest would evict, or pruning delete, for nothing.
            # (The single INSERT above is safe with them: counts only ever fall that way.)
            self._recounted = recounted = self._recount_if_changed(db)
            if recounted is not None:
                counts = (recounted.events, recounted.bytes)
            # Ops first: a recount among them then sees the file before this group's inserts.
            op_results = [op.run(db) for op in ops]
            accepted, answers, evicted = self._admit(db, appends, counts, inflight)
            self._insert(db, accepted)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if self._recounted is not None:
                self._data_version = -1  # the recount is lost with the group: again next time
            raise
        finally:
            self._recounted = None
        return _GroupResult(op_results, accepted, answers, evicted, recounted)

    def _stalled(self, started: float) -> None:
        self.stalled_since = started
        log.error("spool commit has not finished after %.0f s: the disk stalls; requests "
                  "wait for it", time.monotonic() - started)

    def _check_file(self) -> None:
        """After each commit, before anyone is answered: the commit went into the file at
        spool.path, through the -wal and -shm files any other process (the CLI) uses.
        Removed or replaced while open, SQLite goes on writing to the old inode: whatever
        it held is gone at the next start (the file), lost at a crash (the -wal), or a
        CLI's write is mixed with the sidecar's and the file corrupted (-wal, -shm)."""
        try:
            stamps = _stamps(self._dirs)
            if stamps == self._dir_stamps and not self._replaced:
                return
            now = _identities(self._watched)
        except OSError as e:
            # EACCES on the directory, say: this cannot tell, and the commit did happen;
            # refusing it would answer 503 "nothing was stored" for stored events.
            if not self._unverifiable:
                log.warning("cannot check that %s is still the open spool file: %s",
                            self._path, e)
            self._unverifiable = True
            return
        self._unverifiable = False
        self._replaced = now != self._files
        if not self._replaced:
            self._dir_stamps = _trusted(stamps)  # another file came or went beside it
        else:
            names = [n for n, a, b in zip(("", "-wal", "-shm"), now, self._files or (), strict=True)
                     if a != b]
            which = ", ".join(f"{self._path}{n}" for n in names)
            kept = ("what was committed since is only in the file removed, which the next "
                    "start will not see" if "" in names else
                    "SIGTERM: its final checkpoint keeps what it holds")
            raise FileNotFoundError(
                f"{which} was removed or replaced while the sidecar ran: refusing events "
                f"until it is restarted ({kept})"
            )

    def _plain(self, appends: list[_Append], counts: tuple[int, int]) -> bool:
        """Appends that fit, need no idempotency lookup and make one INSERT statement."""
        events = sum(len(a.ids) for a in appends)
        return (
            events <= MAX_INSERT_ROWS
            and all(a.idempotency_key is None for a in appends)
            and counts[0] + events <= self.config.max_events
            and counts[1] + sum(a.size for a in appends) <= self.config.max_bytes
        )

    def _fail(
        self, appends: list[_Append], ops: list[_Op], error: BaseException,
        maybe_stored: bool = False,
    ) -> None:
        failure = f"{type(error).__name__}: {error}"
        if failure != self.write_error:  # one line per change, not one per commit
            log.error("spool commit failed, requests refused until it commits again: %s",
                      failure)
        self.write_error = failure
        futures: list[asyncio.Future[Any]] = [a.future for a in appends]
        futures += [op.future for op in ops]
        for future in futures:
            if not future.done():
                future.set_exception(SpoolUnavailable(self.write_error, maybe_stored))

    def _admit(
        self, db: Db, appends: list[_Append], counts: tuple[int, int],
        inflight: frozenset[int] | None,
    ) -> tuple[list[_Append], list[tuple[_Append, list[int] | BaseException]], tuple[int, int]]:
        """Decide each append's fate inside the transaction: store, answer as a repeat, refuse.

        Returns the appends to insert, every append's answer, and what drop_oldest evicted.
        """
        earlier = self._known_keys(db, [a.idempotency_key for a in appends])
        accepted: list[_Append] = []
        answers: list[tuple[_Append, list[int] | BaseException]] = []
        events, size = counts
        evicted_events = evicted_bytes = 0
        for a in appends:
            key = a.idempotency_key
            if key is not None and key in earlier:
                answers.append((a, _repeat(earlier[key], a.fingerprint)))
                continue
            over = events + len(a.ids) - self.config.max_events
            over_bytes = size + a.size - self.config.max_bytes
            if over > 0 or over_bytes > 0:
                freed = None if inflight is None else _evict_oldest(db, over, over_bytes, inflight)
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
                earlier[key] = (a.ids, a.fingerprint)
        return accepted, answers, (evicted_events, evicted_bytes)

    def _known_keys(self, db: Db, keys: list[str | None]) -> dict[str, _FirstUse]:
        wanted = [k for k in keys if k is not None]
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        rows = db.execute(
            f"SELECT key, ids, fingerprint FROM idempotency WHERE key IN ({marks}) "
            "AND created_at >= ?",
            (*wanted, time.time() - self.idempotency_ttl_s),
        )
        return {key: (orjson.loads(ids), fingerprint) for key, ids, fingerprint in rows}

    def _insert(self, db: Db, accepted: list[_Append]) -> None:
        if not accepted:
            return
        params: list[Any] = []
        for a in accepted:
            for event_id, payload in zip(a.ids, a.payloads, strict=True):
                params += (event_id, a.received_at, len(payload), payload)
        _insert_events(db, params)
        keyed = [
            (a.idempotency_key, a.received_at, orjson.dumps(a.ids).decode(), a.fingerprint)
            for a in accepted
            if a.idempotency_key is not None
        ]
        if keyed:
            db.executemany(
                "INSERT OR REPLACE INTO idempotency (key, created_at, ids, fingerprint) "
                "VALUES (?, ?, ?, ?)", keyed
            )

    def _count_evicted(self, events: int, size: int) -> None:
        if not events:
            return
        self.counts.pending -= events
        self.counts.bytes -= size
        self.dropped("spool_full", events)
        self._eviction_lines("spool full: dropped the %d oldest pending events (drop_oldest)",
                             events, events=events)

    def _signal_data(self) -> None:
        if self.unclaimed > 0:
            if self.unclaimed_since is None:
                self.unclaimed_since = time.monotonic()
            self.data_ready.set()


# The ids first answered for an idempotency key, and the fingerprint of that request.
_FirstUse = tuple[list[int], str | None]


def _repeat(first: _FirstUse, fingerprint: str | None) -> list[int] | BaseException:
    """The answer to a request repeating a key: the first answer, unless it differs from
    the first request (a key stored before fingerprints were kept matches any)."""
    ids, first_fingerprint = first
    if None not in (first_fingerprint, fingerprint) and fingerprint != first_fingerprint:
        return IdempotencyKeyReused()
    return ids


# Rows per multi-row INSERT. executemany() would release and retake the GIL once per
# row, and on a busy loop each retake can wait a whole switch interval; one statement
# per MAX_INSERT_ROWS keeps the SQLite work in a single GIL-free step. 4 x 256 bound
# parameters stay far below SQLite's limit (32766 since 3.32).
MAX_INSERT_ROWS = 256
INSERT_COLUMNS = 4


@functools.cache
def _insert_sql(rows: int) -> str:
    """One statement per row count: sqlite3 keeps each prepared (cached_statements)."""
    values = ",".join(["(?, ?, ?, ?)"] * rows)
    return f"INSERT INTO events (id, received_at, size, payload) VALUES {values}"


def _insert_events(db: Db, params: list[Any]) -> None:
    """``params``: id, received_at, size, payload for each event, one flat list."""
    width = MAX_INSERT_ROWS * INSERT_COLUMNS
    for start in range(0, len(params), width):
        chunk = params[start:start + width]
        db.execute(_insert_sql(len(chunk) // INSERT_COLUMNS), chunk)


def _present(db: Db, ids: list[int]) -> set[int]:
    """Which of ``ids`` are still in the file."""
    marks = ",".join("?" * len(ids))
    return {row[0] for row in db.execute(f"SELECT id FROM events WHERE id IN ({marks})", ids)}


def _delete_events(db: Db, ids: list[tuple[int]]) -> None:
    db.execute(REMEMBER_IDS)
    db.executemany("DELETE FROM events WHERE id = ?", ids)


def _evict_oldest(
    db: Db, events: int, size: int, inflight: frozenset[int]
) -> tuple[int, int] | None:
    """drop_oldest: delete the oldest pending events not in flight; None if not enough."""
    rows = db.execute(
        "SELECT id, size FROM events WHERE state = 'pending' ORDER BY id LIMIT ?",
        (max(events, 0) + len(inflight) + 1000,),
    ).fetchall()
    victims: list[int] = []
    freed_events = freed_bytes = 0
    for event_id, event_size in rows:
        if freed_events >= events and freed_bytes >= size:
            break
        if event_id in inflight:
            continue
        victims.append(event_id)
        freed_events += 1
        freed_bytes += event_size
    if freed_events < events or freed_bytes < size:
        return None
    _delete_events(db, [(v,) for v in victims])
    return freed_events, freed_bytes


def _count(db: Db) -> SpoolCounts:
    counts = SpoolCounts()
    for state, n, size in db.execute(
        "SELECT state, count(*), coalesce(sum(size), 0) FROM events GROUP BY state"
    ):
        if state == "dead":
            counts.dead = n
        else:
            counts.pending += n
        counts.bytes += size
    return counts


def spool_files(path: Path) -> tuple[str, str, str]:
    """The file through ``path`` (symlinks followed), its -wal and its -shm: SQLite names
    those after the resolved path."""
    real = path.resolve()
    return str(path), f"{real}-wal", f"{real}-shm"


def size_on_disk(files: Iterable[str]) -> int:
    """Their sizes added up; one that cannot be looked at counts 0 (this runs at a metrics
    scrape, which must still answer)."""
    total = 0
    for path in files:
        with contextlib.suppress(OSError):
            total += os.stat(path).st_size
    return total


def _stat(path: str | Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _identity(path: str | Path) -> tuple[int, int] | None:
    st = _stat(path)
    return None if st is None else (st.st_dev, st.st_ino)


def _free_pages(db: Db) -> int:
    return int(db.execute("PRAGMA freelist_count").fetchone()[0])


def gives_back_space(db: Db) -> bool:
    """Whether the file can give freed pages back (made with auto_vacuum incremental)."""
    return bool(db.execute("PRAGMA auto_vacuum").fetchone()[0] == AUTO_VACUUM_INCREMENTAL)


def free_pages_bytes(db: Db) -> int:
    return _free_pages(db) * int(db.execute("PRAGMA page_size").fetchone()[0])


def _give_back_pages(pages: int, db: Db) -> None:
    """Move ``pages`` free pages to the end of the file and cut them off, as a transaction
    of its own. executescript, because each step of this PRAGMA frees one page and
    execute() takes only the first step; and it runs every step with the GIL released
    once (per statement, this thread would wait for a busy event loop each time)."""
    if db.in_transaction:  # executescript would commit it: a group left half-written
        raise sqlite3.OperationalError("a transaction is open on the writer's connection")
    db.executescript(f"PRAGMA incremental_vacuum({int(pages)});")


def _identities(paths: tuple[str, ...]) -> tuple[tuple[int, int] | None, ...]:
    return tuple([_identity(path) for path in paths])


_Stamp = tuple[int, int, int, int]
RACY_NS = 2_100_000_000  # past any file system's timestamp tick (FAT: 2 s; ext3: 1 s)


def _trusted(stamps: tuple[_Stamp | None, ...]) -> tuple[_Stamp | None, ...]:
    """The stamps, or () (matching none) while a directory's last change is within the
    clock's coarse tick: a rename within the same tick would leave its times as they
    are, and go unseen (git's "racy clean")."""
    last = max((st[3] for st in stamps if st), default=0)
    return () if time.time_ns() - last < RACY_NS else stamps


def _stamps(dirs: tuple[str, ...]) -> tuple[_Stamp | None, ...]:
    """Device, inode, modification and change time (ns) of each directory: any file
    added, removed or renamed in one changes them (see _check_file for coarse ticks)."""
    stats = [_stat(path) for path in dirs]
    return tuple(None if st is None else (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
                 for st in stats)


def _record_side_files(lock: int, files: tuple[tuple[int, int] | None, ...]) -> None:
    """Write the -wal's and -shm's identities into the lock file, for the CLI: one of them
    replaced under the running sidecar, a CLI write would go where the sidecar does not
    look (see admin.open_spool)."""
    record = orjson.dumps({"wal": files[1], "shm": files[2]})
    if not _mark(lock, record):  # a full disk, say: the CLI then checks less
        log.warning("cannot record the spool's -wal and -shm in its lock file")


def _mark(lock: int, record: bytes) -> bool:
    """Replace what the lock file says; if that fails, leave it empty (the CLI then only
    checks that the -wal and -shm exist), never a stale record."""
    try:
        os.ftruncate(lock, 0)
        os.pwrite(lock, record, 0)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(lock, 0)
        return False


def replaced_under_sidecar(real: Path) -> str | None:
    """"-wal" or "-shm" if a running sidecar holds the lock on the spool at ``real`` (its
    resolved path) and that file is not the one it opened, as its lock file records it
    (see _mark); else None. For the CLI, before it writes."""
    try:
        fd = os.open(f"{real}.lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: a sidecar runs
        else:
            return None
        try:
            recorded = orjson.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, orjson.JSONDecodeError):
            recorded = {}  # unreadable: only whether the files are there can be told
    finally:
        os.close(fd)
    if not isinstance(recorded, dict) or "state" in recorded:
        return None  # starting up or closing: its files come and go, nothing to compare
    for suffix in ("-wal", "-shm"):
        try:
            found = _identity(f"{real}{suffix}")
        except OSError:
            continue
        if found is None:
            return suffix  # a running sidecar always has both
        if recorded.get(suffix[1:]) not in (None, list(found)):
            return suffix
    return None


def _refuse_foreign(path: Path) -> None:
    """An SQLite file that is no spool (user_version 0 but tables of its own): another
    program's database named by mistake. Refused before anything (WAL mode, the schema)
    is written to it."""
    if not path.exists() or path.stat().st_size == 0 or not path.is_file():
        return
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return  # open() reports it
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        objects = [r[0] for r in db.execute("SELECT name FROM sqlite_master LIMIT 5")]
    except sqlite3.Error:
        return  # open() reports it ("file is not a database", ...)
    finally:
        db.close()
    if version == 0 and objects:
        raise SpoolVersionError(
            f"{path} is an SQLite database but no spool (it holds {', '.join(objects)}): "
            "point spool.path at a file of its own"
        )


COMPACTING = b'{"state": "compacting"}'


def lock_spool(spool: Path, record: bytes = b'{"state": "starting"}') -> int:
    """An exclusive lock on the spool's lock file for as long as the returned descriptor
    is open (the kernel drops it when the process dies, however it dies). Two sidecars on
    one spool would hand out the same ids for different events, and each would deliver
    and delete what the other stored. Named after the file itself, so that no symlink or
    relative path gets round it. `spool compact` holds it too (``record``: says so)."""
    path = Path(f"{spool.resolve()}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    # A few tries: a CLI command looks whether a sidecar runs by taking the lock shared
    # for an instant, and a sidecar starting in that instant must not give up.
    for attempt in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == LOCK_TRIES - 1:
                holder = os.pread(fd, len(COMPACTING), 0)
                os.close(fd)
                if holder == COMPACTING:
                    raise SpoolCompacting(
                        "`precogx-sidecar spool compact` is rewriting this spool; start the "
                        "sidecar when it has finished"
                    ) from None
                raise SpoolInUse(
                    f"another sidecar is running on this spool (it holds {path}); each "
                    "sidecar needs a spool.path of its own"
                ) from None
            time.sleep(LOCK_RETRY_S)
    _mark(fd, record)  # the last run's record is no longer true
    return fd


def _probe_write(db: Db) -> None:
    """Raises what a write would (e.g. "attempt to write a readonly database")."""
    db.execute("UPDATE meta SET value = value WHERE key = 'next_id'")


def _migrate(db: Db) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SpoolVersionError(
            f"spool schema version {version} is newer than this sidecar's ({SCHEMA_VERSION}): "
            "upgrade the sidecar, or point spool.path at a new file"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        seed = _seed_meta() if target == 1 else ""
        db.executescript(
            f"BEGIN IMMEDIATE; {MIGRATIONS[target - 1]}; {seed} "
            f"PRAGMA user_version = {target}; COMMIT;"
        )
        log.info("spool schema migrated to version %d", target)


def _seed_meta() -> str:
    return (
        f"INSERT INTO meta (key, value) VALUES ('spool_id', '{new_spool_id()}'), "
        "('next_id', '1');"
    )
