"""Erasures (``forget``): the rows that name a professional, erased; and the Matrix part of
each erasure that still waits for the homeserver.

One row per erasure: when it was asked, and the Matrix IDs whose redactions, leaving and profile
clearing are still to do. A row whose Matrix part is done keeps its times only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mautrix.util.async_db import Database

from bridge.db.clock import now_ms

_ROWS_NAMING_A_PROFESSIONAL = (
    "professional_mxid",
    "professional_mailbox",
    "permission_exception",
    "professional",
    "permission",
    "ghost",
)
"""Tables whose ``idnps`` column names a professional, children first."""


@dataclass(frozen=True)
class PendingErasure:
    id: int
    pending: list[str]
    attempts: int


class ErasureStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def erase_rows(self, idnps: str) -> int:
        """Erase the rows that name a professional: directory entry, Matrix IDs and secure
        mailboxes, permissions, ghost rows; how many went. Queued content, crypto material and
        what their ghosts left on Matrix are erased by ``bridge.core.erasure``. The audit log
        keeps its metadata rows (its own retention applies)."""
        erased = 0
        async with self.db.acquire() as conn, conn.transaction():
            for table in _ROWS_NAMING_A_PROFESSIONAL:
                erased += len(
                    await conn.fetch(f"DELETE FROM {table} WHERE idnps = $1 RETURNING 1", idnps)
                )
        return erased

    async def open(self, pending: list[str]) -> int:
        """Record an erasure whose Matrix part is still to do: ``pending`` holds Matrix IDs
        (a ghost to erase) and ``"<room> <event>"`` (an event to redact); its id."""
        return int(
            await self.db.fetchval(
                "INSERT INTO erasure (requested_at, pending) VALUES ($1, $2) RETURNING id",
                now_ms(),
                json.dumps(list(dict.fromkeys(pending))),
            )
        )

    async def unfinished(self) -> list[PendingErasure]:
        rows = await self.db.fetch(
            "SELECT id, pending, attempts FROM erasure WHERE done_at IS NULL ORDER BY id"
        )
        return [
            PendingErasure(int(r["id"]), json.loads(r["pending"]), int(r["attempts"])) for r in rows
        ]

    async def remaining(self, erasure_id: int, pending: list[str], error: str | None) -> None:
        """What is still to do after an attempt (nothing: the erasure is done)."""
        if pending:
            await self.db.execute(
                "UPDATE erasure SET pending = $2, attempts = attempts + 1, last_error = $3 "
                "WHERE id = $1",
                erasure_id,
                json.dumps(list(dict.fromkeys(pending))),
                error,
            )
        else:
            await self.db.execute(
                "UPDATE erasure SET pending = '[]', last_error = NULL, done_at = $2 WHERE id = $1",
                erasure_id,
                now_ms(),
            )

    async def events_sent_for(self, idnps: str) -> list[tuple[str, str]]:
        """(room, event id) of what the audit log says the bridge sent into Matrix for this
        professional (their messages, edits, reactions), oldest first."""
        rows = await self.db.fetch(
            "SELECT portal, event_id FROM audit_log WHERE direction = 'to_matrix' "
            "AND sender = $1 AND event_id IS NOT NULL AND portal IS NOT NULL ORDER BY at, id",
            idnps,
        )
        return list(dict.fromkeys((str(r["portal"]), str(r["event_id"])) for r in rows))

    async def latest_id(self) -> int:
        return int(await self.db.fetchval("SELECT COALESCE(MAX(id), 0) FROM erasure"))
