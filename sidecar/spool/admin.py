"""Operator commands on a spool file: dead letters, stats, integrity.

These use plain sqlite3 and short transactions, so they work on a spool that a
running sidecar is using: SQLite's locking keeps both sides consistent, and the
sidecar notices the change (PRAGMA data_version) and recounts.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from sidecar.spool.schema import REMEMBER_IDS, SCHEMA_VERSION
from sidecar.spool.store import (
    AUTO_VACUUM_INCREMENTAL,
    COMPACTING,
    SpoolCompacting,
    SpoolInUse,
    free_pages_bytes,
    gives_back_space,
    lock_spool,
    replaced_under_sidecar,
    size_on_disk,
    spool_files,
)

CHUNK = 1000
READER_WAIT_MS = 2000
DEAD_COLUMNS = "id, dead_reason, last_status, last_error, attempts, dead_at, received_at, payload"


class AdminError(Exception):
    """The operation cannot run; ``str()`` is the message for the operator."""


@contextmanager
def open_spool(path: str) -> Iterator[sqlite3.Connection]:
    if not Path(path).exists():
        raise AdminError(f"spool.path: {path} does not exist")
    real = Path(path).resolve()
    if (replaced := replaced_under_sidecar(real)) is not None:
        # A running sidecar's -wal or -shm was removed or replaced: SQLite would write this
        # command's changes where the sidecar does not look (and, for a -wal, through the
        # index both share, so that the sidecar's next checkpoint copies a mix of the two
        # into the file, which then is no database any more).
        raise AdminError(
            f"{real}{replaced} was removed or replaced while a sidecar runs on {path}: stop "
            "it (SIGTERM: its final checkpoint keeps what it holds) before using this command"
        )
    try:
        db = sqlite3.connect(path, timeout=10, isolation_level=None)
    except sqlite3.Error as e:  # a directory, say
        raise AdminError(f"spool.path: cannot open {path}: {e}") from None
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise AdminError(
                f"{path}: spool schema version {version} is newer than this tool's "
                f"({SCHEMA_VERSION}): use the CLI of the sidecar version that wrote it"
            )
        if version != SCHEMA_VERSION:
            raise AdminError(
                f"{path}: spool schema version {version}, this tool knows {SCHEMA_VERSION}; "
                "start this version's sidecar once to migrate it"
            )
        yield db
    except sqlite3.DatabaseError as e:
        raise AdminError(f"{path}: {e}") from None
    finally:
        db.close()


@dataclass(frozen=True)
class Selection:
    """Which dead letters an operation touches; every given filter must match."""

    reason: str | None = None
    ids: Sequence[int] = ()
    since: float | None = None
    before: float | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = ["state = 'dead'"]
        params: list[Any] = []
        if self.reason is not None:
            clauses.append("dead_reason = ?")
            params.append(self.reason)
        if self.ids:
            clauses.append(f"id IN ({','.join('?' * len(self.ids))})")
            params.extend(self.ids)
        if self.since is not None:
            clauses.append("dead_at >= ?")
            params.append(self.since)
        if self.before is not None:
            clauses.append("dead_at < ?")
            params.append(self.before)
        return " AND ".join(clauses), params


def dead_letter_record(row: Sequence[Any]) -> dict[str, Any]:
    event_id, reason, status, error, attempts, dead_at, received_at, payload = row
    return {
        "id": event_id,
        "reason": reason,
        "status": status,
        "error": error,
        "attempts": attempts,
        "dead_at": iso(dead_at),
        "received_at": iso(received_at),
        "event": orjson.loads(payload),
    }


def list_dead(db: sqlite3.Connection, selection: Selection) -> list[dict[str, Any]]:
    where, params = selection.where()
    rows = db.execute(f"SELECT {DEAD_COLUMNS} FROM events WHERE {where} ORDER BY id", params)
    return [dead_letter_record(row) for row in rows]


def show_dead(db: sqlite3.Connection, event_id: int) -> dict[str, Any]:
    found = list_dead(db, Selection(ids=[event_id]))
    if not found:
        raise AdminError(f"no dead letter with id {event_id}")
    return found[0]


Progress = Callable[[int, int], None]


def replay(
    db: sqlite3.Connection, selection: Selection, progress: Progress, max_age_s: float,
    now: float | None = None,
) -> int:
    """Back to pending with attempts reset: the sidecar sends them again. One that expired,
    or has lived half of ``max_age_s`` (retry.max_age_s) by now, counts its age from now:
    kept as it was, the sidecar could make it a dead letter again before sending it."""
    now = time.time() if now is None else float(now)
    cutoff = now - float(max_age_s) / 2
    return _in_chunks(
        db, selection, progress,
        "UPDATE events SET state = 'pending', attempts = 0, next_attempt_at = 0, "
        f"received_at = CASE WHEN dead_reason = 'expired' OR received_at < {cutoff!r} "
        f"THEN {now!r} ELSE received_at END, dead_reason = NULL, dead_at = NULL WHERE id = ?",
    )


def purge(db: sqlite3.Connection, selection: Selection, progress: Progress) -> int:
    return _in_chunks(
        db, selection, progress, "DELETE FROM events WHERE id = ?", first=REMEMBER_IDS
    )


def _in_chunks(
    db: sqlite3.Connection, selection: Selection, progress: Progress, sql: str,
    first: str | None = None,
) -> int:
    """Short transactions, so a running sidecar's commits are never held up for long."""
    where, params = selection.where()
    ids = [row[0] for row in db.execute(f"SELECT id FROM events WHERE {where} ORDER BY id", params)]
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        db.execute("BEGIN IMMEDIATE")
        if first is not None:
            db.execute(first)
        # Re-check the state inside the transaction: the sidecar may have moved the row.
        db.executemany(sql + " AND state = 'dead'", [(i,) for i in chunk])
        db.execute("COMMIT")
        progress(min(start + CHUNK, len(ids)), len(ids))
    return len(ids)


