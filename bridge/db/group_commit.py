"""Group commit: the small writes of many concurrent workers, committed in one transaction.

Each conversation lane ends an item with a few writes (the item done, its deliveries queued, its
message ids mapped). Committed one by one, those transactions cost more than the work itself.
Here a worker hands its writes over and waits; while one batch is being committed the next one
gathers, so under load one commit serves hundreds of items, and an idle bridge still commits at
once (no timer, no added latency). A worker is answered only once its writes are committed:
nothing is acknowledged that is not stored.

Writes of one batch are grouped by statement and run with ``executemany``, so a batch may run
two workers' writes in another order than they were submitted. Callers therefore submit only
writes that commute with the other workers': inserts that ignore conflicts and updates of rows
that one worker owns. The writes of one worker keep their order when they use one statement
(e.g. a lane's outbox appends keep their sequence order).

When a batch fails, each worker's writes are tried again in a transaction of their own, so a bad
write fails only the worker that made it.

On SQLite the whole batch runs as one call on aiosqlite's worker thread (BEGIN, the statements,
COMMIT) rather than one thread hop per statement: that is most of a lone event's latency.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import re
import sqlite3
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import aiosqlite
from mautrix.util.async_db import Connection, Database

from bridge.db.ordering import serialize_appends

log = logging.getLogger("eimis.db.commit")


@dataclass(frozen=True)
class Write:
    """One statement and its arguments, committed later with others of its kind."""

    sql: str
    args: tuple[object, ...]
    appends_to: str | None = None
    """``inbox`` or ``outbox`` when this appends a sequence-numbered row (see ``ordering``)."""


class GroupCommit:
    def __init__(self, db: Database, max_batch: int = 2048) -> None:
        self.db = db
        self.max_batch = max_batch
        self._queue: deque[tuple[Sequence[Write], asyncio.Future[None]]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0
        """Transactions committed (a benchmark counter)."""

    async def commit(self, writes: Sequence[Write]) -> None:
        """Return once ``writes`` are committed; raise what their transaction raised."""
        if not writes:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((writes, future))
        if self._flusher is None or self._flusher.done():
            # A context of its own: it commits every worker's writes, not the one that woke it
            # (its log lines must not name that worker's item).
            self._flusher = asyncio.create_task(
                self._flush_all(), name="group-commit", context=contextvars.Context()
            )
        await future

    async def _flush_all(self) -> None:
        while self._queue:
            batch, taken = [], 0
            while self._queue and (not batch or taken + len(self._queue[0][0]) <= self.max_batch):
                entry = self._queue.popleft()
                batch.append(entry)
                taken += len(entry[0])
            try:
                await self._run([w for writes, _ in batch for w in writes])
            except Exception as error:
                if len(batch) == 1:
                    _settle(batch[0][1], error)
                    continue
                log.warning("A batch of %d writes failed; committing them one by one", taken)
                for writes, future in batch:
                    try:
                        await self._run(writes)
                    except Exception as error:
                        _settle(future, error)
                    else:
                        _settle(future, None)
                continue
            for _, future in batch:
                _settle(future, None)

    async def _run(self, writes: Sequence[Write]) -> None:
        groups: dict[str, list[tuple[object, ...]]] = {}
        appends: list[str] = []
        for write in writes:
            groups.setdefault(write.sql, []).append(write.args)
            if write.appends_to is not None and write.appends_to not in appends:
                appends.append(write.appends_to)
        async with self.db.acquire() as conn:
            sqlite = getattr(conn, "wrapped", None)
            if isinstance(sqlite, aiosqlite.Connection):
                # SQLite has one writer: appends are in order without a lock.
                await sqlite._execute(_commit_on_thread, sqlite, list(groups.items()))
            else:
                async with conn.transaction():
                    for table in sorted(appends):  # one order everywhere: no lock cycles
                        await serialize_appends(conn, table)
                    for sql, rows in groups.items():
                        await _execute(conn, sql, rows)
        self.batches += 1


def _commit_on_thread(
    connection: aiosqlite.Connection, groups: list[tuple[str, list[tuple[object, ...]]]]
) -> None:
    """Runs on aiosqlite's thread: one transaction, no hop back to the event loop between."""
    db: sqlite3.Connection = connection._conn
    db.execute("BEGIN")
    try:
        for sql, rows in groups:
            db.executemany(_qmark(sql), rows)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@functools.lru_cache(maxsize=64)
def _qmark(sql: str) -> str:
    """``$1`` placeholders (asyncpg's, which the stores write) as SQLite's ``?1``."""
    return re.sub(r"\$(\d+)", r"?\1", sql)


async def _execute(conn: Connection, sql: str, rows: list[tuple[object, ...]]) -> None:
    if len(rows) == 1:
        await conn.execute(sql, *rows[0])
    else:
        await conn.executemany(sql, rows)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # its worker was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
