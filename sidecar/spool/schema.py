"""The spool's schema and its forward migrations, keyed by ``PRAGMA user_version``.

Migrations only ever move forward: a spool written by a newer sidecar is refused
rather than guessed at, so a downgrade can never corrupt undelivered events.
"""

from __future__ import annotations

import secrets

# Each entry moves the schema from version i to i + 1; never edit a released entry.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE events (
        id              INTEGER PRIMARY KEY,
        received_at     REAL    NOT NULL,   -- unix seconds
        state           TEXT    NOT NULL DEFAULT 'pending',   -- 'pending' or 'dead'
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL    NOT NULL DEFAULT 0,
        last_status     INTEGER,
        last_error      TEXT,
        dead_reason     TEXT,
        dead_at         REAL,
        size            INTEGER NOT NULL,
        payload         BLOB    NOT NULL
    );
    CREATE TABLE idempotency (
        key        TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        ids        TEXT NOT NULL    -- JSON array of the event ids first answered
    ) WITHOUT ROWID;
    CREATE INDEX idempotency_created ON idempotency (created_at);
    """,
    # What the first request with the key held, so a different request reusing it is
    # refused instead of answered as a repeat; NULL for keys stored before.
    """
    ALTER TABLE idempotency ADD COLUMN fingerprint TEXT;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

# meta.next_id is kept past every id that was ever deleted, so ids never repeat once the
# spool drains (upstream would drop a reused id as a redelivery). Run it in the same
# transaction before any DELETE FROM events; inserts, the hot path, never touch meta:
# at start-up the next id is past both this counter and the largest id still stored.
REMEMBER_IDS = (
    "UPDATE meta SET value = (SELECT max(id) + 1 FROM events) WHERE key = 'next_id' "
    "AND CAST(value AS INTEGER) <= (SELECT max(id) FROM events)"
)


class SpoolVersionError(Exception):
    pass


def new_spool_id() -> str:
    """Names this spool in upstream event ids, so ids from two sidecars never collide."""
    return secrets.token_hex(6)
