"""The durable outbox: deliveries to vendors, one FIFO per (connector, portal room).

What waits here is message content (pending, failing or dead-lettered), so the ``payload``
column holds it sealed with the secrets key (``bridge/secrets.py``, AES-256-GCM, bound to its
row's (connector, dedup key)): the database alone reveals none of it. Callers see
``OutboxItem.payload`` as a dict (the core reads it, with ``operation``, as a typed operation:
``bridge/core/operations.py``); sealing is this store's business. Rows written before sealing
(plain JSON, which starts with ``{``) stay readable and are sealed by ``seal_all``. Without a key
(only possible with ``encryption.enabled: false`` and no ``secrets`` key) content is stored in
clear and the bridge warns at start. Delivered and discarded rows keep no payload at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Connection, Database

from bridge.db.clock import now_ms
from bridge.db.database import truncate_wal
from bridge.db.group_commit import Write
from bridge.db.ordering import serialize_appends
from bridge.secrets import VERSION as _SEALED_PREFIX
from bridge.secrets import KeyUnavailable, SecretBox, sealed_key_id

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
    def __init__(self, db: Database, box: SecretBox | None = None) -> None:
        self.db = db
        self.box = box
        """Seals payloads at rest; None stores them in clear (no secrets key configured)."""

    def _seal(self, connector: str, dedup_key: str, payload: dict[str, Any]) -> str:
        text = json.dumps(payload)
        if self.box is None:
            return text
        return self.box.seal(text, _context(connector, dedup_key))

    def _open(self, connector: str, dedup_key: str, stored: str) -> dict[str, Any]:
        if stored.startswith(f"{_SEALED_PREFIX}:"):
            if self.box is None:
                raise KeyUnavailable(
                    "the outbox holds content sealed with a secrets key, and none is configured "
                    f"(key {sealed_key_id(stored)}): set secrets.key_file"
                )
            stored = self.box.open(stored, _context(connector, dedup_key))
        payload: dict[str, Any] = json.loads(stored)
        return payload

    def _item(self, row: Any) -> OutboxItem:
        return OutboxItem(
            row["seq"],
            row["connector"],
            row["room_id"],
            row["operation"],
            row["dedup_key"],
            self._open(row["connector"], row["dedup_key"], row["payload"]),
            row["attempts"],
            int(row["created_at"] or 0),
        )

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

    def enqueue_write(
        self,
        connector: str,
        room_id: str,
        operation: str,
        dedup_key: str,
        payload: dict[str, Any],
    ) -> Write:
        """``enqueue`` as a write for a group commit (a repeated dedup key changes nothing)."""
        sealed = self._seal(connector, dedup_key, payload)
        return Write(
            _ENQUEUE,
            (connector, room_id, operation, dedup_key, sealed, now_ms()),
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
        return [self._item(r) for r in rows]

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
        return [self._item(r) for r in rows]

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
        return [self._item(r) for r in rows]

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
        if dropped:
            await truncate_wal(self.db)  # the content leaves the write-ahead log too
        return dropped

    async def seal_all(self) -> tuple[int, int]:
        """Seal with the current key every waiting payload that is in clear (written before
        sealing) or sealed with a previous key; returns (sealed now, already current).
        Nothing to do without a key."""
        box = self.box
        if box is None:
            return 0, 0
        resealed = current = 0
        async with self.db.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT seq, connector, dedup_key, payload FROM outbox WHERE state IN {_WAITING} "
                "AND payload IS NOT NULL"
            )
            for row in rows:
                stored = row["payload"]
                if stored.startswith(f"{_SEALED_PREFIX}:") and not box.needs_resealing(stored):
                    current += 1
                    continue
                payload = self._open(row["connector"], row["dedup_key"], stored)
                await conn.execute(
                    "UPDATE outbox SET payload = $2 WHERE seq = $1",
                    row["seq"],
                    self._seal(row["connector"], row["dedup_key"], payload),
                )
                resealed += 1
        return resealed, current

    async def key_usage(self) -> dict[str, int]:
        """How many waiting payloads each key id sealed (``""``: in clear)."""
        usage: dict[str, int] = {}
        for row in await self.db.fetch(
            f"SELECT payload FROM outbox WHERE state IN {_WAITING} AND payload IS NOT NULL"
        ):
            stored = row["payload"]
            kid = sealed_key_id(stored) if stored.startswith(f"{_SEALED_PREFIX}:") else ""
            usage[kid] = usage.get(kid, 0) + 1
        return usage


def _context(connector: str, dedup_key: str) -> str:
    # The row's identity (unique): a sealed payload copied into another row does not open there.
    return f"outbox|{connector}|{dedup_key}"
