"""Portals (one Matrix room per bridged conversation) and their links to vendor conversations.

Every event of a portal room looks its portal and links up, so they are cached (bounded, least
recently used out first). The bridge process is the only writer of these tables; a write made
in a caller's transaction (``conn=``) is followed by ``forget(room_id)`` once committed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mautrix.util.async_db import Connection, Database

from bridge.db.cache import ReadThroughCache
from bridge.db.clock import now_ms
from bridge.db.group_commit import Write

CACHE_SIZE = 20_000
"""Rooms whose portal and links stay in memory (a few hundred bytes each)."""

_ADD_PARTICIPANT = (
    "INSERT INTO portal_participant (room_id, connector, user_id) VALUES ($1, $2, $3) "
    "ON CONFLICT (room_id, connector, user_id) DO NOTHING"
)
_REMOVE_PARTICIPANT = (
    "DELETE FROM portal_participant WHERE room_id = $1 AND connector = $2 AND user_id = $3"
)


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
    closed: bool = False
    """Nobody of that vendor is left in the portal: nothing new is routed there (what was
    queued before is still delivered) and its conversation's events are no longer bridged."""


class PortalStore:
    def __init__(self, db: Database, cache_size: int = CACHE_SIZE) -> None:
        self.db = db
        self._portals: ReadThroughCache[str, Portal | None] = ReadThroughCache(cache_size)
        self._links: ReadThroughCache[str, tuple[PortalLink, ...]] = ReadThroughCache(cache_size)
        self._rooms: ReadThroughCache[tuple[str, str], str | None] = ReadThroughCache(cache_size)

    def forget(self, room_id: str) -> None:
        """Drop what is cached about this room (after a write in a caller's transaction)."""
        self._portals.forget(room_id)
        self._links.forget(room_id)

    async def get(self, room_id: str) -> Portal | None:
        return await self._portals.get(room_id, lambda: self._load(room_id))

    async def _load(self, room_id: str) -> Portal | None:
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
        self._portals.forget(portal.room_id)

    async def links(self, room_id: str) -> list[PortalLink]:
        return list(await self._links.get(room_id, lambda: self._load_links(room_id)))

    async def _load_links(self, room_id: str) -> tuple[PortalLink, ...]:
        rows = await self.db.fetch(
            "SELECT room_id, connector, conversation_id, closed_at FROM portal_link "
            "WHERE room_id = $1 ORDER BY connector",
            room_id,
        )
        return tuple(
            PortalLink(
                r["room_id"], r["connector"], r["conversation_id"], r["closed_at"] is not None
            )
            for r in rows
        )

    async def open_links(self, room_id: str) -> list[PortalLink]:
        """The links new events are routed to (closed ones left out)."""
        return [link for link in await self.links(room_id) if not link.closed]

    async def link(self, room_id: str, connector: str) -> PortalLink | None:
        for link in await self.links(room_id):
            if link.connector == connector:
                return link
        return None

    async def by_conversation(self, connector: str, conversation_id: str) -> str | None:
        """The room bridged to this vendor conversation, if any."""

        async def load() -> str | None:
            return await self.db.fetchval(
                "SELECT room_id FROM portal_link WHERE connector = $1 AND conversation_id = $2 "
                "AND closed_at IS NULL",
                connector,
                conversation_id,
            )

        # Only found rooms are kept: a conversation, once bridged, stays bridged to its room.
        return await self._rooms.get(
            (connector, conversation_id), load, keep=lambda room: room is not None
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
        self._links.forget(room_id)

    async def set_conversation(self, room_id: str, connector: str, conversation_id: str) -> None:
        await self.db.execute(
            "UPDATE portal_link SET conversation_id = $3 WHERE room_id = $1 AND connector = $2",
            room_id,
            connector,
            conversation_id,
        )
        self._links.forget(room_id)

    async def set_title(self, room_id: str, title: str | None) -> None:
        """The conversation's current title (what a vendor linked later is given)."""
        await self.db.execute("UPDATE portal SET title = $2 WHERE room_id = $1", room_id, title)
        self._portals.forget(room_id)

    async def close_link(
        self, room_id: str, connector: str, *, conn: Connection | None = None
    ) -> None:
        """Nobody of ``connector`` is left in the portal (see ``PortalLink.closed``)."""
        await (conn or self.db).execute(
            "UPDATE portal_link SET closed_at = $3 WHERE room_id = $1 AND connector = $2 "
            "AND closed_at IS NULL",
            room_id,
            connector,
            now_ms(),
        )
        self._links.forget(room_id)
        self._rooms.clear()

    async def reopen_link(
        self, room_id: str, connector: str, *, conn: Connection | None = None
    ) -> None:
        """Someone of ``connector`` is in the portal again: its link carries events again."""
        await (conn or self.db).execute(
            "UPDATE portal_link SET closed_at = NULL WHERE room_id = $1 AND connector = $2",
            room_id,
            connector,
        )
        self._links.forget(room_id)

    # Who each vendor side has ---------------------------------------------------------------

    @staticmethod
    def add_participant_write(room_id: str, connector: str, user_id: str) -> Write:
        """``add_participants`` of one person, as a write for a group commit."""
        return Write(_ADD_PARTICIPANT, (room_id, connector, user_id))

    @staticmethod
    def remove_participant_write(room_id: str, connector: str, user_id: str) -> Write:
        """``remove_participants`` of one person, as a write for a group commit."""
        return Write(_REMOVE_PARTICIPANT, (room_id, connector, user_id))

    async def participants(self, room_id: str, connector: str) -> set[str]:
        """The people (Matrix ids) the ``connector`` side of the portal was told are in it."""
        rows = await self.db.fetch(
            "SELECT user_id FROM portal_participant WHERE room_id = $1 AND connector = $2",
            room_id,
            connector,
        )
        return {r["user_id"] for r in rows}

    async def direct_with(self, connector: str, first: str, second: str) -> list[str]:
        """Direct portals whose ``connector`` side (still open) has both people, newest first
        (at most 5): a direct chat they already have."""
        rows = await self.db.fetch(
            "SELECT p.room_id FROM portal p "
            "JOIN portal_link l ON l.room_id = p.room_id AND l.connector = $1 "
            "JOIN portal_participant a ON a.room_id = p.room_id AND a.connector = $1 "
            "JOIN portal_participant b ON b.room_id = p.room_id AND b.connector = $1 "
            "WHERE p.is_direct AND l.closed_at IS NULL AND a.user_id = $2 AND b.user_id = $3 "
            "ORDER BY p.created_at DESC LIMIT 5",
            connector,
            first,
            second,
        )
        return [r["room_id"] for r in rows]

    async def add_participants(
        self,
        room_id: str,
        connector: str,
        user_ids: Iterable[str],
        *,
        conn: Connection | None = None,
    ) -> None:
        for user_id in dict.fromkeys(user_ids):
            await (conn or self.db).execute(
                "INSERT INTO portal_participant (room_id, connector, user_id) VALUES ($1, $2, $3) "
                "ON CONFLICT (room_id, connector, user_id) DO NOTHING",
                room_id,
                connector,
                user_id,
            )

    async def remove_participants(
        self,
        room_id: str,
        connector: str,
        user_ids: Iterable[str],
        *,
        conn: Connection | None = None,
    ) -> None:
        for user_id in dict.fromkeys(user_ids):
            await (conn or self.db).execute(
                "DELETE FROM portal_participant WHERE room_id = $1 AND connector = $2 "
                "AND user_id = $3",
                room_id,
                connector,
                user_id,
            )

    async def forget_person(self, user_id: str) -> None:
        """Every vendor side's record of this person (an erasure)."""
        await self.db.execute("DELETE FROM portal_participant WHERE user_id = $1", user_id)

    async def count(self) -> int:
        return int(await self.db.fetchval("SELECT COUNT(*) FROM portal"))
