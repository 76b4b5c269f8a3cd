"""The run-time part of the trust list (``trusted_server``): servers added by operators.

The config's ``trust.servers`` and the bridge's own server are always trusted besides these;
the running bridge polls this table (``bridge/core/trust.py`` ``TrustWatcher``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mautrix.util.async_db import Database

from bridge.db.clock import now_ms


@dataclass(frozen=True)
class TrustedServer:
    server_name: str
    added_at: int
    added_by: str


class TrustStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def list(self) -> list[TrustedServer]:
        rows = await self.db.fetch(
            "SELECT server_name, added_at, added_by FROM trusted_server ORDER BY server_name"
        )
        return [TrustedServer(**dict(r)) for r in rows]

    async def names(self) -> list[str]:
        return [r.server_name for r in await self.list()]

    async def add(self, server_name: str, added_by: str) -> bool:
        """Add a (validated) server name; False when it was already there."""
        rows = await self.db.fetch(
            "INSERT INTO trusted_server (server_name, added_at, added_by) VALUES ($1, $2, $3) "
            "ON CONFLICT (server_name) DO NOTHING RETURNING server_name",
            server_name,
            now_ms(),
            added_by,
        )
        return bool(rows)

    async def remove(self, server_name: str) -> bool:
        """Remove a server name; False when it was not there."""
        rows = await self.db.fetch(
            "DELETE FROM trusted_server WHERE server_name = $1 RETURNING server_name", server_name
        )
        return bool(rows)

    async def portal_voices_page(self, after: str, limit: int) -> list[tuple[str, str]]:
        """(room, voice) of the portals after room ``after``, in room order: a page at a time,
        so a pass over 100,000 portals never holds them all."""
        rows = await self.db.fetch(
            "SELECT room_id, voice FROM portal WHERE room_id > $1 ORDER BY room_id LIMIT $2",
            after,
            limit,
        )
        return [(r["room_id"], r["voice"]) for r in rows]

    async def portal_voices(self) -> list[tuple[str, str]]:
        """(room, voice) of every portal: the rooms whose ACL follows the trust list."""
        rows = await self.db.fetch("SELECT room_id, voice FROM portal ORDER BY created_at")
        return [(r["room_id"], r["voice"]) for r in rows]
