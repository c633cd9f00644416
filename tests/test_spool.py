"""The spool on its own: real SQLite files, no HTTP."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from sidecar.config import SpoolConfig
from sidecar.spool import (
    IdempotencyKeyReused,
    Spool,
    SpoolFull,
    SpoolInUse,
    SpoolUnavailable,
    SpoolVersionError,
    admin,
    store,
)
from sidecar.spool.schema import MIGRATIONS, SCHEMA_VERSION


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(SpoolConfig(path=str(tmp_path / "spool.db"), max_events=100))
    await s.open()
    yield s
    await s.close()


async def opened(path: Path) -> Spool:
    """A spool on ``path`` with the default configuration, open."""
    spool = Spool(SpoolConfig(path=str(path)))
    await spool.open()
    return spool


async def put(spool: Spool, n: int, key: str | None = None) -> list[int]:
    ids = spool.allocate_ids(n)
    return await spool.append(ids, [b'{"n": %d}' % i for i in ids], key)


async def test_new_spool_is_versioned_and_named(spool: Spool, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "spool.db") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert len(spool.spool_id) == 12
    assert spool.event_ref(5) == f"{spool.spool_id}-5"
    assert spool.event_refs([5, 6]) == [spool.event_ref(5), spool.event_ref(6)]


async def test_concurrent_appends_share_commits_and_all_land(spool: Spool) -> None:
    results = await asyncio.gather(*(put(spool, 1) for _ in range(50)))
    ids = [i for r in results for i in r]
    assert len(set(ids)) == 50
    assert spool.counts.pending == 50


async def test_ids_never_repeat_after_the_spool_drains(tmp_path: Path) -> None:
    config = SpoolConfig(path=str(tmp_path / "s.db"))
    first = Spool(config)
    await first.open()
    ids = await put(first, 3)
    await first.delete(await first.claim(10, 1 << 20))
    await first.close()
    second = Spool(config)
    await second.open()
    assert min(await put(second, 1)) > max(ids)
    assert second.spool_id == first.spool_id
    await second.close()


async def test_claim_respects_limits_and_skips_inflight(spool: Spool) -> None:
    await put(spool, 10)
    first = await spool.claim(4, 1 << 20)
    second = await spool.claim(4, 1 << 20)
    assert [e.id for e in first] == [1, 2, 3, 4]
    assert [e.id for e in second] == [5, 6, 7, 8]
    assert spool.unclaimed == 2
    by_bytes = await spool.claim(10, 16)
    assert len(by_bytes) == 1  # always at least one, even if larger than the limit


async def test_released_events_are_claimed_again(spool: Spool) -> None:
    await put(spool, 3)
    batch = await spool.claim(3, 1 << 20)
    spool.release(batch)
    assert [e.id for e in await spool.claim(3, 1 << 20)] == [1, 2, 3]


async def test_reschedule_and_dead_letter_are_recorded(spool: Spool, tmp_path: Path) -> None:
    await put(spool, 2)
    batch = await spool.claim(2, 1 << 20)
    await spool.reschedule(batch, 123.0, 503, "HTTP 503: busy")
    await spool.dead_letter(batch[:1], "rejected", 400, "HTTP 400: bad")
    with sqlite3.connect(tmp_path / "spool.db") as db:
        rows = db.execute(
            "SELECT id, state, attempts, last_status, last_error, dead_reason FROM events"
        ).fetchall()
    assert rows == [
        (1, "dead", 2, 400, "HTTP 400: bad", "rejected"),
        (2, "pending", 1, 503, "HTTP 503: busy", None),
    ]
    assert (spool.counts.pending, spool.counts.dead) == (1, 1)


async def test_full_spool_refuses_whole_requests(tmp_path: Path) -> None:
    s = Spool(SpoolConfig(path=str(tmp_path / "s.db"), max_events=5))
    await s.open()
    await put(s, 4)
    with pytest.raises(SpoolFull):
        await put(s, 2)
    assert s.counts.pending == 4
    await s.close()


async def test_idempotent_repeat_returns_first_ids(spool: Spool) -> None:
    first = await put(spool, 2, key="k")
    assert await put(spool, 2, key="k") == first
    assert spool.counts.pending == 2


async def test_a_key_reused_for_another_request_is_refused(spool: Spool) -> None:
    ids = spool.allocate_ids(1)
    first = await spool.append(ids, [b"{}"], "k", "fingerprint-a")
    # In the same group commit as in a later one.
    again, other = await asyncio.gather(
        spool.append(spool.allocate_ids(1), [b"{}"], "k", "fingerprint-a"),
        spool.append(spool.allocate_ids(1), [b"{}"], "k", "fingerprint-b"),
        return_exceptions=True,
    )
    assert again == first
    assert isinstance(other, IdempotencyKeyReused)
    with pytest.raises(IdempotencyKeyReused):
        await spool.append(spool.allocate_ids(1), [b"{}"], "k", "fingerprint-b")
    assert spool.counts.pending == 1


async def test_keys_stored_before_fingerprints_match_any_request(tmp_path: Path) -> None:
    """A spool of schema version 1 is migrated; its keys had no fingerprint."""
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[0])
        db.execute("INSERT INTO meta VALUES ('spool_id', 'abcdef012345'), ('next_id', '8')")
        db.execute("INSERT INTO idempotency VALUES ('k', ?, '[7]')", (time.time(),))
        db.execute("PRAGMA user_version = 1")
    s = await opened(path)
    assert await s.append(s.allocate_ids(1), [b"{}"], "k", "any") == [7]
    await s.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


async def test_expired_idempotency_keys_are_forgotten(tmp_path: Path) -> None:
    s = Spool(SpoolConfig(path=str(tmp_path / "s.db")), idempotency_ttl_s=1e-9)
    await s.open()
    first = await put(s, 1, key="k")
    await s.prune_idempotency_keys()
    assert await put(s, 1, key="k") != first
    await s.close()


async def test_close_commits_what_was_handed_in_then_refuses(tmp_path: Path) -> None:
    s = Spool(SpoolConfig(path=str(tmp_path / "s.db")))
    await s.open()
    ids = s.allocate_ids(1)
    pending = s.append(ids, [b"{}"])
    await s.close()
    assert await pending == ids
    with pytest.raises(SpoolUnavailable):
        await s.append(s.allocate_ids(1), [b"{}"])


async def test_a_value_sqlite_cannot_bind_refuses_its_group_and_the_writer_goes_on(
    spool: Spool,
) -> None:
    # Bounded: the error used to kill the writer, and every later append hung.
    with pytest.raises(SpoolUnavailable):
        await asyncio.wait_for(put(spool, 1, key="\udcff"), 30)  # a lone surrogate
    assert await asyncio.wait_for(put(spool, 1), 30) == [2]


async def test_a_second_spool_on_the_same_file_is_refused(tmp_path: Path) -> None:
    config = SpoolConfig(path=str(tmp_path / "s.db"))
    first = Spool(config)
    await first.open()
    with pytest.raises(SpoolInUse, match="another sidecar is running on this spool"):
        await Spool(config).open()
    (tmp_path / "alias.db").symlink_to(tmp_path / "s.db")
    with pytest.raises(SpoolInUse):
        await Spool(SpoolConfig(path=str(tmp_path / "alias.db"))).open()
    await first.close()
    second = Spool(config)
    await second.open()  # free again once the first is closed
    await second.close()


@pytest.mark.parametrize("outcome", ["delivered", "dead_lettered"])
async def test_events_evicted_while_in_flight_are_not_counted_twice(
    tmp_path: Path, outcome: str
) -> None:
    """drop_oldest may evict a batch whose rows a claim has read but the loop has not yet
    marked in flight (the claim's read and the eviction run in two threads). Its delivery
    or dead letter then finds nothing to remove: counting the batch again drove pending
    below what the file holds, and the forwarder stopped claiming."""
    s = Spool(SpoolConfig(path=str(tmp_path / "s.db"), max_events=3, when_full="drop_oldest"))
    await s.open()
    await put(s, 3)
    read = await s._claim_after(0, 3, 1 << 20)  # read, not yet marked in flight
    newer = await put(s, 3)  # evicts the three just read
    s.inflight.update(e.id for e in read)
    if outcome == "delivered":
        await s.delete(read)
    else:
        await s.dead_letter(read, "rejected", 400, "bad")
    with sqlite3.connect(tmp_path / "s.db") as db:
        rows, size = db.execute("SELECT count(*), sum(size) FROM events").fetchone()
    assert (s.counts.pending, s.counts.dead, s.counts.bytes, s.inflight) == (3, 0, size, set())
    assert rows == 3
    assert [e.id for e in await s.claim(10, 1 << 20)] == newer
    await s.close()


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_a_spool_file_removed_while_open_refuses_what_it_cannot_keep(
    tmp_path: Path, how: str
) -> None:
    """SQLite goes on writing to the old inode, which the next start never sees: every
    commit after the file went is refused, before anyone is answered."""
    path = tmp_path / "s.db"
    s = await opened(path)
    await put(s, 1)
    if how == "removed":
        path.unlink()
    else:
        (tmp_path / "other.db").write_bytes(path.read_bytes())
        (tmp_path / "other.db").replace(path)
    with pytest.raises(SpoolUnavailable, match="removed or replaced"):
        await put(s, 1)
    assert s.write_error is not None
    await s.close()


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
async def test_a_wal_or_shm_removed_while_open_refuses_events(
    tmp_path: Path, suffix: str
) -> None:
    """Commits after the -wal went live only in a deleted file until the next checkpoint
    (a crash loses them), and a CLI write through a new -wal or -shm is mixed with the
    sidecar's: refused, as for the file itself."""
    path = tmp_path / "s.db"
    s = await opened(path)
    await put(s, 1)
    (tmp_path / f"s.db{suffix}").unlink()
    with pytest.raises(SpoolUnavailable, match=f"s.db{suffix} was removed or replaced"):
        await put(s, 1)
    # Known to be gone: refused before anything is written.
    with pytest.raises(SpoolUnavailable, match="removed or replaced"):
        await put(s, 1)
    await s.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 2


async def test_a_spool_path_that_cannot_be_checked_keeps_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stat() failing for another reason than ENOENT (the directory made unsearchable)
    says nothing of the file: the commit happened and is answered as such, not with a
    503 "nothing was stored"."""
    import sidecar.spool.store as store

    s = Spool(SpoolConfig(path=str(tmp_path / "s.db")))
    await s.open()

    def denied(path: Path) -> tuple[int, int] | None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(store, "_identity", denied)
    # What makes a directory unsearchable (chmod) changes its times, as any file added
    # beside the spool does: the files are looked at then, not at every commit.
    (tmp_path / "beside").touch()
    assert await put(s, 2) == [1, 2]
    assert s._unverifiable  # the files were looked at, and could not be
    assert s.counts.pending == 2 and s.write_error is None
    monkeypatch.undo()
    await s.close()


async def test_an_sqlite_file_that_is_no_spool_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    s = Spool(SpoolConfig(path=str(path)))
    with pytest.raises(SpoolVersionError, match="no spool"):
        await s.open()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["users"]


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
async def test_the_cli_refuses_a_spool_whose_wal_or_shm_went_under_the_sidecar(
    spool: Spool, tmp_path: Path, suffix: str
) -> None:
    """With the -wal gone, a CLI write restarted a new -wal through the index it shares
    with the sidecar, whose checkpoints then made the file "not a database"; with the
    -shm gone, the sidecar silently undid a purge the CLI had reported done."""
    path = tmp_path / "spool.db"
    await put(spool, 1)
    with admin.open_spool(str(path)):
        pass  # untouched: fine beside the sidecar
    (tmp_path / f"spool.db{suffix}").unlink()
    refused = pytest.raises(admin.AdminError, match=f"spool.db{suffix} was removed or replaced")
    with refused, admin.open_spool(str(path)):
        pass


async def test_a_stalled_commit_is_reported_while_it_waits(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen or hung file system: the commit neither ends nor fails. /readyz said "ok"
    for as long as it lasted, with nothing in the log, while every request hung."""
    import sidecar.spool.store as store

    monkeypatch.setattr(store, "COMMIT_STALL_S", 0.05)
    disk = threading.Event()  # the stalled disk, released by the test
    reported = asyncio.Event()
    stalled = spool._stalled

    def report(started: float) -> None:
        stalled(started)
        reported.set()

    monkeypatch.setattr(spool, "_stalled", report)
    stall = asyncio.ensure_future(spool._writer_db.call(lambda db: disk.wait(30)))
    pending = asyncio.ensure_future(put(spool, 1))
    await asyncio.wait_for(reported.wait(), 30)
    assert spool.stalled_since is not None and not pending.done()
    disk.set()
    assert await pending == [1]
    await stall
    assert spool.stalled_since is None


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    s = Spool(SpoolConfig(path=str(path)))
    with pytest.raises(SpoolVersionError, match="newer than this sidecar"):
        await s.open()


async def test_external_changes_are_noticed(spool: Spool, tmp_path: Path) -> None:
    await put(spool, 3)
    with sqlite3.connect(tmp_path / "spool.db") as db:
        db.execute("DELETE FROM events WHERE id = 1")
    await spool.sync_external_changes()
    assert spool.counts.pending == 2


async def test_a_recount_lost_with_a_failed_group_is_made_again(
    spool: Spool, tmp_path: Path
) -> None:
    """A group that recounts after an outside change and then fails loses the recount;
    the change had been marked as seen, so the counts stayed stale until the next one."""
    await put(spool, 3, key="k")  # a keyed append: the recounting kind of group
    with sqlite3.connect(tmp_path / "spool.db") as db:
        db.execute("DELETE FROM events WHERE id = 1")  # a CLI purge, say
    failing = spool.append(spool.allocate_ids(1), [["not", "bytes"]], "k2")  # type: ignore[list-item]
    with pytest.raises(SpoolUnavailable):  # the group fails binding its payload
        await failing
    await spool.sync_external_changes()
    assert spool.counts.pending == 2


async def test_dead_letter_says_how_many_were_still_there(
    spool: Spool, tmp_path: Path
) -> None:
    """drop_oldest may evict a batch's events while it is on its way: they were counted
    as dropped then, and must not be counted as dead-lettered too."""
    await put(spool, 2)
    batch = await spool.claim(10, 1 << 20)
    with sqlite3.connect(tmp_path / "spool.db") as db:
        db.execute("DELETE FROM events WHERE id = ?", (batch[0].id,))  # evicted meanwhile
    assert await spool.dead_letter(batch, "rejected", 400, "HTTP 400") == 1


async def test_failed_commit_refuses_and_reports(spool: Spool, tmp_path: Path) -> None:
    # Another process holding the write lock past busy_timeout makes the commit fail.
    blocker = sqlite3.connect(tmp_path / "spool.db", timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        await spool._writer_db.call(lambda db: db.execute("PRAGMA busy_timeout = 50"))
        with pytest.raises(SpoolUnavailable):
            await put(spool, 1)
        assert spool.write_error is not None
    finally:
        blocker.rollback()
        blocker.close()
    assert await put(spool, 1)
    assert spool.write_error is None


async def test_spool_that_cannot_write_stays_unwritable_until_a_write_commits(
    spool: Spool,
) -> None:
    # A spool file this process cannot write (owned by another user, say) fails every
    # write, while work that writes nothing (BEGIN IMMEDIATE ... COMMIT around a recount,
    # a checkpoint) still succeeds: that must not count as "commits again". An authorizer
    # that refuses writes stands in for the file mode, which root (CI) would ignore.
    def refuse_writes(action: int, *_: object) -> int:
        writes = (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE)
        return sqlite3.SQLITE_DENY if action in writes else sqlite3.SQLITE_OK

    def error(s: Spool) -> str | None:
        return s.write_error

    await spool._writer_db.call(lambda db: db.set_authorizer(refuse_writes))
    with pytest.raises(SpoolUnavailable):
        await put(spool, 1)
    with pytest.raises(SpoolUnavailable):  # writes nothing itself, but must not pass
        await spool.sync_external_changes()
    assert error(spool) is not None
    await spool._writer_db.call(lambda db: db.set_authorizer(None))
    await spool.sync_external_changes()
    assert error(spool) is None
    assert await put(spool, 1)


async def test_read_only_spool_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    first = await opened(path)
    await first.close()
    s = Spool(SpoolConfig(path=str(path)))
    configure = s._writer_db._configure

    def read_only(db: sqlite3.Connection) -> None:
        configure(db)
        db.execute("PRAGMA query_only = ON")  # see above

    s._writer_db._configure = read_only  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError, match=r"readonly.*running as uid"):
        await s.open()


async def test_groups_larger_than_one_insert_land_whole(tmp_path: Path) -> None:
    big = Spool(SpoolConfig(path=str(tmp_path / "big.db")))
    await big.open()
    sizes = [300, 1, 255, 2, 700]  # one group holds more rows than one INSERT statement
    results = await asyncio.gather(*(put(big, n) for n in sizes))
    await big.close()
    assert [len(r) for r in results] == sizes
    with sqlite3.connect(tmp_path / "big.db") as db:
        rows = db.execute("SELECT id, size, payload FROM events ORDER BY id").fetchall()
    assert [r[0] for r in rows] == sorted(i for r in results for i in r)
    assert all(payload == b'{"n": %d}' % i and size == len(payload) for i, size, payload in rows)


async def _last_id_then_reopen(config: SpoolConfig, delete: str) -> tuple[int, int]:
    """Fill a spool, empty it in one of the ways events leave it, reopen: (last old id,
    first new id)."""
    s = Spool(config)
    await s.open()
    ids = await put(s, 5)
    if delete == "delivered":
        await s.delete(await s.claim(10, 1 << 20))
    elif delete == "pruned":  # over max_dead_events: the oldest dead letters go
        await s.dead_letter(await s.claim(10, 1 << 20), "rejected", 400, "bad")
    elif delete == "purged":
        await s.dead_letter(await s.claim(10, 1 << 20), "rejected", 400, "bad")
        await s.close()
        with admin.open_spool(config.path) as db:
            admin.purge(db, admin.Selection(), lambda done, total: None)
        s = Spool(config)
        await s.open()
    await s.close()
    reopened = Spool(config)
    await reopened.open()
    assert reopened.counts.events == 0
    fresh = await put(reopened, 1)
    await reopened.close()
    return max(ids), fresh[0]


@pytest.mark.parametrize("delete", ["delivered", "pruned", "purged"])
async def test_ids_never_repeat_whichever_way_events_left(tmp_path: Path, delete: str) -> None:
    config = SpoolConfig(path=str(tmp_path / "s.db"),
                         max_dead_events=0 if delete == "pruned" else 100)
    last, first_new = await _last_id_then_reopen(config, delete)
    assert first_new > last


# -- WAL checkpoints: a long WAL is copied back and rewound, off the commit path -----

async def grow_wal(spool: Spool, frames: int) -> None:
    """Commit ~4 KiB (one WAL frame) per event until the WAL holds ``frames`` frames."""
    for _ in range(frames):
        ids = spool.allocate_ids(1)
        await spool.append(ids, [b"x" * 4000])


def wal_frames_after_commit(path: Path) -> int:
    """Frames in the WAL now (a PASSIVE checkpoint reports them and changes no answer)."""
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])


