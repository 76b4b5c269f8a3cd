"""The durable inbox: every appservice transaction and vendor event, stored before it is acked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Database

from bridge.db.clock import now_ms
from bridge.db.group_commit import Write
from bridge.db.ordering import serialize_appends

MATRIX_ORIGIN = "matrix"


@dataclass(frozen=True)
class InboxItem:
    seq: int
    origin: str
    lane: str
    payload: dict[str, Any]
    attempts: int


class InboxStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def store_transaction(
        self,
        txn_id: str,
        events: list[dict[str, Any]],
        ephemeral: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Store a homeserver transaction in one database transaction.

        Returns True when something in it was new. Events are deduplicated by event id, never by
        transaction id: Synapse (on SQLite) numbers its transactions from 1 again after a
        restart, so a known id may carry new events. The id is recorded (see
        ``transaction_check``) only to notice such a restart.
        """
        now = now_ms()
        rows = matrix_rows(txn_id, events, ephemeral)
        async with self.db.acquire() as conn, conn.transaction():
            await serialize_appends(conn, "inbox")
            held = await _held(conn, [row[1] for row in rows])
            fresh = [row for row in rows if row[1] not in held]
            # received_at moves when a known id brings news: the id was reused, and is the
            # homeserver's latest (see ``latest_transaction_ids``).
            await conn.execute(
                "INSERT INTO as_transaction (txn_id, received_at) VALUES ($1, $2) "
                "ON CONFLICT (txn_id) DO UPDATE SET received_at = excluded.received_at "
                "WHERE $3",
                txn_id,
                now,
                bool(fresh),
            )
            if fresh:
                await conn.executemany(
                    "INSERT INTO inbox (origin, dedup_key, lane, payload, received_at) "
                    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (origin, dedup_key) DO NOTHING",
                    [(*row, now) for row in fresh],
                )
        return bool(fresh)

    async def store_remote(
        self, connector: str, event_id: str, lane: str, payload: dict[str, Any]
    ) -> bool:
        """Store one vendor event; False when (connector, event_id) was stored before."""
        async with self.db.acquire() as conn, conn.transaction():
            await serialize_appends(conn, "inbox")
            inserted = await conn.fetchval(
                "INSERT INTO inbox (origin, dedup_key, lane, payload, received_at) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (origin, dedup_key) DO NOTHING "
                "RETURNING seq",
                connector,
                event_id,
                lane,
                json.dumps(payload),
                now_ms(),
            )
        return inserted is not None

    async def pending(self, after_seq: int, limit: int) -> list[InboxItem]:
        rows = await self.db.fetch(
            "SELECT seq, origin, lane, payload, attempts FROM inbox "
            "WHERE state = 'pending' AND seq > $1 ORDER BY seq LIMIT $2",
            after_seq,
            limit,
        )
        return [_item(r) for r in rows]

    async def pending_in_lane(self, lane: str, after_seq: int, limit: int) -> list[InboxItem]:
        rows = await self.db.fetch(
            "SELECT seq, origin, lane, payload, attempts FROM inbox "
            "WHERE lane = $1 AND state = 'pending' AND seq > $2 ORDER BY seq LIMIT $3",
            lane,
            after_seq,
            limit,
        )
        return [_item(r) for r in rows]

    @staticmethod
    def remote_write(connector: str, event_id: str, lane: str, payload: dict[str, Any]) -> Write:
        """``store_remote`` as a write for a group commit (a stored event id changes nothing)."""
        return Write(
            "INSERT INTO inbox (origin, dedup_key, lane, payload, received_at) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (origin, dedup_key) DO NOTHING",
            (connector, event_id, lane, json.dumps(payload), now_ms()),
            appends_to="inbox",
        )

    @staticmethod
    def done_write(seq: int) -> Write:
        """``mark_done`` as a write for a group commit: the payload goes with it."""
        return Write(
            "UPDATE inbox SET state = 'done', payload = NULL, last_error = NULL WHERE seq = $1",
            (seq,),
        )

    async def mark_done(self, seq: int) -> None:
        # The payload goes: content is kept only as long as delivery needs it.
        await self.db.execute(
            "UPDATE inbox SET state = 'done', payload = NULL, last_error = NULL WHERE seq = $1",
            seq,
        )

    async def mark_failed(self, seq: int, reason: str) -> None:
        """Give up on an item that can never be processed; it stays visible for operators."""
        await self.db.execute(
            "UPDATE inbox SET state = 'failed', last_error = $2 WHERE seq = $1", seq, reason
        )

    async def record_attempt(self, seq: int, error: str) -> None:
        await self.db.execute(
            "UPDATE inbox SET attempts = attempts + 1, last_error = $2 WHERE seq = $1", seq, error
        )

    async def count(self, state: str) -> int:
        return int(await self.db.fetchval("SELECT COUNT(*) FROM inbox WHERE state = $1", state))

    async def transaction_seen(self, txn_id: str) -> bool:
        return bool(
            await self.db.fetchval("SELECT 1 FROM as_transaction WHERE txn_id = $1", txn_id)
        )


def _item(row: Any) -> InboxItem:
    return InboxItem(
        row["seq"], row["origin"], row["lane"], json.loads(row["payload"]), row["attempts"]
    )
