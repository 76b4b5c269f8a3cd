"""Opening the database (SQLite file or PostgreSQL) and bringing its schema up to date."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.util.async_db import Database, Scheme
from mautrix.util.async_db.aiosqlite import TxnConnection

from bridge.config import DatabaseConfig
from bridge.db.upgrade import upgrade_table
from bridge.private_files import private_file

log = logging.getLogger("eimis.db")


_SIDE_FILES = ("-wal", "-shm", "-journal")


def _normalise_url(url: str) -> str:
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:").removeprefix("///").removeprefix("//")
        absolute = Path(path).expanduser().resolve()
        # Message content and sealed secrets: owner only. SQLite gives its -wal, -shm and
        # -journal files the database file's mode, so they are created 0600 too.
        private_file(absolute)
        for suffix in _SIDE_FILES:
            side = absolute.with_name(absolute.name + suffix)
            if side.exists():
                private_file(side)
        return f"sqlite:{absolute}"
    return url


BUSY_TIMEOUT_MS = 5000
"""How long a SQLite statement waits for another connection's lock (mautrix's default)."""


async def ping(db: Database) -> None:
    """Ask the database the cheapest question (a readiness probe): raises when it does not
    answer."""
    await db.fetchval("SELECT 1")


async def truncate_wal(db: Database) -> None:
    """SQLite: copy the write-ahead log into the database and empty it, so content cleared
    from rows (delivered, discarded, erased) does not live on in old log frames (with
    ``secure_delete`` the database's own pages are overwritten). Nothing on PostgreSQL."""
    if db.scheme != Scheme.SQLITE:
        return
    # Without a busy handler the checkpoint never waits: a TRUNCATE checkpoint waiting for
    # another process's reader (a CLI command in its transaction) holds the write lock all that
    # time, and that process's next write then fails "database is locked". Busy, it copies what
    # it can and leaves the rest to the next truncation (every wal_truncate_interval_s).
    async with db.acquire() as conn:
        await conn.execute("PRAGMA busy_timeout = 0")
        try:
            # fetch, not execute: the pragma answers a row, and an unread answer keeps a read
            # transaction open on the connection.
            await conn.fetch("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


async def open_database(config: DatabaseConfig) -> Database:
    """Connect, run pending migrations (ours and mautrix's state store), and return the pool."""
    # aiosqlite logs every statement with its parameters (message content) at DEBUG.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    # mautrix exits the whole process on an asyncpg internal error (which a PostgreSQL restart
    # under load can cause on a pooled connection); the bridge retries the failed work instead.
    db_args: dict[str, object] = {
        "min_size": config.min_size,
        "max_size": config.max_size,
        "meow_exit_on_ice": False,
    }
    if config.is_sqlite:
        # One connection: SQLite has one writer anyway, and a single connection keeps every
        # transaction strictly serialised (WAL lets readers of other processes go on).
        # secure_delete: content cleared from a row is overwritten, not left in free space.
        db_args = {
            "min_size": 1,
            "init_commands": [
                "PRAGMA secure_delete = ON",
                f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
            ],
        }
    db = Database.create(
        _normalise_url(config.url),
        upgrade_table=upgrade_table,
        db_args=db_args,
        log=logging.getLogger("eimis.db.pool"),
    )
    try:
        await db.start()
        if config.is_sqlite:
            _immediate_transactions(db)
        await PgStateStore.upgrade_table.upgrade(db)
    except BaseException:
        await db.stop()
        raise
    return db


class _ImmediateTxnConnection(TxnConnection):
    """A SQLite connection whose transactions take the write lock when they begin (``BEGIN
    IMMEDIATE``, waiting up to the busy timeout for it). With mautrix's deferred ``BEGIN``, a
    transaction that read, then wrote, failed at once with "database is locked" whenever
    another process (the running bridge, a CLI command) had written in between: its snapshot
    was stale, and no wait can fix that."""

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        if query == "BEGIN TRANSACTION":  # what mautrix's transaction() begins with
            query = "BEGIN IMMEDIATE"
        return await super().execute(query, *args, timeout=timeout)


def _immediate_transactions(db: Database) -> None:
    """Make the pool's SQLite connections ``_ImmediateTxnConnection``s (mautrix creates them
    itself, with no hook for the transaction's mode)."""
    pool = getattr(db, "_pool", None)
    for conn in list(getattr(pool, "_queue", ())):
        if type(conn) is TxnConnection:
            conn.__class__ = _ImmediateTxnConnection
