"""The durable inbox: every appservice transaction and vendor event, stored before it is acked."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import Any

from mautrix.util.async_db import Connection, Database

from bridge.db.clock import now_ms
from bridge.db.group_commit import Write
from bridge.db.ordering import serialize_appends
from bridge.values.crypto_extensions import lane_of as crypto_lane

MATRIX_ORIGIN = "matrix"
CRYPTO_ORIGIN = "crypto"
"""What the homeserver pushes for the bridge's devices (to-device events, key counts)."""
PENDING = "pending"
WAITING = "waiting"
"""Held behind a gap in its room's timeline (see ``settle``): not processed until released."""


@dataclass(frozen=True)
class InboxItem:
    seq: int
    origin: str
    lane: str
    payload: dict[str, Any]
    attempts: int
    received_at: int = 0
    """When it was stored (ms): the delivery latency starts there."""


class InboxStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def store_transaction(
        self,
        txn_id: str,
        events: list[dict[str, Any]],
        ephemeral: list[dict[str, Any]] | None = None,
        park: Collection[str] = (),
        *,
        crypto: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Store a homeserver transaction in one database transaction.

        Returns True when something in it was new. Events are deduplicated by event id, never by
        transaction id: Synapse (on SQLite) numbers its transactions from 1 again after a
        restart, so a known id may carry new events. The id is recorded (see
        ``transaction_check``) only to notice such a restart.

        What belongs to a room in ``park``, or to a room that has waiting rows already, is
        stored *waiting* (see ``settle``): held, in order, until the events before it are in.
        """
        now = now_ms()
        rows = matrix_rows(txn_id, events, ephemeral)
        extra = crypto_rows(txn_id, crypto or [])
        async with self.db.acquire() as conn, conn.transaction():
            await serialize_appends(conn, "inbox")
            held = await _held(conn, [row[1] for row in rows])
            fresh = [row for row in rows if row[1] not in held]
            if extra:
                known = await _held(conn, [row[1] for row in extra], CRYPTO_ORIGIN)
                fresh += [row for row in extra if row[1] not in known]
            waiting = set(park) | await _waiting_lanes(conn, {row[2] for row in fresh})
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
                    "INSERT INTO inbox (origin, dedup_key, lane, payload, received_at, state) "
                    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (origin, dedup_key) DO NOTHING",
                    [(*row, now, WAITING if row[2] in waiting else PENDING) for row in fresh],
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
            "SELECT seq, origin, lane, payload, attempts, received_at FROM inbox "
            "WHERE state = 'pending' AND seq > $1 ORDER BY seq LIMIT $2",
            after_seq,
            limit,
        )
        return [_item(r) for r in rows]

    async def pending_in_lane(self, lane: str, after_seq: int, limit: int) -> list[InboxItem]:
        rows = await self.db.fetch(
            "SELECT seq, origin, lane, payload, attempts, received_at FROM inbox "
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

    # Noticing what the homeserver did not send (``bridge/core/reconcile.py``) -------------------

    async def transaction_check(
        self,
        txn_id: str,
        events: list[dict[str, Any]],
        ephemeral: list[dict[str, Any]] | None = None,
    ) -> tuple[bool, bool]:
        """(whether this transaction id was stored before, whether all it carries is held)."""
        keys = [row[1] for row in matrix_rows(txn_id, events, ephemeral)]
        async with self.db.acquire() as conn:
            seen = bool(
                await conn.fetchval("SELECT 1 FROM as_transaction WHERE txn_id = $1", txn_id)
            )
            held = await _held(conn, keys)
        return seen, all(key in held for key in keys)

    async def latest_transaction_ids(self, limit: int = 16) -> list[tuple[str, int]]:
        """(id, received_at) of the transactions stored (or reused with news) last, newest
        first."""
        rows = await self.db.fetch(
            "SELECT txn_id, received_at FROM as_transaction ORDER BY received_at DESC LIMIT $1",
            limit,
        )
        return [(row["txn_id"], int(row["received_at"])) for row in rows]

    async def forget_transactions(self, before_ms: int) -> None:
        """Drop transaction ids older than ``before_ms``: they only serve to notice restarts."""
        await self.db.execute("DELETE FROM as_transaction WHERE received_at < $1", before_ms)

    async def held_events(self, event_ids: list[str]) -> dict[str, int]:
        """The inbox sequence number of each of ``event_ids`` the inbox holds."""
        async with self.db.acquire() as conn:
            return await _held(conn, event_ids)

    async def store_missed(self, events: list[dict[str, Any]]) -> int:
        """Store room events that no transaction brought, oldest first, exactly as a transaction
        would have (same keys: a later arrival changes nothing; a room with waiting rows gets
        these waiting too); returns how many were new."""
        now = now_ms()
        rows = matrix_rows("", events)
        async with self.db.acquire() as conn, conn.transaction():
            await serialize_appends(conn, "inbox")
            held = await _held(conn, [row[1] for row in rows])
            fresh = [row for row in rows if row[1] not in held]
            waiting = await _waiting_lanes(conn, {row[2] for row in fresh})
            if fresh:
                await conn.executemany(
                    "INSERT INTO inbox (origin, dedup_key, lane, payload, received_at, state) "
                    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (origin, dedup_key) DO NOTHING",
                    [(*row, now, WAITING if row[2] in waiting else PENDING) for row in fresh],
                )
        return len({row[1] for row in fresh})

    # Holding a room until the events before its latest are in (``bridge/core/causal_order.py``)

    async def held_states(self, event_ids: list[str]) -> dict[str, str]:
        """The state (pending, done, failed, waiting) of each of ``event_ids`` the inbox holds."""
        states: dict[str, str] = {}
        unique = list(dict.fromkeys(event_ids))
        for start in range(0, len(unique), 200):
            chunk = unique[start : start + 200]
            marks = ", ".join(f"${i + 2}" for i in range(len(chunk)))
            rows = await self.db.fetch(
                f"SELECT dedup_key, state FROM inbox WHERE origin = $1 AND dedup_key IN ({marks})",
                MATRIX_ORIGIN,
                *chunk,
            )
            states.update((row["dedup_key"], str(row["state"])) for row in rows)
        return states

    async def waiting_rooms(self) -> dict[str, int]:
        """Rooms with waiting rows, and when the oldest of them was received (ms)."""
        rows = await self.db.fetch(
            "SELECT lane, MIN(received_at) AS since FROM inbox WHERE state = $1 GROUP BY lane",
            WAITING,
        )
        return {row["lane"]: int(row["since"]) for row in rows}

    async def settle(self, room_id: str, events: list[dict[str, Any]]) -> int:
        """Put a room's events in the inbox in the order given (its timeline's, oldest first)
        and release its waiting rows, in one database transaction.

        Each of ``events`` the inbox lacks is stored; each it holds waiting is moved to this
        place (a new sequence number, the payload it was stored with); the room's other waiting
        rows (receipts, typing, events the caller did not list) follow in their own order. All
        become pending. Returns how many events were new.
        """
        now = now_ms()
        rows = matrix_rows("", events)
        async with self.db.acquire() as conn, conn.transaction():
            await serialize_appends(conn, "inbox")
            states = {
                row["dedup_key"]: row
                for row in await conn.fetch(
                    "SELECT seq, dedup_key, payload, received_at FROM inbox "
                    "WHERE lane = $1 AND state = $2 ORDER BY seq",
                    room_id,
                    WAITING,
                )
            }
            held = await _held(conn, [row[1] for row in rows])
            ordered: list[tuple[str, str, str, str, int]] = []
            new = 0
            for origin, key, lane, payload in rows:
                if key in states:
                    row = states.pop(key)
                    ordered.append((origin, key, lane, row["payload"], int(row["received_at"])))
                elif key not in held:
                    ordered.append((origin, key, lane, payload, now))
                    new += 1
            for row in states.values():
                ordered.append(
                    (MATRIX_ORIGIN, row["dedup_key"], room_id, row["payload"], row["received_at"])
                )
            await conn.execute("DELETE FROM inbox WHERE lane = $1 AND state = $2", room_id, WAITING)
            if ordered:
                await conn.executemany(
                    "INSERT INTO inbox (origin, dedup_key, lane, payload, received_at) "
                    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (origin, dedup_key) DO NOTHING",
                    ordered,
                )
        return new

    async def max_seq(self) -> int:
        return int(await self.db.fetchval("SELECT COALESCE(MAX(seq), 0) FROM inbox") or 0)

    async def unprocessed(self, batch: int = 500) -> AsyncIterator[InboxItem]:
        """Every item that still holds content (pending, waiting or failed), oldest first, read
        ``batch`` at a time."""
        after = 0
        while True:
            rows = await self.db.fetch(
                "SELECT seq, origin, lane, payload, attempts, received_at FROM inbox "
                "WHERE state IN ('pending', 'waiting', 'failed') AND payload IS NOT NULL "
                "AND seq > $1 ORDER BY seq LIMIT $2",
                after,
                batch,
            )
            for row in rows:
                yield _item(row)
            if len(rows) < batch:
                return
            after = int(rows[-1]["seq"])

    async def erase(self, seqs: list[int], reason: str) -> int:
        """Drop these items' content for good; they are never processed (state ``failed``)."""
        erased = 0
        async with self.db.acquire() as conn, conn.transaction():
            for seq in seqs:
                erased += len(
                    await conn.fetch(
                        "UPDATE inbox SET state = 'failed', payload = NULL, last_error = $2 "
                        "WHERE seq = $1 AND state IN ('pending', 'waiting', 'failed') "
                        "RETURNING seq",
                        seq,
                        reason,
                    )
                )
        return erased

    async def active_rooms(self, since_ms: int, limit: int, scan: int = 20_000) -> list[str]:
        """Rooms with homeserver events received since ``since_ms``, most recent first; only the
        newest ``scan`` inbox rows are looked at (the primary key bounds the work)."""
        newest = await self.max_seq()
        rows = await self.db.fetch(
            "SELECT lane, MAX(seq) AS last FROM inbox "
            "WHERE seq > $1 AND origin = $2 AND received_at >= $3 "
            "GROUP BY lane ORDER BY last DESC LIMIT $4",
            newest - scan,
            MATRIX_ORIGIN,
            since_ms,
            limit,
        )
        return [row["lane"] for row in rows]


