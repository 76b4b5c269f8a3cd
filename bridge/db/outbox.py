"""The durable outbox: deliveries to vendors, one FIFO per (connector, portal room)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Connection, Database

from bridge.db.clock import now_ms
from bridge.db.group_commit import Write
from bridge.db.ordering import serialize_appends

_LANE_SEPARATOR = "\x1f"
_ENQUEUE = (
    "INSERT INTO outbox (connector, room_id, operation, dedup_key, payload, created_at) "
    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (connector, dedup_key) DO NOTHING"
)
_DONE = "UPDATE outbox SET state = 'done', payload = NULL, last_error = NULL WHERE seq = $1"
_COLUMNS = (
    "o.seq, o.connector, o.room_id, o.operation, o.dedup_key, o.payload, o.attempts, o.created_at"
)
_WAITING = "('pending', 'failed', 'dead')"
"""The states whose rows still hold content."""
# A dead letter holds everything after it in its conversation: order before delivery.
_NOT_HELD = (
    "NOT EXISTS (SELECT 1 FROM outbox d WHERE d.state = 'dead' AND d.connector = o.connector "
    "AND d.room_id = o.room_id AND d.seq < o.seq)"
)


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    connector: str
    room_id: str
    operation: str
    dedup_key: str
    payload: dict[str, Any]
    attempts: int
    created_at: int = 0
    """When it was queued (ms): the delivery latency starts there."""

    @property
    def lane(self) -> str:
        return f"{self.connector}{_LANE_SEPARATOR}{self.room_id}"


class OutboxStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def enqueue(
        self,
        connector: str,
        room_id: str,
        operation: str,
        dedup_key: str,
        payload: dict[str, Any],
        *,
        conn: Connection | None = None,
    ) -> bool:
        """Queue one delivery; False when (connector, dedup_key) was queued before."""
        if conn is None:
            async with self.db.acquire() as own, own.transaction():
                return await self.enqueue(
                    connector, room_id, operation, dedup_key, payload, conn=own
                )
        await serialize_appends(conn, "outbox")
        write = self.enqueue_write(connector, room_id, operation, dedup_key, payload)
        return await conn.fetchval(f"{write.sql} RETURNING seq", *write.args) is not None

    @staticmethod
    def enqueue_write(
        connector: str, room_id: str, operation: str, dedup_key: str, payload: dict[str, Any]
    ) -> Write:
        """``enqueue`` as a write for a group commit (a repeated dedup key changes nothing)."""
        return Write(
            _ENQUEUE,
            (connector, room_id, operation, dedup_key, json.dumps(payload), now_ms()),
            appends_to="outbox",
        )

    @staticmethod
    def done_write(seq: int) -> Write:
        """``mark_done`` as a write for a group commit."""
        return Write(_DONE, (seq,))

    async def pending(self, after_seq: int, limit: int) -> list[OutboxItem]:
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM outbox o "
            f"WHERE o.state = 'pending' AND o.seq > $1 AND {_NOT_HELD} ORDER BY o.seq LIMIT $2",
            after_seq,
            limit,
        )
        return [_item(r) for r in rows]

    async def pending_in_lane(self, lane: str, after_seq: int, limit: int) -> list[OutboxItem]:
        connector, _, room_id = lane.partition(_LANE_SEPARATOR)
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM outbox o "
            "WHERE o.connector = $1 AND o.room_id = $2 AND o.state = 'pending' AND o.seq > $3 "
            f"AND {_NOT_HELD} ORDER BY o.seq LIMIT $4",
            connector,
            room_id,
            after_seq,
            limit,
        )
        return [_item(r) for r in rows]

    async def mark_done(self, seq: int, *, conn: Connection | None = None) -> None:
        await (conn or self.db).execute(_DONE, seq)

    async def mark_failed(self, seq: int, reason: str) -> None:
        await self.db.execute(
            "UPDATE outbox SET state = 'failed', last_error = $2 WHERE seq = $1", seq, reason
        )

    async def mark_dead(self, seq: int, reason: str) -> None:
        await self.db.execute(
            "UPDATE outbox SET state = 'dead', last_error = $2 WHERE seq = $1", seq, reason
        )

    async def record_attempt(self, seq: int, error: str) -> None:
        await self.db.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE seq = $1", seq, error
        )

    async def depth(self, connector: str | None = None) -> int:
        if connector is None:
            value = await self.db.fetchval("SELECT COUNT(*) FROM outbox WHERE state = 'pending'")
        else:
            value = await self.db.fetchval(
                "SELECT COUNT(*) FROM outbox WHERE state = 'pending' AND connector = $1", connector
            )
        return int(value)

    async def waiting(
        self, room_id: str | None = None, connector: str | None = None
    ) -> list[OutboxItem]:
        """Every item that still holds content (pending, failing or dead-lettered), payloads
        opened, of one room and/or connector (None: all), in queue order."""
        rows = await self.db.fetch(
            f"SELECT {_COLUMNS} FROM outbox o WHERE o.state IN {_WAITING} "
            "AND ($1 = '' OR o.room_id = $1) AND ($2 = '' OR o.connector = $2) ORDER BY o.seq",
            room_id or "",
            connector or "",
        )
        return [_item(r) for r in rows]

    async def drop(self, seqs: list[int], reason: str) -> int:
        """Give these items up for good (state ``discarded``): their content goes."""
        dropped = 0
        async with self.db.acquire() as conn, conn.transaction():
            for seq in seqs:
                dropped += len(
                    await conn.fetch(
                        "UPDATE outbox SET state = 'discarded', payload = NULL, last_error = $2 "
                        f"WHERE seq = $1 AND state IN {_WAITING} RETURNING seq",
                        seq,
                        reason,
                    )
                )
        return dropped


def _item(row: Any) -> OutboxItem:
    return OutboxItem(
        row["seq"],
        row["connector"],
        row["room_id"],
        row["operation"],
        row["dedup_key"],
        json.loads(row["payload"]),
        row["attempts"],
        int(row["created_at"] or 0),
    )
