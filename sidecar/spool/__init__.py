"""Stage 3: the durable SQLite queue between receiving and forwarding."""

from sidecar.spool.schema import SpoolVersionError
from sidecar.spool.store import (
    DiskLow,
    IdempotencyKeyReused,
    LargerThanSpool,
    Spool,
    SpoolCounts,
    SpoolFull,
    SpoolInUse,
    SpoolUnavailable,
    StoredEvent,
)

__all__ = [
    "DiskLow",
    "IdempotencyKeyReused",
    "LargerThanSpool",
    "Spool",
    "SpoolCounts",
    "SpoolFull",
    "SpoolInUse",
    "SpoolUnavailable",
    "SpoolVersionError",
    "StoredEvent",
]
