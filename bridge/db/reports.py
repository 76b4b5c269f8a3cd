"""Reports on the bridge's state for operators (the admin room's and the CLI's ``status``,
``queue``, ``portals``, ``portal``, ``whois``): read-only counts and lists across the outbox,
inbox, portal and ghost tables. Only ids, counts and times: never content."""

from __future__ import annotations

from dataclasses import dataclass

from mautrix.util.async_db import Database


@dataclass(frozen=True)
class QueueDepth:
    connector: str
    pending: int
    held: int
    """Pending behind a dead letter of their conversation."""
    oldest_ms: int | None
    """When the oldest pending delivery was queued."""
    last_error: str | None


@dataclass(frozen=True)
class PortalSummary:
    room_id: str
    title: str | None
    is_direct: bool
    voice: str
    connectors: list[tuple[str, str | None]]
    """(connector, its conversation id or None while being opened)."""


class ReportStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def queue_depths(self) -> dict[str, QueueDepth]:
        rows = await self.db.fetch(
            "SELECT connector, COUNT(*) AS pending, MIN(created_at) AS oldest FROM outbox "
            "WHERE state = 'pending' GROUP BY connector"
        )
        held_rows = await self.db.fetch(
            "SELECT o.connector, COUNT(*) AS held FROM outbox o WHERE o.state = 'pending' "
            "AND EXISTS (SELECT 1 FROM outbox d WHERE d.state = 'dead' "
            "AND d.connector = o.connector AND d.room_id = o.room_id AND d.seq < o.seq) "
            "GROUP BY o.connector"
        )
        held = {r["connector"]: int(r["held"]) for r in held_rows}
        errors = await self.db.fetch(
            "SELECT connector, last_error FROM outbox WHERE last_error IS NOT NULL "
            "AND seq IN (SELECT MAX(seq) FROM outbox WHERE last_error IS NOT NULL "
            "GROUP BY connector)"
        )
        last_error = {r["connector"]: str(r["last_error"]) for r in errors}
        out = {
            r["connector"]: QueueDepth(
                r["connector"],
                int(r["pending"]),
                held.get(r["connector"], 0),
                int(r["oldest"]) if r["oldest"] is not None else None,
                last_error.get(r["connector"]),
            )
            for r in rows
        }
        for connector, error in last_error.items():
            out.setdefault(connector, QueueDepth(connector, 0, 0, None, error))
        return out

    async def queue(self, connector: str, limit: int = 10) -> list[tuple[int, str, str, int, int]]:
        """The next pending deliveries: (id, room, operation, attempts, queued at ms)."""
        rows = await self.db.fetch(
            "SELECT seq, room_id, operation, attempts, created_at FROM outbox "
            "WHERE connector = $1 AND state = 'pending' ORDER BY seq LIMIT $2",
            connector,
            limit,
        )
        return [
            (int(r["seq"]), r["room_id"], r["operation"], int(r["attempts"]), int(r["created_at"]))
            for r in rows
        ]

    async def queue_heads(self) -> dict[str, tuple[int, int]]:
        """Per connector: (deliveries waiting that no dead letter holds, the first one's id).
        The head not moving while the vendor answers is what "stalled" means."""
        rows = await self.db.fetch(
            "SELECT o.connector, COUNT(*) AS waiting, MIN(o.seq) AS head FROM outbox o "
            "WHERE o.state = 'pending' AND NOT EXISTS (SELECT 1 FROM outbox d "
            "WHERE d.state = 'dead' AND d.connector = o.connector AND d.room_id = o.room_id) "
            "GROUP BY o.connector"
        )
        return {r["connector"]: (int(r["waiting"]), int(r["head"])) for r in rows}

    async def inbox_counts(self) -> dict[str, int]:
        rows = await self.db.fetch(
            "SELECT state, COUNT(*) AS n FROM inbox WHERE state IN ('pending', 'waiting', "
            "'failed') GROUP BY state"
        )
        return {r["state"]: int(r["n"]) for r in rows}

    async def portals(self, needle: str = "", limit: int = 20) -> tuple[int, list[PortalSummary]]:
        """Portals whose room id, title or linked connector contains ``needle``; (how many in
        all, the first ``limit``)."""
        pattern = f"%{needle.lower()}%"
        where = (
            "WHERE LOWER(p.room_id) LIKE $1 OR LOWER(COALESCE(p.title, '')) LIKE $1 "
            "OR EXISTS (SELECT 1 FROM portal_link l WHERE l.room_id = p.room_id "
            "AND LOWER(l.connector) LIKE $1)"
        )
        total = int(await self.db.fetchval(f"SELECT COUNT(*) FROM portal p {where}", pattern))
        rows = await self.db.fetch(
            f"SELECT p.room_id, p.title, p.is_direct, p.voice FROM portal p {where} "
            "ORDER BY p.created_at DESC LIMIT $2",
            pattern,
            limit,
        )
        return total, [await self._summary(r) for r in rows]

    async def portal(self, room_id: str) -> PortalSummary | None:
        row = await self.db.fetchrow(
            "SELECT room_id, title, is_direct, voice FROM portal WHERE room_id = $1", room_id
        )
        return await self._summary(row) if row is not None else None

    async def portal_of_conversation(self, conversation_id: str) -> str | None:
        """The portal room linked to this vendor conversation (the first, should several
        vendors use the same id)."""
        value = await self.db.fetchval(
            "SELECT room_id FROM portal_link WHERE conversation_id = $1 ORDER BY connector LIMIT 1",
            conversation_id,
        )
        return str(value) if value is not None else None

    async def _summary(self, row: object) -> PortalSummary:
        links = await self.db.fetch(
            "SELECT connector, conversation_id FROM portal_link WHERE room_id = $1 "
            "ORDER BY connector",
            row["room_id"],  # type: ignore[index]
        )
        return PortalSummary(
            row["room_id"],  # type: ignore[index]
            row["title"],  # type: ignore[index]
            bool(row["is_direct"]),  # type: ignore[index]
            row["voice"],  # type: ignore[index]
            [(link["connector"], link["conversation_id"]) for link in links],
        )

    async def portal_queue(self, room_id: str) -> tuple[int, int]:
        """(pending deliveries, dead letters) of one portal."""
        row = await self.db.fetchrow(
            "SELECT SUM(CASE WHEN state = 'pending' THEN 1 ELSE 0 END) AS pending, "
            "SUM(CASE WHEN state = 'dead' THEN 1 ELSE 0 END) AS dead FROM outbox "
            "WHERE room_id = $1",
            room_id,
        )
        return int(row["pending"] or 0), int(row["dead"] or 0)
