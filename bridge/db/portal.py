"""Portals (one Matrix room per bridged conversation) and their links to vendor conversations."""

from __future__ import annotations

from dataclasses import dataclass

from mautrix.util.async_db import Connection, Database

from bridge.db.clock import now_ms


@dataclass(frozen=True)
class Portal:
    room_id: str
    title: str | None
    is_direct: bool
    voice: str
    """Who speaks for the bridge in this room (notices): the bot, or the ghost a user invited."""


@dataclass(frozen=True)
class PortalLink:
    room_id: str
    connector: str
    conversation_id: str | None
    """None while the vendor conversation is being opened (its creation is queued)."""


class PortalStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, room_id: str) -> Portal | None:
        row = await self.db.fetchrow(
            "SELECT room_id, title, is_direct, voice FROM portal WHERE room_id = $1", room_id
        )
        if row is None:
            return None
        return Portal(row["room_id"], row["title"], bool(row["is_direct"]), row["voice"])

    async def create(self, portal: Portal, *, conn: Connection | None = None) -> None:
        await (conn or self.db).execute(
            "INSERT INTO portal (room_id, title, is_direct, voice, created_at) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (room_id) DO NOTHING",
            portal.room_id,
            portal.title,
            portal.is_direct,
            portal.voice,
            now_ms(),
        )

    async def links(self, room_id: str) -> list[PortalLink]:
        rows = await self.db.fetch(
            "SELECT room_id, connector, conversation_id FROM portal_link WHERE room_id = $1 "
            "ORDER BY connector",
            room_id,
        )
        return [PortalLink(r["room_id"], r["connector"], r["conversation_id"]) for r in rows]

    async def link(self, room_id: str, connector: str) -> PortalLink | None:
        row = await self.db.fetchrow(
            "SELECT room_id, connector, conversation_id FROM portal_link "
            "WHERE room_id = $1 AND connector = $2",
            room_id,
            connector,
        )
        return PortalLink(row["room_id"], row["connector"], row["conversation_id"]) if row else None

    async def by_conversation(self, connector: str, conversation_id: str) -> str | None:
        """The room bridged to this vendor conversation, if any."""
        return await self.db.fetchval(
            "SELECT room_id FROM portal_link WHERE connector = $1 AND conversation_id = $2",
            connector,
            conversation_id,
        )

    async def add_link(
        self,
        room_id: str,
        connector: str,
        conversation_id: str | None,
        *,
        conn: Connection | None = None,
    ) -> None:
        await (conn or self.db).execute(
            "INSERT INTO portal_link (room_id, connector, conversation_id) VALUES ($1, $2, $3) "
            "ON CONFLICT (room_id, connector) DO NOTHING",
            room_id,
            connector,
            conversation_id,
        )

    async def set_conversation(self, room_id: str, connector: str, conversation_id: str) -> None:
        await self.db.execute(
            "UPDATE portal_link SET conversation_id = $3 WHERE room_id = $1 AND connector = $2",
            room_id,
            connector,
            conversation_id,
        )

    async def count(self) -> int:
        return int(await self.db.fetchval("SELECT COUNT(*) FROM portal"))