def stats(db: sqlite3.Connection, now: float | None = None) -> dict[str, Any]:
    # One read transaction: on a live spool the sidecar commits between the queries,
    # and the counts by state and by reason would disagree.
    db.execute("BEGIN")
    try:
        return _stats(db, time.time() if now is None else now)
    finally:
        db.execute("COMMIT")


def _stats(db: sqlite3.Connection, now: float) -> dict[str, Any]:
    counts = {"pending": 0, "dead": 0}
    size = 0
    for state, n, state_bytes in db.execute(
        "SELECT state, count(*), coalesce(sum(size), 0) FROM events GROUP BY state"
    ):
        counts[state] = n
        size += state_bytes
    oldest = db.execute(
        "SELECT received_at FROM events WHERE state = 'pending' ORDER BY id LIMIT 1"
    ).fetchone()
    by_reason = dict(
        db.execute(
            "SELECT dead_reason, count(*) FROM events WHERE state = 'dead' "
            "GROUP BY dead_reason ORDER BY dead_reason"
        ).fetchall()
    )
    return {
        "events": counts,
        "bytes": size,
        "oldest_pending_age_s": round(now - oldest[0], 3) if oldest else None,
        "dead_by_reason": by_reason,
        "idempotency_keys": db.execute("SELECT count(*) FROM idempotency").fetchone()[0],
        "schema_version": db.execute("PRAGMA user_version").fetchone()[0],
        **_disk(db),
    }


