"""Appends to the inbox and outbox commit in sequence order, on every engine.

The workers read ``seq > cursor``. On PostgreSQL a sequence number is taken at INSERT but seen at
COMMIT, so two concurrent transactions could show seq 8 before seq 7, and a reader that has moved
past 8 would never see 7. A transaction-scoped advisory lock, taken before the first INSERT,
makes appends to one table commit one after the other, in the order of their numbers. SQLite
has a single writer already.
"""

from __future__ import annotations

from mautrix.util.async_db import Connection, Scheme

_LOCK_KEYS = {"inbox": 0x45494D01, "outbox": 0x45494D02}


async def serialize_appends(conn: Connection, table: str) -> None:
    """Call inside the transaction, before inserting into ``table``."""
    if conn.scheme in (Scheme.POSTGRES, Scheme.COCKROACH):
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEYS[table])
