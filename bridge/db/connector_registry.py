"""Connector instances registered at run time (``connector_instance``) and the secrets each
shares with its vendor (``connector_secret``), sealed at rest.

A registered instance's ``settings`` are stored as JSON in which every field its type's
``Settings`` model declares ``SecretStr`` is sealed (``bridge/secrets.py``) for that connector
and field; a row whose settings are JSON ``null`` only overrides the enabled flag of a connector
of the config file (its settings stay in the config). Shared secrets: the current one has
``valid_until`` NULL; after a rotation the previous one stays accepted until its
``valid_until`` (the grace period), then is purged. Every write moves a stamp
(``updated_at``/``created_at``, strictly increasing), so ``fingerprint()`` tells a running
bridge that another process changed something.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from mautrix.util.async_db import Connection, Database
from pydantic import BaseModel, SecretBytes, SecretStr

from bridge.config import SecretsConfig
from bridge.db.clock import SYSTEM_CLOCK, Clock, now_ms
from bridge.secrets import NotSealed, SecretBox, is_sealed, sealed_key_id


class RegistryError(Exception):
    """A registry operation was refused; the message says why."""


class DuplicateConnector(RegistryError):
    """A connector with this id is already registered."""


class UnsupportedSettings(RegistryError):
    """A connector type's settings hold secrets where they cannot be sealed (lists, bytes)."""


@dataclass(frozen=True)
class ConnectorRecord:
    """One ``connector_instance`` row, settings still sealed."""

    connector_id: str
    type_name: str
    enabled: bool
    sealed_settings: str = field(repr=False)
    created_at: int
    updated_at: int

    @property
    def overrides_config(self) -> bool:
        """Only the enabled flag of a config connector (its settings are in the config)."""
        return self.sealed_settings == "null"


@dataclass(frozen=True)
class StoredSecret:
    """A shared secret, opened. ``valid_until`` None: the current one."""

    value: str = field(repr=False)
    created_at: int
    valid_until: int | None

    def accepted_at(self, now: int) -> bool:
        return self.valid_until is None or self.valid_until > now


@dataclass(frozen=True)
class SecretStatus:
    """When the current secret was set, and until when a previous one is still accepted."""

    rotated_at: int | None
    grace_until: int | None


@dataclass(frozen=True)
class ResealReport:
    resealed: int
    already_current: int


def secret_paths(model: type[BaseModel]) -> list[tuple[str, ...]]:
    """Where a settings model holds ``SecretStr`` fields: top level or in nested models.

    A secret the registry could not seal (in a list or a mapping, or ``SecretBytes``) is refused
    rather than stored masked."""
    paths: list[tuple[str, ...]] = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        paths += _paths_in(info.annotation, (key,), model.__name__)
    return paths


def _paths_in(annotation: Any, path: tuple[str, ...], owner: str) -> list[tuple[str, ...]]:
    if annotation is SecretStr:
        return [path]
    if annotation is SecretBytes:
        raise UnsupportedSettings(f"{owner}.{'.'.join(path)}: SecretBytes cannot be sealed")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(*path, *sub) for sub in secret_paths(annotation)]
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if not args:
        return []
    if origin is typing.Union or origin is types.UnionType:
        found: list[tuple[str, ...]] = []
        for arg in args:
            found += _paths_in(arg, path, owner)
        return sorted(set(found))
    if origin is typing.Annotated:
        return _paths_in(args[0], path, owner)
    for arg in args:
        if _paths_in(arg, path, owner):
            raise UnsupportedSettings(
                f"{owner}.{'.'.join(path)}: secrets inside a list or mapping cannot be sealed"
            )
    return []


def _settings_context(connector_id: str, path: tuple[str, ...]) -> str:
    return f"connector_instance/{connector_id}/settings/{'.'.join(path)}"


def _secret_context(connector_id: str, created_at: int) -> str:
    return f"connector_secret/{connector_id}/{created_at}"


def _get_path(data: Any, path: tuple[str, ...]) -> tuple[dict[str, Any], str] | None:
    """The mapping holding the last key of ``path`` (and that key), when all of it is there."""
    for key in path[:-1]:
        if not isinstance(data, dict) or not isinstance(data.get(key), dict):
            return None
        data = data[key]
    if not isinstance(data, dict) or path[-1] not in data or data[path[-1]] is None:
        return None
    return data, path[-1]