def _disk(db: sqlite3.Connection) -> dict[str, Any]:
    """What the file takes on disk, how much of it is free pages, and whether a running
    sidecar gives those back (a spool made by an earlier version: after `compact`)."""
    path = next(row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main")
    return {
        "file_bytes": size_on_disk(spool_files(Path(path))),
        "free_bytes": free_pages_bytes(db),
        "gives_back_space": gives_back_space(db),
    }


@dataclass(frozen=True)
class Compacted:
    before: int  # bytes on disk: the file, its -wal and -shm
    after: int
    reader: bool  # another process was reading: the WAL is cut at its next checkpoint


def compact(path: str) -> Compacted:
    """Rewrite the spool file without its free pages, as one that gives freed pages back
    from then on. Only with no sidecar running on it: VACUUM holds the write lock for as
    long as it takes (a commit would wait that long), and the lock is held meanwhile, so
    that no sidecar starts on it either."""
    if not Path(path).is_file():  # nor a lock file left beside a directory
        what = "is not a file" if Path(path).exists() else "does not exist"
        raise AdminError(f"spool.path: {path} {what}")
    try:
        lock = lock_spool(Path(path), COMPACTING)
    except SpoolCompacting:
        raise AdminError(f"another `spool compact` is rewriting {path}") from None
    except SpoolInUse:
        raise AdminError(
            f"a sidecar is running on {path}: stop it first (SIGTERM); what it holds stays "
            "in the spool"
        ) from None
    except OSError as e:
        raise AdminError(f"spool.path: cannot lock {path}: {e.strerror}") from None
    try:
        files = spool_files(Path(path))
        before = size_on_disk(files)
        with open_spool(path) as db:
            db.execute(f"PRAGMA auto_vacuum = {AUTO_VACUUM_INCREMENTAL}")
            _vacuum(db, path)
            # A reader keeps the WAL from being cut: wait a little for it, not the 10 s
            # every other statement may wait for a lock; its WAL goes at a later checkpoint.
            db.execute(f"PRAGMA busy_timeout = {READER_WAIT_MS}")
            busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        return Compacted(before, size_on_disk(files), reader=bool(busy))
    finally:
        os.ftruncate(lock, 0)
        os.close(lock)


def _vacuum(db: sqlite3.Connection, path: str) -> None:
    try:
        db.execute("VACUUM")
    except sqlite3.OperationalError as e:
        if "full" not in str(e):
            raise
        raise AdminError(
            f"{path}: {e}: VACUUM needs room for a copy of the spool's live data in SQLite's "
            "temporary directory (SQLITE_TMPDIR, else TMPDIR, else /var/tmp or /tmp) and "
            "again on the spool's disk; nothing was changed"
        ) from None


# Each invariant: a query returning offending rows, and what it means.
INVARIANTS: list[tuple[str, str]] = [
    ("SELECT id FROM events WHERE state NOT IN ('pending', 'dead') LIMIT 5",
     "events in an unknown state"),
    ("SELECT id FROM events WHERE state = 'dead' AND (dead_reason IS NULL OR dead_at IS NULL) "
     "LIMIT 5", "dead letters without a reason or time"),
    ("SELECT id FROM events WHERE state = 'pending' AND dead_reason IS NOT NULL LIMIT 5",
     "pending events carrying a dead-letter reason"),
    ("SELECT id FROM events WHERE size != length(payload) LIMIT 5",
     "events whose recorded size does not match their payload"),
    ("SELECT id FROM events WHERE json_valid(payload) = 0 OR json_type(payload) != 'object' "
     "LIMIT 5", "payloads that are not JSON objects"),
    ("SELECT id FROM events WHERE attempts < 0 LIMIT 5", "negative attempt counts"),
    ("SELECT key FROM idempotency WHERE json_valid(ids) = 0 LIMIT 5",
     "idempotency records with unreadable ids"),
]


def check(db: sqlite3.Connection) -> list[str]:
    """SQLite's integrity check plus the spool's own invariants; [] when all is well."""
    problems = [
        f"sqlite integrity_check: {row[0]}"
        for row in db.execute("PRAGMA integrity_check")
        if row[0] != "ok"
    ]
    for key in ("spool_id", "next_id"):
        if db.execute("SELECT 1 FROM meta WHERE key = ?", (key,)).fetchone() is None:
            problems.append(f"meta table lacks {key!r}")
    next_id = db.execute("SELECT value FROM meta WHERE key = 'next_id'").fetchone()
    if next_id is not None and not str(next_id[0]).isdigit():
        problems.append("meta next_id is not a number")
    for sql, meaning in INVARIANTS:
        offenders = [str(row[0]) for row in db.execute(sql)]
        if offenders:
            problems.append(f"{meaning}: {', '.join(offenders)}")
    return problems


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