def matrix_rows(
    txn_id: str, events: list[dict[str, Any]], ephemeral: list[dict[str, Any]] | None = None
) -> list[tuple[str, str, str, str]]:
    """(origin, dedup_key, lane, payload) of each event and EDU of a homeserver transaction.

    Room events are keyed by event id. Typing and receipts have none: the transaction id, their
    place in it and a digest of their content make the key, so a transaction resent whole is
    stored once while a reused transaction id (a restarted homeserver) still brings news.
    """
    rows = [
        (MATRIX_ORIGIN, event["event_id"], event["room_id"], json.dumps(event)) for event in events
    ]
    for index, edu in enumerate(ephemeral or ()):
        digest = hashlib.sha256(
            json.dumps(edu, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()[:16]
        rows.append(
            (MATRIX_ORIGIN, f"edu:{txn_id}:{index}:{digest}", edu["room_id"], json.dumps(edu))
        )
    return rows


def crypto_rows(txn_id: str, items: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(origin, dedup_key, lane, payload) of the crypto items of a transaction (see
    ``bridge/values/crypto_extensions.py``): keyed like EDUs, having no id of their own."""
    rows = []
    for index, item in enumerate(items):
        digest = hashlib.sha256(
            json.dumps(item, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()[:16]
        rows.append(
            (CRYPTO_ORIGIN, f"{txn_id}:{index}:{digest}", crypto_lane(item), json.dumps(item))
        )
    return rows


async def _held(conn: Connection, keys: list[str], origin: str = MATRIX_ORIGIN) -> dict[str, int]:
    """The seq of each of ``keys`` (homeserver dedup keys) already in the inbox."""
    held: dict[str, int] = {}
    unique = list(dict.fromkeys(k for k in keys if isinstance(k, str)))
    for start in range(0, len(unique), 200):
        chunk = unique[start : start + 200]
        marks = ", ".join(f"${i + 2}" for i in range(len(chunk)))
        rows = await conn.fetch(
            f"SELECT dedup_key, seq FROM inbox WHERE origin = $1 AND dedup_key IN ({marks})",
            origin,
            *chunk,
        )
        held.update((row["dedup_key"], int(row["seq"])) for row in rows)
    return held


async def _waiting_lanes(conn: Connection, lanes: set[str]) -> set[str]:
    """Which of ``lanes`` have waiting rows (a partial index makes this a look-up)."""
    if not lanes:
        return set()
    chunk = list(lanes)
    marks = ", ".join(f"${i + 2}" for i in range(len(chunk)))
    rows = await conn.fetch(
        f"SELECT DISTINCT lane FROM inbox WHERE state = $1 AND lane IN ({marks})",
        WAITING,
        *chunk,
    )
    return {row["lane"] for row in rows}


def _item(row: Any) -> InboxItem:
    return InboxItem(
        row["seq"],
        row["origin"],
        row["lane"],
        json.loads(row["payload"]),
        row["attempts"],
        int(row["received_at"] or 0),
    )