class ConnectorRegistry:
    def __init__(
        self, db: Database, secrets: SecretsConfig | SecretBox, *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        """``secrets``: the box itself, or the config to load it from when first needed (a
        bridge with no registered secret runs without a key). ``clock`` dates grace periods."""
        self.db = db
        self._secrets = secrets
        self.clock = clock

    @property
    def box(self) -> SecretBox:
        """The key ring; KeyUnavailable when none is configured."""
        if not isinstance(self._secrets, SecretBox):
            self._secrets = SecretBox.from_config(self._secrets)
        return self._secrets

    # Instances ---------------------------------------------------------------------------------

    async def list(self) -> list[ConnectorRecord]:
        rows = await self.db.fetch(
            "SELECT connector_id, type, enabled, settings, created_at, updated_at "
            "FROM connector_instance ORDER BY created_at, connector_id"
        )
        return [_record(r) for r in rows]

    async def get(self, connector_id: str) -> ConnectorRecord | None:
        row = await self.db.fetchrow(
            "SELECT connector_id, type, enabled, settings, created_at, updated_at "
            "FROM connector_instance WHERE connector_id = $1",
            connector_id,
        )
        return _record(row) if row is not None else None

    async def add(
        self,
        connector_id: str,
        type_name: str,
        settings: BaseModel,
        *,
        secret: str | None,
        enabled: bool = True,
    ) -> ConnectorRecord:
        """Register an instance, its settings sealed, with its first shared secret (if any),
        in one transaction; DuplicateConnector when the id is taken."""
        sealed = self.seal_settings(connector_id, settings)
        async with self.db.acquire() as conn, conn.transaction():
            if await conn.fetchval(
                "SELECT COUNT(*) FROM connector_instance WHERE connector_id = $1", connector_id
            ):
                raise DuplicateConnector(f"a connector {connector_id!r} is already registered")
            stamp = await _next_stamp(conn, "connector_instance", "updated_at")
            await conn.execute(
                "INSERT INTO connector_instance "
                "(connector_id, type, enabled, settings, created_at, updated_at) "
                "VALUES ($1, $2, $3, $4, $5, $5)",
                connector_id,
                type_name,
                enabled,
                sealed,
                stamp,
            )
            if secret is not None:
                await self._insert_secret(conn, connector_id, secret)
        record = await self.get(connector_id)
        assert record is not None
        return record

    async def override(self, connector_id: str, type_name: str, enabled: bool) -> None:
        """Store the enabled flag of a config connector (the database wins over the file)."""
        async with self.db.acquire() as conn, conn.transaction():
            stamp = await _next_stamp(conn, "connector_instance", "updated_at")
            await conn.execute(
                "INSERT INTO connector_instance "
                "(connector_id, type, enabled, settings, created_at, updated_at) "
                "VALUES ($1, $2, $3, 'null', $4, $4) ON CONFLICT (connector_id) DO UPDATE "
                "SET enabled = excluded.enabled, updated_at = excluded.updated_at",
                connector_id,
                type_name,
                enabled,
                stamp,
            )

    async def set_enabled(self, connector_id: str, enabled: bool) -> bool:
        """False when no such instance is registered."""
        async with self.db.acquire() as conn, conn.transaction():
            stamp = await _next_stamp(conn, "connector_instance", "updated_at")
            rows = await conn.fetch(
                "UPDATE connector_instance SET enabled = $2, updated_at = $3 "
                "WHERE connector_id = $1 RETURNING connector_id",
                connector_id,
                enabled,
                stamp,
            )
        return bool(rows)

    async def update_settings(self, connector_id: str, settings: BaseModel) -> bool:
        """Replace a registered instance's settings (sealed again); False when unknown."""
        sealed = self.seal_settings(connector_id, settings)
        async with self.db.acquire() as conn, conn.transaction():
            stamp = await _next_stamp(conn, "connector_instance", "updated_at")
            rows = await conn.fetch(
                "UPDATE connector_instance SET settings = $2, updated_at = $3 "
                "WHERE connector_id = $1 AND settings <> 'null' RETURNING connector_id",
                connector_id,
                sealed,
                stamp,
            )
        return bool(rows)

    async def remove(self, connector_id: str) -> bool:
        """Forget an instance, its secrets and its own state (poll cursors ...): a connector
        registered again under this id starts afresh. False when it was not registered."""
        async with self.db.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "DELETE FROM connector_instance WHERE connector_id = $1 RETURNING connector_id",
                connector_id,
            )
            await conn.execute("DELETE FROM connector_secret WHERE connector_id = $1", connector_id)
            if rows:
                await conn.execute("DELETE FROM connector_state WHERE connector = $1", connector_id)
        return bool(rows)

    async def linked_portals(self, connector_id: str) -> int:
        """How many portal rooms have a conversation on this connector (``remove`` refuses
        while there are some, unless forced)."""
        count = await self.db.fetchval(
            "SELECT COUNT(*) FROM portal_link WHERE connector = $1", connector_id
        )
        return int(count or 0)

    async def fingerprint(self) -> tuple[int, ...]:
        """Changes whenever an instance or a secret is added, changed or removed."""
        row = await self.db.fetchrow(
            "SELECT (SELECT COUNT(*) FROM connector_instance) AS instances, "
            "(SELECT COALESCE(MAX(updated_at), 0) FROM connector_instance) AS updated, "
            "(SELECT COUNT(*) FROM connector_secret) AS secrets, "
            "(SELECT COALESCE(MAX(created_at), 0) FROM connector_secret) AS created"
        )
        return tuple(int(row[k]) for k in ("instances", "updated", "secrets", "created"))

    # Settings ----------------------------------------------------------------------------------

    def seal_settings(self, connector_id: str, settings: BaseModel) -> str:
        """The settings as stored: what was set, every ``SecretStr`` sealed for its place."""
        data = settings.model_dump(mode="json", exclude_unset=True, by_alias=True)
        for path in secret_paths(type(settings)):
            found = _get_path(data, path)
            if found is None:
                continue
            holder, key = found
            secret = settings
            for part in path:
                secret = _attr(secret, part)
            assert isinstance(secret, SecretStr)
            holder[key] = self.box.seal(
                secret.get_secret_value(), _settings_context(connector_id, path)
            )
        return json.dumps(data, sort_keys=True)

    def open_settings(self, record: ConnectorRecord, model: type[BaseModel]) -> BaseModel:
        """The record's settings, opened and validated by its type's model (errors: pydantic's
        ValidationError, or SecretsError when a secret does not open)."""
        data = json.loads(record.sealed_settings)
        if not isinstance(data, dict):
            raise RegistryError(f"connector {record.connector_id!r} has no settings of its own")
        for path in secret_paths(model):
            found = _get_path(data, path)
            if found is None:
                continue
            holder, key = found
            value = holder[key]
            if not is_sealed(value):
                raise NotSealed(
                    f"connector {record.connector_id!r}: settings.{'.'.join(path)} is not "
                    "sealed; register the connector again"
                )
            holder[key] = self.box.open(value, _settings_context(record.connector_id, path))
        return model.model_validate(data)

    # Shared secrets ----------------------------------------------------------------------------

    async def secrets(self, connector_id: str) -> list[StoredSecret]:
        """The secrets still accepted, the current one first; expired ones are purged."""
        now = now_ms(self.clock)
        await self.db.execute(
            "DELETE FROM connector_secret WHERE connector_id = $1 AND valid_until <= $2",
            connector_id,
            now,
        )
        rows = await self.db.fetch(
            "SELECT sealed, valid_until, created_at FROM connector_secret "
            "WHERE connector_id = $1 ORDER BY created_at DESC",
            connector_id,
        )
        found = [
            StoredSecret(
                self.box.open(r["sealed"], _secret_context(connector_id, r["created_at"])),
                r["created_at"],
                r["valid_until"],
            )
            for r in rows
        ]
        return sorted(found, key=lambda s: (s.valid_until is not None, -s.created_at))

    async def secret_status(self, connector_id: str) -> SecretStatus:
        """Without opening anything (no key needed)."""
        now = now_ms(self.clock)
        row = await self.db.fetchrow(
            "SELECT MAX(CASE WHEN valid_until IS NULL THEN created_at END) AS rotated_at, "
            "MAX(CASE WHEN valid_until > $2 THEN valid_until END) AS grace_until "
            "FROM connector_secret WHERE connector_id = $1",
            connector_id,
            now,
        )
        if row is None:
            return SecretStatus(None, None)
        return SecretStatus(row["rotated_at"], row["grace_until"])

    async def rotate_secret(self, connector_id: str, secret: str, grace_s: float) -> SecretStatus:
        """Make ``secret`` the current one; the previous stays accepted ``grace_s`` seconds
        (0: refused at once). Secrets already in a grace period keep theirs."""
        if grace_s < 0:
            raise RegistryError("the grace period cannot be negative")
        async with self.db.acquire() as conn, conn.transaction():
            now = now_ms(self.clock)
            await conn.execute(
                "DELETE FROM connector_secret WHERE connector_id = $1 AND valid_until <= $2",
                connector_id,
                now,
            )
            if grace_s > 0:
                await conn.execute(
                    "UPDATE connector_secret SET valid_until = $2 "
                    "WHERE connector_id = $1 AND valid_until IS NULL",
                    connector_id,
                    now + int(grace_s * 1000),
                )
            else:
                await conn.execute(
                    "DELETE FROM connector_secret WHERE connector_id = $1 AND valid_until IS NULL",
                    connector_id,
                )
            await self._insert_secret(conn, connector_id, secret)
        return await self.secret_status(connector_id)

    async def _insert_secret(self, conn: Connection, connector_id: str, secret: str) -> None:
        stamp = await _next_stamp(conn, "connector_secret", "created_at")
        await conn.execute(
            "INSERT INTO connector_secret (connector_id, sealed, valid_until, created_at) "
            "VALUES ($1, $2, NULL, $3)",
            connector_id,
            self.box.seal(secret, _secret_context(connector_id, stamp)),
            stamp,
        )

    # Keys --------------------------------------------------------------------------------------

    async def key_usage(self) -> dict[str, int]:
        """How many sealed values each key id holds (none opened: no key needed)."""
        usage: dict[str, int] = {}
        for sealed in await self._all_sealed():
            kid = sealed_key_id(sealed)
            usage[kid] = usage.get(kid, 0) + 1
        return usage

    async def reseal(self) -> ResealReport:
        """Seal every value again with the current key (after a key rotation), in one
        transaction: a value that does not open stops it with nothing changed."""
        box = self.box
        resealed = current = 0
        async with self.db.acquire() as conn, conn.transaction():
            for row in await conn.fetch("SELECT connector_id, settings FROM connector_instance"):
                data = json.loads(row["settings"])
                changed = False
                for path, holder, key in _sealed_leaves(data):
                    context = _settings_context(row["connector_id"], path)
                    if box.needs_resealing(holder[key]):
                        holder[key] = box.seal(box.open(holder[key], context), context)
                        changed = True
                        resealed += 1
                    else:
                        box.open(holder[key], context)  # proves it opens
                        current += 1
                if changed:
                    await conn.execute(
                        "UPDATE connector_instance SET settings = $2 WHERE connector_id = $1",
                        row["connector_id"],
                        json.dumps(data, sort_keys=True),
                    )
            for row in await conn.fetch(
                "SELECT connector_id, sealed, created_at FROM connector_secret"
            ):
                context = _secret_context(row["connector_id"], row["created_at"])
                plain = box.open(row["sealed"], context)
                if not box.needs_resealing(row["sealed"]):
                    current += 1
                    continue
                await conn.execute(
                    "UPDATE connector_secret SET sealed = $3 "
                    "WHERE connector_id = $1 AND created_at = $2",
                    row["connector_id"],
                    row["created_at"],
                    box.seal(plain, context),
                )
                resealed += 1
        return ResealReport(resealed, current)

    async def _all_sealed(self) -> list[str]:
        values = [r["sealed"] for r in await self.db.fetch("SELECT sealed FROM connector_secret")]
        for row in await self.db.fetch("SELECT settings FROM connector_instance"):
            values += [h[k] for _, h, k in _sealed_leaves(json.loads(row["settings"]))]
        return values


