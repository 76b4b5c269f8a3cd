"""The message map: (connector, vendor message id) <-> Matrix event id. Ids only, never content.

Every look-up is scoped to one portal room: an id of another portal (a reply, edit, reaction or
redaction pointing across conversations, possible inside ciphertext or from a vendor) is not
found, rather than acted upon in the wrong conversation.
"""

from __future__ import annotations

from mautrix.util.async_db import Connection, Database

from bridge.db.group_commit import Write

_ADD = (
    "INSERT INTO message_map (connector, remote_id, room_id, event_id) "
    "VALUES ($1, $2, $3, $4) ON CONFLICT (connector, remote_id) DO NOTHING"
)


class MessageMapStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def event_for(self, connector: str, remote_id: str, *, room_id: str) -> str | None:
        return await self.db.fetchval(
            "SELECT event_id FROM message_map "
            "WHERE connector = $1 AND remote_id = $2 AND room_id = $3",
            connector,
            remote_id,
            room_id,
        )

    async def remote_for(self, connector: str, event_id: str, *, room_id: str) -> str | None:
        return await self.db.fetchval(
            "SELECT remote_id FROM message_map "
            "WHERE connector = $1 AND event_id = $2 AND room_id = $3",
            connector,
            event_id,
            room_id,
        )

    async def remotes_for(self, connector: str, event_id: str, *, room_id: str) -> list[str]:
        """Every vendor id of one Matrix event (a long message may have been split)."""
        rows = await self.db.fetch(
            "SELECT remote_id FROM message_map "
            "WHERE connector = $1 AND event_id = $2 AND room_id = $3 ORDER BY remote_id",
            connector,
            event_id,
            room_id,
        )
        return [r["remote_id"] for r in rows]

    async def rooms_of(self, event_id: str) -> set[str]:
        """The portal rooms where a Matrix event was carried (one, as event ids are unique;
        empty when it never was): to tell a relation pointing to another portal."""
        rows = await self.db.fetch(
            "SELECT DISTINCT room_id FROM message_map WHERE event_id = $1", event_id
        )
        return {r["room_id"] for r in rows}

    async def add(
        self,
        connector: str,
        remote_id: str,
        room_id: str,
        event_id: str,
        *,
        conn: Connection | None = None,
    ) -> None:
        await (conn or self.db).execute(_ADD, connector, remote_id, room_id, event_id)

    @staticmethod
    def add_write(connector: str, remote_id: str, room_id: str, event_id: str) -> Write:
        """``add`` as a write for a group commit."""
        return Write(_ADD, (connector, remote_id, room_id, event_id))
