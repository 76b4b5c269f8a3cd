"""Small persistent key/value state per connector (poll cursors and the like)."""

from __future__ import annotations

from mautrix.util.async_db import Database

BRIDGE_STATE = "eimis.bridge"
"""The bridge's own keys live under this name, which no connector id can take."""


class ConnectorStateStore:
    """The ``KeyValueStore`` a connector receives, bound to its connector id."""

    def __init__(self, db: Database, connector: str) -> None:
        self.db = db
        self.connector = connector

    async def get(self, key: str) -> str | None:
        return await self.db.fetchval(
            "SELECT value FROM connector_state WHERE connector = $1 AND key = $2",
            self.connector,
            key,
        )

    async def set(self, key: str, value: str) -> None:
        await self.db.execute(
            "INSERT INTO connector_state (connector, key, value) VALUES ($1, $2, $3) "
            "ON CONFLICT (connector, key) DO UPDATE SET value = excluded.value",
            self.connector,
            key,
            value,
        )