@pytest.fixture
def short_wal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sidecar.spool.store.WAL_REWIND_FRAMES", 16)
    monkeypatch.setattr("sidecar.spool.store.WAL_FINISH_FRAMES", 2)


@pytest.mark.usefixtures("short_wal")
async def test_a_long_wal_is_rewound_after_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    await grow_wal(spool, 40)
    assert path.with_name("spool.db-wal").stat().st_size > 40 * 4096
    await spool.checkpoint()
    await grow_wal(spool, 1)
    assert wal_frames_after_commit(path) <= 4  # started again from the beginning
    await spool.close()


@pytest.mark.usefixtures("short_wal")
async def test_the_writer_finishes_a_checkpoint_the_reader_could_not(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    # A reader holding an old snapshot keeps every checkpoint pass from copying the
    # newer frames, as a steady stream of commits would.
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM events").fetchone()
    await grow_wal(spool, 40)
    await spool.checkpoint()
    reader.execute("COMMIT")
    reader.close()
    await grow_wal(spool, 1)  # this commit first copies the rest, then rewinds
    assert wal_frames_after_commit(path) <= 4
    await spool.close()


@pytest.mark.usefixtures("short_wal")
async def test_a_wal_grown_by_a_burst_is_cut_back_on_its_next_rewind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite rewinds a checkpointed WAL but keeps its file at the largest size it had."""
    monkeypatch.setattr("sidecar.spool.connection.WAL_SIZE_LIMIT", 8 * 4096)
    path = tmp_path / "spool.db"
    spool = await opened(path)
    await grow_wal(spool, 40)
    await spool.checkpoint()
    await grow_wal(spool, 1)
    assert path.with_name("spool.db-wal").stat().st_size <= 8 * 4096
    await spool.close()


# -- giving back the room delivered events freed ------------------------------------

SLACK, STEP = 64, 32  # pages


@pytest.fixture
def small_reclaim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sidecar.spool.store.RECLAIM_SLACK_PAGES", SLACK)
    monkeypatch.setattr("sidecar.spool.store.RECLAIM_STEP_PAGES", STEP)


def free_pages(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA freelist_count").fetchone()[0])


async def fill_and_drain(spool: Spool, events: int) -> None:
    """About 4 KiB (a page) per event stored, then delivered and deleted."""
    ids = spool.allocate_ids(events)
    await spool.append(ids, [b'{"x": "%s"}' % (b"y" * 4000) for _ in ids])
    await spool.checkpoint()
    while batch := await spool.claim(500, 1 << 30):
        await spool.delete(batch)
    await spool.checkpoint()


@pytest.mark.usefixtures("small_reclaim")
async def test_the_room_delivered_events_freed_goes_back_to_the_disk(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    await fill_and_drain(spool, 600)
    full, freed = path.stat().st_size, free_pages(path)
    assert freed >= 600
    await spool.reclaim()
    # A step a pass: a commit never waits long behind one.
    assert free_pages(path) == freed - STEP
    for _ in range(freed // STEP + 2):
        await spool.reclaim()
        await spool.checkpoint()
    assert free_pages(path) == SLACK  # kept for new events to reuse
    assert path.stat().st_size <= full - (freed - SLACK) * 4096
    ids = await put(spool, 3)  # and the spool goes on working
    assert [e.id for e in await spool.claim(10, 1 << 20)] == ids
    await spool.close()
    with pytest.raises(SpoolUnavailable):  # rather than wait for a thread that is gone
        await spool.reclaim()
    assert admin.check(sqlite3.connect(path)) == []


@pytest.mark.usefixtures("small_reclaim")
async def test_an_older_spool_keeps_its_room_until_compacted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A spool made before pages were given back (auto_vacuum none) cannot start doing it
    by itself: `spool compact`, with the sidecar stopped, converts it."""
    caplog.set_level(logging.INFO, "sidecar.spool")
    path = tmp_path / "spool.db"
    spool = await opened(path)
    await spool.close()
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("PRAGMA auto_vacuum = NONE")
        db.execute("VACUUM")
    spool = await opened(path)
    assert "spool compact" in caplog.text
    await fill_and_drain(spool, 300)
    kept = await put(spool, 2)
    freed = free_pages(path)
    await spool.reclaim()
    assert free_pages(path) == freed
    with pytest.raises(admin.AdminError, match=r"a sidecar is running on .*stop it first"):
        admin.compact(str(path))
    await spool.close()
    with sqlite3.connect(path) as db:
        before = db.execute("SELECT id, state, payload FROM events ORDER BY id").fetchall()
    done = admin.compact(str(path))
    assert done.after < done.before - 250 * 4096 and not done.reader
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT id, state, payload FROM events ORDER BY id").fetchall() \
            == before
        assert db.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental
    assert [row[0] for row in before] == kept
    assert admin.check(sqlite3.connect(path)) == []
    spool = await opened(path)
    await fill_and_drain(spool, 300)
    await spool.reclaim()
    assert free_pages(path) < 300  # now it does
    await spool.close()


async def test_no_sidecar_starts_on_a_spool_being_compacted(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    await spool.close()
    lock = store.lock_spool(path, store.COMPACTING)
    try:
        with pytest.raises(SpoolInUse, match="spool compact` is rewriting this spool"):
            await Spool(SpoolConfig(path=str(path))).open()
        with pytest.raises(admin.AdminError, match="another `spool compact` is rewriting"):
            admin.compact(str(path))
    finally:
        os.close(lock)


def test_compact_of_a_directory_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(admin.AdminError, match="is not a file"):
        admin.compact(str(tmp_path))
    assert not Path(f"{tmp_path}.lock").exists()


async def test_compact_beside_a_reader_says_the_wal_is_cut_later(tmp_path: Path) -> None:
    """A reader (a CLI listing, a sqlite3 shell) keeps the WAL from being cut: compact
    said the file was rewritten while it had grown by the whole WAL."""
    path = tmp_path / "spool.db"
    spool = await opened(path)
    ids = await put(spool, 20)
    await spool.close()
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("PRAGMA busy_timeout = 0")
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM events").fetchone()
    try:
        done = admin.compact(str(path))
    finally:
        reader.execute("COMMIT")
        reader.close()
    assert done.reader
    with sqlite3.connect(path) as db:
        assert [r[0] for r in db.execute("SELECT id FROM events ORDER BY id")] == ids


@pytest.mark.parametrize(("version", "advice"), [
    (SCHEMA_VERSION + 1, "use the CLI of the sidecar version that wrote it"),
    (SCHEMA_VERSION - 1, "start this version's sidecar once to migrate it"),
])
def test_the_cli_names_the_way_out_of_a_schema_it_does_not_know(
    tmp_path: Path, version: int, advice: str
) -> None:
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {version}")
    with pytest.raises(admin.AdminError, match=advice), admin.open_spool(str(path)):
        pass


async def test_spool_stats_is_one_snapshot(spool: Spool, tmp_path: Path) -> None:
    """The sidecar commits between the queries of `spool stats`: without one read
    transaction, a dead letter made meanwhile was in the reasons but not the counts."""
    await put(spool, 3)
    path = str(tmp_path / "spool.db")
    writer = sqlite3.connect(path, isolation_level=None)

    def commit_between(statement: str) -> None:
        if "dead_reason" in statement and "GROUP BY" in statement:
            writer.execute("UPDATE events SET state = 'dead', dead_reason = 'rejected', "
                           "dead_at = 1 WHERE id = 1")

    with admin.open_spool(path) as db:
        db.set_trace_callback(commit_between)
        stats = admin.stats(db)
    writer.close()
    assert sum(stats["dead_by_reason"].values()) == stats["events"]["dead"]


class FakeDisk:
    """os.statvfs for the spool's directory, with as many free bytes as the test says."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, _path: str) -> object:
        return type("StatVfs", (), {"f_bavail": self.free, "f_frsize": 1, "f_blocks": 1})()


async def test_room_in_the_spool_file_counts_and_low_has_a_margin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite keeps the pages of delivered events for new ones instead of giving them back
    to the disk: counting only the disk, a drained spool stayed disk_low for good. And
    free space hovering at the line flipped it every pass."""
    import sidecar.spool.store as store

    mib = 1024 * 1024
    s = Spool(SpoolConfig(path=str(tmp_path / "s.db"), min_free_bytes=100 * mib))
    await s.open()
    ids = s.allocate_ids(40)
    await s.append(ids, [b'{"x": "%s"}' % (b"y" * 256 * 1024) for _ in ids])
    with sqlite3.connect(tmp_path / "s.db") as db:  # delivered, as the CLI would purge
        db.execute("DELETE FROM events")
    freed = await s._reader_db.call(store.free_pages_bytes)
    assert freed >= 10 * mib
    disk = FakeDisk(100 * mib - freed // 2)
    monkeypatch.setattr(os, "statvfs", disk)

    async def low() -> int | None:
        await s.check_free_space()
        return s.disk_low

    assert await low() is None  # the disk alone is under the line; with the pages, not
    disk.free = 90 * mib - freed
    assert await low() == 90 * mib
    disk.free = 110 * mib - freed  # above the line, but within the margin: still low
    assert await low() == 110 * mib
    disk.free = 130 * mib - freed
    assert await low() is None
    # Free pages are no room for the -wal, where new commits go first: the disk itself
    # keeps a quarter of the reserve (a review filled a tmpfs to 0 bytes without it).
    monkeypatch.setattr(store, "free_pages_bytes", lambda db: 1000 * mib)
    disk.free = 20 * mib
    assert await low() == 20 * mib  # what the disk has, as the log line says it
    monkeypatch.undo()
    await s.close()


async def test_the_cli_takes_a_sidecar_starting_or_closing_for_no_replaced_file(
    spool: Spool, tmp_path: Path
) -> None:
    """While a sidecar starts (the lock held, its -wal not there yet, the last run's record
    still in the lock file) or closes (SQLite removes the -wal), the CLI refused to work:
    the sidecar says so in the lock file then, and the CLI compares nothing. Without any
    record (it could not be written) the CLI still checks that the files are there."""
    import sidecar.spool.store as store

    await put(spool, 1)
    lock = tmp_path / "spool.db.lock"
    assert set(orjson.loads(lock.read_bytes())) == {"wal", "shm"}  # recorded while it runs
    real = (tmp_path / "spool.db").resolve()
    (tmp_path / "spool.db-wal").rename(tmp_path / "kept")  # as the last close removes it
    try:
        for state in (b"starting", b"closing"):
            lock.write_bytes(b'{"state": "%s"}' % state)
            assert store.replaced_under_sidecar(real) is None
        for record in (b"", b'{"wal": [0, 0], "shm": [0, 0]}'):
            lock.write_bytes(record)
            assert store.replaced_under_sidecar(real) == "-wal"
    finally:
        (tmp_path / "kept").rename(tmp_path / "spool.db-wal")


async def test_a_replace_within_the_timestamp_tick_is_still_seen(
    spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Directory times tick coarsely on many kernels: a file replaced within the tick of
    the last change seen left them as they were, and the cheap check missed it for good."""
    import sidecar.spool.store as store

    await put(spool, 1)
    first = store._stamps(spool._dirs)[0]
    assert first is not None
    frozen = ((*first[:3], time.time_ns()),)
    monkeypatch.setattr(store, "_stamps", lambda dirs: frozen)  # the tick never passes
    await put(spool, 1)
    wal = tmp_path / "spool.db-wal"
    (tmp_path / "copy").write_bytes(wal.read_bytes())
    (tmp_path / "copy").rename(wal)
    with pytest.raises(SpoolUnavailable, match=r"spool\.db-wal was removed or replaced"):
        await put(spool, 1)