def _sealed_leaves(
    data: Any, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], dict[str, Any], str]]:
    """Every sealed string in stored settings, found by its form (no type needed)."""
    found: list[tuple[tuple[str, ...], dict[str, Any], str]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if is_sealed(value):
                found.append(((*path, key), data, key))
            elif isinstance(value, dict):
                found += _sealed_leaves(value, (*path, key))
    return found


def _attr(model: Any, key: str) -> Any:
    """A model's field by name or alias."""
    if isinstance(model, BaseModel):
        for name, info in type(model).model_fields.items():
            if key in (name, info.alias):
                return getattr(model, name)
    raise KeyError(key)


async def _next_stamp(conn: Connection, table: str, column: str) -> int:
    """Now, and later than anything in the table: a change is always seen by a poller."""
    latest = await conn.fetchval(f"SELECT COALESCE(MAX({column}), 0) FROM {table}")
    return max(now_ms(), int(latest or 0) + 1)


def _record(row: Any) -> ConnectorRecord:
    return ConnectorRecord(
        connector_id=row["connector_id"],
        type_name=row["type"],
        enabled=bool(row["enabled"]),
        sealed_settings=row["settings"],
        created_at=int(row["created_at"]),
        updated_at=int(row["updated_at"]),
    )


__all__ = [
    "ConnectorRecord",
    "ConnectorRegistry",
    "DuplicateConnector",
    "RegistryError",
    "ResealReport",
    "SecretStatus",
    "StoredSecret",
    "UnsupportedSettings",
    "secret_paths",
]
