"""What end-to-bridge encryption keeps: the bridge's devices, Olm and Megolm sessions, other
users' device keys, and which rooms are encrypted.

Pickles arrive here already encrypted (vodozemac pickles them under the crypto pickle key);
the only value sealed here is that key itself, under the operator's secrets key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mautrix.util.async_db import Database

from bridge.db.clock import now_ms


@dataclass(frozen=True)
class DeviceRow:
    user_id: str
    device_id: str
    account: str
    cross_signing: str | None
    published: bool


@dataclass(frozen=True)
class InboundRow:
    room_id: str
    session_id: str
    sender: str
    sender_key: str
    signing_key: str | None
    pickle: str
    forwarded: bool
    own_key: str | None = None
    """Sealed original session key of a session the bridge made (None for others')."""


@dataclass(frozen=True)
class OutboundRow:
    room_id: str
    user_id: str
    session_id: str
    pickle: str
    created_at: int
    messages: int


@dataclass(frozen=True)
class RoomEncryption:
    algorithm: str
    rotation_ms: int
    rotation_msgs: int


class CryptoStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # Meta --------------------------------------------------------------------------------------

    async def meta(self, name: str) -> str | None:
        value = await self.db.fetchval("SELECT value FROM crypto_meta WHERE name = $1", name)
        return str(value) if value is not None else None

    async def put_meta_once(self, name: str, value: str) -> str:
        """Store ``value`` unless one is there; returns the stored one (two processes agree)."""
        await self.db.execute(
            "INSERT INTO crypto_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            name,
            value,
        )
        return str(await self.meta(name))

    async def set_meta(self, name: str, value: str) -> None:
        await self.db.execute(
            "INSERT INTO crypto_meta (name, value) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            name,
            value,
        )

    # Own devices -------------------------------------------------------------------------------

    async def device(self, user_id: str) -> DeviceRow | None:
        row = await self.db.fetchrow(
            "SELECT user_id, device_id, account, cross_signing, published FROM crypto_device "
            "WHERE user_id = $1",
            user_id,
        )
        if row is None:
            return None
        return DeviceRow(
            row["user_id"],
            row["device_id"],
            row["account"],
            row["cross_signing"],
            bool(row["published"]),
        )

    async def add_device(self, row: DeviceRow) -> DeviceRow:
        """Insert unless the user has one already; returns the one stored."""
        await self.db.execute(
            "INSERT INTO crypto_device (user_id, device_id, account, cross_signing, published, "
            "created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (user_id) DO NOTHING",
            row.user_id,
            row.device_id,
            row.account,
            row.cross_signing,
            row.published,
            now_ms(),
        )
        stored = await self.device(row.user_id)
        assert stored is not None
        return stored

    async def save_account(self, user_id: str, account: str, *, published: bool) -> None:
        await self.db.execute(
            "UPDATE crypto_device SET account = $2, published = $3 WHERE user_id = $1",
            user_id,
            account,
            published,
        )

    async def save_cross_signing(self, user_id: str, sealed: str) -> None:
        await self.db.execute(
            "UPDATE crypto_device SET cross_signing = $2 WHERE user_id = $1", user_id, sealed
        )

    async def forget_user(self, user_id: str) -> None:
        """Erase one of the bridge's users' crypto material: its device's account, its Olm and
        outbound sessions, and its own sessions' copies (the right to erasure)."""
        async with self.db.acquire() as conn, conn.transaction():
            for table in ("crypto_device", "crypto_olm_session", "crypto_outbound_group"):
                await conn.execute(f"DELETE FROM {table} WHERE user_id = $1", user_id)
            await conn.execute(
                "DELETE FROM crypto_inbound_group WHERE sender = $1 AND own_key IS NOT NULL",
                user_id,
            )

    async def sync_since(self, user_id: str) -> str | None:
        value = await self.db.fetchval(
            "SELECT sync_since FROM crypto_device WHERE user_id = $1", user_id
        )
        return str(value) if value is not None else None

    async def set_sync_since(self, user_id: str, since: str) -> None:
        await self.db.execute(
            "UPDATE crypto_device SET sync_since = $2 WHERE user_id = $1", user_id, since
        )

    async def own_device_ids(self, user_ids: Iterable[str]) -> dict[str, str]:
        wanted = list(dict.fromkeys(user_ids))
        found: dict[str, str] = {}
        for start in range(0, len(wanted), 200):
            chunk = wanted[start : start + 200]
            marks = ", ".join(f"${i + 1}" for i in range(len(chunk)))
            rows = await self.db.fetch(
                f"SELECT user_id, device_id FROM crypto_device WHERE user_id IN ({marks})", *chunk
            )
            found.update((row["user_id"], row["device_id"]) for row in rows)
        return found

    # Olm sessions ------------------------------------------------------------------------------

    async def olm_sessions(self, user_id: str, their_key: str) -> list[tuple[str, str]]:
        """(session id, pickle) of our device's sessions with a peer key, most recent first."""
        rows = await self.db.fetch(
            "SELECT session_id, pickle FROM crypto_olm_session WHERE user_id = $1 AND "
            "their_key = $2 ORDER BY last_used DESC",
            user_id,
            their_key,
        )
        return [(row["session_id"], row["pickle"]) for row in rows]

    async def save_olm_session(
        self, user_id: str, their_key: str, session_id: str, pickle: str
    ) -> None:
        await self.db.execute(
            "INSERT INTO crypto_olm_session (user_id, their_key, session_id, pickle, last_used) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, session_id) DO UPDATE SET "
            "pickle = excluded.pickle, last_used = excluded.last_used",
            user_id,
            their_key,
            session_id,
            pickle,
            now_ms(),
        )

    # Megolm, inbound ---------------------------------------------------------------------------

    async def inbound(self, room_id: str, session_id: str) -> InboundRow | None:
        row = await self.db.fetchrow(
            "SELECT room_id, session_id, sender, sender_key, signing_key, pickle, forwarded, "
            "own_key FROM crypto_inbound_group WHERE room_id = $1 AND session_id = $2",
            room_id,
            session_id,
        )
        if row is None:
            return None
        return InboundRow(
            row["room_id"],
            row["session_id"],
            row["sender"],
            row["sender_key"],
            row["signing_key"],
            row["pickle"],
            bool(row["forwarded"]),
            row["own_key"],
        )

    async def add_inbound(self, row: InboundRow, *, replace_forwarded: bool = False) -> bool:
        """Keep a session; one already held wins, except a forwarded copy over which a direct
        one (``replace_forwarded``) is preferred. True when stored."""
        held = await self.inbound(row.room_id, row.session_id)
        if held is not None and not (replace_forwarded and held.forwarded and not row.forwarded):
            return False
        await self.db.execute(
            "INSERT INTO crypto_inbound_group (room_id, session_id, sender, sender_key, "
            "signing_key, pickle, forwarded, received_at, own_key) VALUES ($1, $2, $3, $4, $5, "
            "$6, $7, $8, $9) ON CONFLICT (room_id, session_id) DO UPDATE SET "
            "sender = excluded.sender, sender_key = excluded.sender_key, "
            "signing_key = excluded.signing_key, pickle = excluded.pickle, "
            "forwarded = excluded.forwarded, own_key = excluded.own_key",
            row.room_id,
            row.session_id,
            row.sender,
            row.sender_key,
            row.signing_key,
            row.pickle,
            row.forwarded,
            now_ms(),
            row.own_key,
        )
        return True

    async def first_event_at(self, session_id: str, message_index: int, event_id: str) -> str:
        """The event id that message ``message_index`` of the session first decrypted as
        (``event_id`` when this is the first time)."""
        await self.db.execute(
            "INSERT INTO crypto_message_index (session_id, message_index, event_id, seen_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (session_id, message_index) DO NOTHING",
            session_id,
            message_index,
            event_id,
            now_ms(),
        )
        return str(
            await self.db.fetchval(
                "SELECT event_id FROM crypto_message_index WHERE session_id = $1 AND "
                "message_index = $2",
                session_id,
                message_index,
            )
        )

    async def purge_message_indexes(self, before_ms: int) -> int:
        """Forget which event a message index was, for messages decrypted before ``before_ms``
        (the audit retention: a replay that old is refused by nothing else either)."""
        rows = await self.db.fetch(
            "DELETE FROM crypto_message_index WHERE seen_at < $1 RETURNING 1", before_ms
        )
        return len(rows)

    # Megolm, outbound --------------------------------------------------------------------------

    async def outbound(self, room_id: str, user_id: str) -> OutboundRow | None:
        row = await self.db.fetchrow(
            "SELECT room_id, user_id, session_id, pickle, created_at, messages "
            "FROM crypto_outbound_group WHERE room_id = $1 AND user_id = $2",
            room_id,
            user_id,
        )
        if row is None:
            return None
        return OutboundRow(
            row["room_id"],
            row["user_id"],
            row["session_id"],
            row["pickle"],
            int(row["created_at"]),
            int(row["messages"]),
        )

    async def save_outbound(self, row: OutboundRow) -> None:
        await self.db.execute(
            "INSERT INTO crypto_outbound_group (room_id, user_id, session_id, pickle, created_at, "
            "messages) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (room_id, user_id) DO UPDATE "
            "SET session_id = excluded.session_id, pickle = excluded.pickle, "
            "created_at = excluded.created_at, messages = excluded.messages",
            row.room_id,
            row.user_id,
            row.session_id,
            row.pickle,
            row.created_at,
            row.messages,
        )

    async def discard_outbound(self, room_id: str) -> None:
        """Every ghost's session in the room is replaced at its next message (a member left)."""
        await self.db.execute("DELETE FROM crypto_outbound_group WHERE room_id = $1", room_id)

    async def shared_with(self, session_id: str) -> set[tuple[str, str]]:
        rows = await self.db.fetch(
            "SELECT user_id, device_id FROM crypto_shared WHERE session_id = $1", session_id
        )
        return {(row["user_id"], row["device_id"]) for row in rows}

    async def mark_shared(
        self, session_id: str, devices: Iterable[tuple[str, str]], sealed_key: str
    ) -> None:
        """``devices`` were given the session; ``sealed_key`` is the key they got (as of the
        message index it was at then). A device given it before keeps its first key."""
        now = now_ms()
        rows = [(session_id, user, device, sealed_key, now) for user, device in devices]
        if rows:
            await self.db.executemany(
                "INSERT INTO crypto_shared (session_id, user_id, device_id, session_key, "
                "shared_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                rows,
            )

    async def key_given_to(self, session_id: str, user_id: str) -> str | None:
        """The (sealed) key of the session a user's devices were first given: what the user
        is entitled to read of it."""
        value = await self.db.fetchval(
            "SELECT session_key FROM crypto_shared WHERE session_id = $1 AND user_id = $2 "
            "ORDER BY shared_at, device_id LIMIT 1",
            session_id,
            user_id,
        )
        return str(value) if value is not None else None

    async def own_sessions_shared_with(
        self, user_id: str, limit: int = 200
    ) -> list[tuple[str, str, str, str]]:
        """(room, session, ghost, sealed key given to the user) of the bridge's own sessions
        that ``user_id`` was given, the latest first: what a new device of theirs may read."""
        rows = await self.db.fetch(
            "SELECT g.room_id, g.session_id, g.sender FROM crypto_inbound_group g "
            "WHERE g.own_key IS NOT NULL AND EXISTS (SELECT 1 FROM crypto_shared s WHERE "
            "s.session_id = g.session_id AND s.user_id = $1) ORDER BY g.received_at DESC LIMIT $2",
            user_id,
            limit,
        )
        found = []
        for row in rows:
            key = await self.key_given_to(row["session_id"], user_id)
            if key is not None:
                found.append((row["room_id"], row["session_id"], row["sender"], key))
        return found

    # Peers' devices ----------------------------------------------------------------------------

    async def outdated(self, user_ids: Iterable[str]) -> list[str]:
        """Of ``user_ids``: those never queried, or whose devices changed since."""
        wanted = list(dict.fromkeys(user_ids))
        fresh: set[str] = set()
        for start in range(0, len(wanted), 200):
            chunk = wanted[start : start + 200]
            marks = ", ".join(f"${i + 1}" for i in range(len(chunk)))
            rows = await self.db.fetch(
                f"SELECT user_id FROM crypto_tracked_user WHERE NOT outdated AND user_id IN "
                f"({marks})",
                *chunk,
            )
            fresh.update(row["user_id"] for row in rows)
        return [user for user in wanted if user not in fresh]

    async def tracked(self, user_ids: Iterable[str]) -> list[str]:
        """Of ``user_ids``: those whose devices the bridge follows (queried once)."""
        wanted = list(dict.fromkeys(user_ids))
        found: set[str] = set()
        for start in range(0, len(wanted), 200):
            chunk = wanted[start : start + 200]
            marks = ", ".join(f"${i + 1}" for i in range(len(chunk)))
            rows = await self.db.fetch(
                f"SELECT user_id FROM crypto_tracked_user WHERE user_id IN ({marks})", *chunk
            )
            found.update(row["user_id"] for row in rows)
        return [user for user in wanted if user in found]

    async def mark_outdated(self, user_ids: Iterable[str]) -> None:
        rows = [(user,) for user in dict.fromkeys(user_ids)]
        if rows:
            await self.db.executemany(
                "UPDATE crypto_tracked_user SET outdated = true WHERE user_id = $1", rows
            )

    async def replace_devices(self, user_id: str, devices: dict[str, tuple[str, str]]) -> None:
        """A user's devices as /keys/query answered: device id -> (curve25519, ed25519)."""
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM crypto_peer_device WHERE user_id = $1", user_id)
            if devices:
                await conn.executemany(
                    "INSERT INTO crypto_peer_device (user_id, device_id, curve25519, ed25519) "
                    "VALUES ($1, $2, $3, $4)",
                    [(user_id, device, c, e) for device, (c, e) in devices.items()],
                )
            await conn.execute(
                "INSERT INTO crypto_tracked_user (user_id, outdated) VALUES ($1, false) "
                "ON CONFLICT (user_id) DO UPDATE SET outdated = false",
                user_id,
            )

    async def devices_of(self, user_ids: Iterable[str]) -> dict[tuple[str, str], tuple[str, str]]:
        """(user, device) -> (curve25519, ed25519) of every known device of ``user_ids``."""
        wanted = list(dict.fromkeys(user_ids))
        found: dict[tuple[str, str], tuple[str, str]] = {}
        for start in range(0, len(wanted), 200):
            chunk = wanted[start : start + 200]
            marks = ", ".join(f"${i + 1}" for i in range(len(chunk)))
            rows = await self.db.fetch(
                "SELECT user_id, device_id, curve25519, ed25519 FROM crypto_peer_device "
                f"WHERE user_id IN ({marks})",
                *chunk,
            )
            found.update(
                ((row["user_id"], row["device_id"]), (row["curve25519"], row["ed25519"]))
                for row in rows
            )
        return found

    async def device_by_key(self, curve25519: str) -> tuple[str, str, str] | None:
        """(user, device, ed25519) of the peer device with this identity key."""
        row = await self.db.fetchrow(
            "SELECT user_id, device_id, ed25519 FROM crypto_peer_device WHERE curve25519 = $1",
            curve25519,
        )
        return (row["user_id"], row["device_id"], row["ed25519"]) if row is not None else None

    # Rooms -------------------------------------------------------------------------------------

    async def room(self, room_id: str) -> RoomEncryption | None:
        row = await self.db.fetchrow(
            "SELECT algorithm, rotation_ms, rotation_msgs FROM crypto_room WHERE room_id = $1",
            room_id,
        )
        if row is None:
            return None
        return RoomEncryption(row["algorithm"], int(row["rotation_ms"]), int(row["rotation_msgs"]))

    async def set_room(self, room_id: str, encryption: RoomEncryption) -> None:
        await self.db.execute(
            "INSERT INTO crypto_room (room_id, algorithm, rotation_ms, rotation_msgs) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (room_id) DO UPDATE SET "
            "rotation_ms = excluded.rotation_ms, rotation_msgs = excluded.rotation_msgs",
            room_id,
            encryption.algorithm,
            encryption.rotation_ms,
            encryption.rotation_msgs,
        )
