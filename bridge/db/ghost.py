"""Ghosts: the Matrix users that stand for vendor users, one per (connector, IDNPS)."""

from __future__ import annotations

from dataclasses import dataclass

from mautrix.util.async_db import Database

from bridge.db.cache import ReadThroughCache

CACHE_SIZE = 20_000


@dataclass(frozen=True)
class GhostRow:
    mxid: str
    connector: str
    idnps: str
    display_name: str | None


class GhostStore:
    """Ghost rows are cached (bounded): every message of a vendor user looks its ghost up. The
    bridge process is their only writer."""

    def __init__(self, db: Database, cache_size: int = CACHE_SIZE) -> None:
        self.db = db
        self._cache: ReadThroughCache[str, GhostRow | None] = ReadThroughCache(cache_size)

    async def get(self, mxid: str) -> GhostRow | None:
        async def load() -> GhostRow | None:
            row = await self.db.fetchrow(
                "SELECT mxid, connector, idnps, display_name FROM ghost WHERE mxid = $1", mxid
            )
            return GhostRow(**dict(row)) if row else None

        return await self._cache.get(mxid, load)

    async def of_professional(self, idnps: str) -> list[GhostRow]:
        """Every ghost of this professional (one per connector), by connector."""
        rows = await self.db.fetch(
            "SELECT mxid, connector, idnps, display_name FROM ghost WHERE idnps = $1 "
            "ORDER BY connector",
            idnps,
        )
        return [GhostRow(**dict(row)) for row in rows]

    def forget(self, mxid: str) -> None:
        """The row was changed behind the cache (an erasure): read it again next time."""
        self._cache.forget(mxid)

    async def upsert(self, mxid: str, connector: str, idnps: str, display_name: str) -> None:
        await self.db.execute(
            "INSERT INTO ghost (mxid, connector, idnps, display_name) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (mxid) DO UPDATE SET display_name = excluded.display_name, "
            "former_at = NULL",
            mxid,
            connector,
            idnps,
            display_name,
        )
        self._cache.forget(mxid)

    async def upsert_many(self, rows: list[tuple[str, str, str, str]]) -> None:
        """Several ghosts (mxid, connector, IDNPS, display name) in one transaction."""
        if not rows:
            return
        async with self.db.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO ghost (mxid, connector, idnps, display_name) "
                "VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (mxid) DO UPDATE SET display_name = excluded.display_name, "
                "former_at = NULL",
                rows,
            )
        for row in rows:
            self._cache.forget(row[0])

    async def mark_former(self, mxid: str, display_name: str, at: int) -> None:
        """The ghost no longer reaches its person: its "former account" name, kept until it is
        chosen again (an upsert clears the mark)."""
        await self.db.execute(
            "UPDATE ghost SET display_name = $2, former_at = $3 WHERE mxid = $1",
            mxid,
            display_name,
            at,
        )
        self._cache.forget(mxid)
