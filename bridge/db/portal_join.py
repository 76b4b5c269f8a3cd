"""Who joined which portal, and when: ids and times only (the vendor side is told later)."""

from __future__ import annotations

from dataclasses import dataclass

from mautrix.util.async_db import Database


@dataclass(frozen=True)
class PortalJoin:
    room_id: str
    user_id: str
    event_id: str
    at: int


class PortalJoinStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(self, room_id: str, user_id: str, event_id: str, at: int) -> None:
        """A join event (recorded once, however often it is processed)."""
        await self.db.execute(
            "INSERT INTO portal_join (room_id, user_id, event_id, at) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (event_id) DO NOTHING",
            room_id,
            user_id,
            event_id,
            at,
        )

    async def of_room(self, room_id: str, limit: int = 100) -> list[PortalJoin]:
        rows = await self.db.fetch(
            "SELECT room_id, user_id, event_id, at FROM portal_join WHERE room_id = $1 "
            "ORDER BY at, id LIMIT $2",
            room_id,
            limit,
        )
        return [PortalJoin(r["room_id"], r["user_id"], r["event_id"], int(r["at"])) for r in rows]
