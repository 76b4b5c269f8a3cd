"""Ghosts: the Matrix users that stand for vendor users, one per (connector, IDNPS)."""

from __future__ import annotations

from dataclasses import dataclass

from mautrix.util.async_db import Database


@dataclass(frozen=True)
class GhostRow:
    mxid: str
    connector: str
    idnps: str
    display_name: str | None


class GhostStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, mxid: str) -> GhostRow | None:
        row = await self.db.fetchrow(
            "SELECT mxid, connector, idnps, display_name FROM ghost WHERE mxid = $1", mxid
        )
        return GhostRow(**dict(row)) if row else None

    async def upsert(self, mxid: str, connector: str, idnps: str, display_name: str) -> None:
        await self.db.execute(
            "INSERT INTO ghost (mxid, connector, idnps, display_name) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (mxid) DO UPDATE SET display_name = excluded.display_name",
            mxid,
            connector,
            idnps,
            display_name,
        )
