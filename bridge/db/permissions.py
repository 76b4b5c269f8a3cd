"""Per-person permissions of vendor users (``permission``, ``permission_exception``).

A professional without a ``permission`` row is allow-all with no exceptions; the logic is in
``bridge/values/permissions.py``.
"""

from __future__ import annotations

from mautrix.util.async_db import Database

from bridge.db.clock import now_ms
from bridge.values.permissions import ALLOW_ALL, DEFAULT_SETTINGS, Permission, Setting

EXCEPTION_KINDS = ("server", "user")


class PermissionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, idnps: str) -> Permission | None:
        """The stored setting of this professional, or None (which means allow-all)."""
        row = await self.db.fetchrow(
            "SELECT default_setting FROM permission WHERE idnps = $1", idnps
        )
        if row is None:
            return None
        exceptions = await self.db.fetch(
            "SELECT kind, value FROM permission_exception WHERE idnps = $1", idnps
        )
        return Permission(
            idnps,
            row["default_setting"],
            frozenset(e["value"] for e in exceptions if e["kind"] == "server"),
            frozenset(e["value"] for e in exceptions if e["kind"] == "user"),
        )

    async def effective(self, idnps: str) -> Permission:
        return await self.get(idnps) or Permission(idnps)

    async def set_default(self, idnps: str, setting: Setting, *, keep_exceptions: bool) -> None:
        """Set the default; exceptions are dropped unless kept (their meaning flips with it)."""
        if setting not in DEFAULT_SETTINGS:
            raise ValueError(f"the default is one of {', '.join(DEFAULT_SETTINGS)}")
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO permission (idnps, default_setting, updated_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (idnps) DO UPDATE SET default_setting = excluded.default_setting, "
                "updated_at = excluded.updated_at",
                idnps,
                setting,
                now_ms(),
            )
            if not keep_exceptions:
                await conn.execute("DELETE FROM permission_exception WHERE idnps = $1", idnps)

    async def add_exception(self, idnps: str, kind: str, value: str) -> None:
        """Add an exception (the row is created allow-all when the person has none)."""
        if kind not in EXCEPTION_KINDS:
            raise ValueError(f"an exception is by {' or '.join(EXCEPTION_KINDS)}")
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO permission (idnps, default_setting, updated_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (idnps) DO UPDATE SET updated_at = excluded.updated_at",
                idnps,
                ALLOW_ALL,
                now_ms(),
            )
            await conn.execute(
                "INSERT INTO permission_exception (idnps, kind, value) VALUES ($1, $2, $3) "
                "ON CONFLICT (idnps, kind, value) DO NOTHING",
                idnps,
                kind,
                value,
            )

    async def remove_exception(self, idnps: str, kind: str, value: str) -> bool:
        rows = await self.db.fetch(
            "DELETE FROM permission_exception WHERE idnps = $1 AND kind = $2 AND value = $3 "
            "RETURNING value",
            idnps,
            kind,
            value,
        )
        if rows:
            await self.db.execute(
                "UPDATE permission SET updated_at = $2 WHERE idnps = $1", idnps, now_ms()
            )
        return bool(rows)

    async def clear(self, idnps: str) -> bool:
        """Forget this professional's setting (back to allow-all); False if there was none."""
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM permission_exception WHERE idnps = $1", idnps)
            rows = await conn.fetch(
                "DELETE FROM permission WHERE idnps = $1 RETURNING idnps", idnps
            )
        return bool(rows)
