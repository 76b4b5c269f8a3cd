"""Megolm: room events encrypted once for every device in the room.

Each ghost has its own outbound session per room, rotated after the room's period or message
count and whenever a member leaves; its key goes, over Olm, to every device of every member
(joined or invited) that does not hold it yet, before the first event it encrypts. The bridge
also keeps an inbound copy of each of its own sessions, so it can read what it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import vodozemac

from bridge.crypto.devices import MEGOLM, OwnDevice
from bridge.crypto.olm import OlmChannel
from bridge.crypto.peers import DeviceKeys
from bridge.crypto.pickling import PickleKey
from bridge.db.crypto import CryptoStore, InboundRow, OutboundRow, RoomEncryption


class KeysMissing(Exception):
    """The room key of an event has not arrived (yet): worth waiting for."""

    def __init__(self, room_id: str, session_id: str, sender_key: str) -> None:
        super().__init__("the room key of this event has not arrived")
        self.room_id = room_id
        self.session_id = session_id
        self.sender_key = sender_key


class Undecryptable(Exception):
    """An event that will never decrypt; the message says why (no secret in it)."""


Recipients = Callable[[], Awaitable[DeviceKeys]]


class GroupSessions:
    def __init__(self, store: CryptoStore, olm: OlmChannel, pickle_key: PickleKey) -> None:
        self.store = store
        self.olm = olm
        self.pickle_key = pickle_key
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def encrypt(
        self,
        own: OwnDevice,
        room_id: str,
        settings: RoomEncryption,
        event_type: str,
        content: dict[str, Any],
        recipients: Recipients,
    ) -> dict[str, Any]:
        """The ``m.room.encrypted`` content of an event ``own`` sends in ``room_id``."""
        lock = self._locks.setdefault((room_id, own.user_id), asyncio.Lock())
        async with lock:
            row = await self.store.outbound(room_id, own.user_id)
            session = self._usable(row, settings)
            if session is None:
                session = vodozemac.GroupSession()
                row = OutboundRow(
                    room_id,
                    own.user_id,
                    session.session_id,
                    session.pickle(self.pickle_key.raw),
                    int(time.time() * 1000),
                    0,
                )
                await self._keep_inbound_copy(own, room_id, session)
                await self.store.save_outbound(row)
            assert row is not None
            await self._share(own, room_id, session, await recipients())
            plaintext = {"type": event_type, "content": content, "room_id": room_id}
            ciphertext = session.encrypt(json.dumps(plaintext).encode()).to_base64()
            await self.store.save_outbound(
                OutboundRow(
                    room_id,
                    own.user_id,
                    session.session_id,
                    session.pickle(self.pickle_key.raw),
                    row.created_at,
                    row.messages + 1,
                )
            )
        encrypted: dict[str, Any] = {
            "algorithm": MEGOLM,
            "sender_key": own.curve25519,
            "ciphertext": ciphertext,
            "session_id": session.session_id,
            "device_id": own.device_id,
        }
        relation = content.get("m.relates_to")
        if isinstance(relation, dict):
            # In clear, as the specification asks: servers aggregate relations (edits, replies).
            encrypted["m.relates_to"] = relation
        return encrypted

    async def discard(self, room_id: str) -> None:
        """Every ghost's session in the room is replaced at its next event (a member left):
        with the room's encryptions held, so none saves its session back after the delete."""
        async with contextlib.AsyncExitStack() as held:
            for key in sorted(k for k in self._locks if k[0] == room_id):
                await held.enter_async_context(self._locks[key])
            await self.store.discard_outbound(room_id)

    def _usable(
        self, row: OutboundRow | None, settings: RoomEncryption
    ) -> vodozemac.GroupSession | None:
        if row is None:
            return None
        age_ms = int(time.time() * 1000) - row.created_at
        if age_ms >= settings.rotation_ms or row.messages >= settings.rotation_msgs:
            return None
        return vodozemac.GroupSession.from_pickle(row.pickle, self.pickle_key.raw)

    async def _keep_inbound_copy(
        self, own: OwnDevice, room_id: str, session: vodozemac.GroupSession
    ) -> None:
        inbound = vodozemac.InboundGroupSession(session.session_key)
        await self.store.add_inbound(
            InboundRow(
                room_id,
                session.session_id,
                own.user_id,
                own.curve25519,
                own.ed25519,
                inbound.pickle(self.pickle_key.raw),
                forwarded=False,
                own_key=self.pickle_key.seal(session.session_key.to_base64(), session.session_id),
            )
        )

    def open_key(self, sealed: str, session_id: str) -> str:
        """A session key sealed for one of our sessions (see ``crypto_shared``)."""
        return self.pickle_key.open(sealed, session_id)

    async def _share(
        self, own: OwnDevice, room_id: str, session: vodozemac.GroupSession, devices: DeviceKeys
    ) -> None:
        shared = await self.store.shared_with(session.session_id)
        targets = {k: v for k, v in devices.items() if k not in shared}
        if not targets:
            return
        content = {
            "algorithm": MEGOLM,
            "room_id": room_id,
            "session_id": session.session_id,
            "session_key": session.session_key.to_base64(),
        }
        reached = await self.olm.send(own, targets, "m.room_key", content)
        # What they got: the key as of this message (nothing before it), sealed.
        sealed = self.pickle_key.seal(content["session_key"], session.session_id)
        await self.store.mark_shared(session.session_id, reached, sealed)

    # Receiving ---------------------------------------------------------------------------------

    async def add_room_key(self, payload: dict[str, Any]) -> tuple[str, str] | None:
        """Keep the session of an ``m.room_key`` (decrypted Olm payload); returns its room and
        session ids when it was new."""
        content = payload.get("content")
        if not isinstance(content, dict) or content.get("algorithm") != MEGOLM:
            return None
        room_id, session_key = content.get("room_id"), content.get("session_key")
        if not isinstance(room_id, str) or not isinstance(session_key, str):
            return None
        try:
            session = vodozemac.InboundGroupSession(vodozemac.SessionKey(session_key))
        except Exception:
            return None  # not a session key: nothing to keep
        if session.session_id != content.get("session_id"):
            return None
        keys = payload.get("keys") if isinstance(payload.get("keys"), dict) else {}
        stored = await self.store.add_inbound(
            InboundRow(
                room_id,
                session.session_id,
                str(payload["sender"]),
                str(payload["sender_key"]),
                keys.get("ed25519"),
                session.pickle(self.pickle_key.raw),
                forwarded=False,
            ),
            replace_forwarded=True,
        )
        return (room_id, session.session_id) if stored else None

    async def add_forwarded_key(self, payload: dict[str, Any]) -> tuple[str, str] | None:
        """Keep the session of an ``m.forwarded_room_key`` we asked for; returns its room and
        session ids when it was new."""
        content = payload.get("content")
        if not isinstance(content, dict) or content.get("algorithm") != MEGOLM:
            return None
        room_id, exported = content.get("room_id"), content.get("session_key")
        sender_key = content.get("sender_key")
        if not all(isinstance(v, str) for v in (room_id, exported, sender_key)):
            return None
        try:
            session = vodozemac.InboundGroupSession.import_session(
                vodozemac.ExportedSessionKey(str(exported))
            )
        except Exception:
            return None
        if session.session_id != content.get("session_id"):
            return None
        stored = await self.store.add_inbound(
            InboundRow(
                str(room_id),
                session.session_id,
                str(payload["sender"]),
                str(sender_key),
                content.get("sender_claimed_ed25519_key"),
                session.pickle(self.pickle_key.raw),
                forwarded=True,
            )
        )
        return (str(room_id), session.session_id) if stored else None

    async def decrypt(self, event: dict[str, Any]) -> dict[str, Any]:
        """The event as its sender wrote it (type and content), other fields kept."""
        content = event.get("content")
        if not isinstance(content, dict):
            raise Undecryptable("the encrypted event has no content")
        if content.get("algorithm") != MEGOLM:
            raise Undecryptable(f"unsupported algorithm {content.get('algorithm')!r}")
        room_id = str(event.get("room_id"))
        session_id, ciphertext = content.get("session_id"), content.get("ciphertext")
        sender_key = content.get("sender_key")
        if not isinstance(session_id, str) or not isinstance(ciphertext, str):
            raise Undecryptable("the encrypted event lacks session_id or ciphertext")
        row = await self.store.inbound(room_id, session_id)
        if row is None:
            raise KeysMissing(room_id, session_id, str(sender_key or ""))
        if isinstance(sender_key, str) and sender_key != row.sender_key:
            raise Undecryptable("the event's sender key is not the one its session came from")
        if not row.forwarded and row.sender != event.get("sender"):
            raise Undecryptable("the event's sender is not the one who shared its session")
        try:
            message = vodozemac.MegolmMessage.from_base64(ciphertext)
        except Exception:
            raise Undecryptable("the ciphertext is malformed") from None
        session = vodozemac.InboundGroupSession.from_pickle(row.pickle, self.pickle_key.raw)
        try:
            decrypted = session.decrypt(message)
        except Exception:
            # A message index before the first one we hold: the key from earlier is needed.
            raise KeysMissing(room_id, session_id, row.sender_key) from None
        event_id = str(event.get("event_id"))
        first = await self.store.first_event_at(session_id, decrypted.message_index, event_id)
        if first != event_id:
            raise Undecryptable(f"a replay of event {first} (the same encrypted message)")
        try:
            plaintext = json.loads(bytes(decrypted.plaintext))
        except ValueError:
            raise Undecryptable("the decrypted event is not JSON") from None
        if not isinstance(plaintext, dict) or plaintext.get("room_id") != room_id:
            raise Undecryptable("the decrypted event belongs to another room")
        inner_type, inner_content = plaintext.get("type"), plaintext.get("content")
        if not isinstance(inner_type, str) or not isinstance(inner_content, dict):
            raise Undecryptable("the decrypted event has no type or content")
        relation = content.get("m.relates_to")
        if isinstance(relation, dict) and "m.relates_to" not in inner_content:
            inner_content = {**inner_content, "m.relates_to": relation}
        return {**event, "type": inner_type, "content": inner_content}
