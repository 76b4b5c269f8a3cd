"""Dead letters: deliveries that spent their retry budget, holding their conversation's queue.

A dead letter stays in the outbox with state ``dead``; later items of the same (connector,
room) are not read until an operator retries it (back to ``pending``) or discards it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mautrix.util.async_db import Database

from bridge.db.database import truncate_wal


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    connector: str
    room_id: str
    operation: str
    attempts: int
    last_error: str | None
    held: int
    """How many later deliveries of the same conversation wait behind it."""


class DeadLetterStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def list(self, connector: str | None = None) -> list[DeadLetter]:
        rows = await self.db.fetch(
            "SELECT d.seq, d.connector, d.room_id, d.operation, d.attempts, d.last_error, "
            "(SELECT COUNT(*) FROM outbox h WHERE h.state = 'pending' "
            " AND h.connector = d.connector AND h.room_id = d.room_id AND h.seq > d.seq) AS held "
            "FROM outbox d WHERE d.state = 'dead' AND ($1 = '' OR d.connector = $1) "
            "ORDER BY d.seq",
            connector or "",
        )
        return [DeadLetter(**dict(r)) for r in rows]

    async def retry(self, seq: int | None = None) -> int:
        """Put one dead letter (or all, with None) back in its queue; returns how many."""
        if seq is None:
            result = await self.db.fetch(
                "UPDATE outbox SET state = 'pending', attempts = 0 WHERE state = 'dead' "
                "RETURNING seq"
            )
        else:
            result = await self.db.fetch(
                "UPDATE outbox SET state = 'pending', attempts = 0 "
                "WHERE state = 'dead' AND seq = $1 RETURNING seq",
                seq,
            )
        return len(result)

    async def discard(self, seq: int) -> bool:
        """Give a dead letter up for good: its content goes, its conversation flows again."""
        result = await self.db.fetch(
            "UPDATE outbox SET state = 'discarded', payload = NULL "
            "WHERE state = 'dead' AND seq = $1 RETURNING seq",
            seq,
        )
        if result:
            await truncate_wal(self.db)  # the content leaves the write-ahead log too
        return bool(result)
