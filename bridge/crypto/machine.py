"""End-to-bridge encryption: what the rest of the bridge asks of it.

- ``encrypt``: the ``m.room.encrypted`` content of an event a ghost (or the bot) sends in an
  encrypted room, from that ghost's own cross-signed device.
- ``decrypt``: a room event as its sender wrote it, or ``KeysMissing`` (wait: the key may still
  come) or ``Undecryptable`` (it never will).
- ``handle``: what the homeserver pushes for the bridge's devices in its transactions (MSC2409
  to-device events, MSC3202 device list changes and one-time key counts), once stored in the
  durable inbox: room keys, forwarded keys, key requests.

``Crypto`` is the ``Encryptor`` the homeserver client asks (``bridge/matrix/encryption.py``),
handed to it by the running bridge: the Matrix side never imports this package.

Plaintext never reaches the database: events are decrypted when a lane processes them, and the
inbox holds what the homeserver sent (ciphertext).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from cachetools import LRUCache

from bridge.crypto.devices import MEGOLM, OwnDevice, OwnDevices
from bridge.crypto.megolm import GroupSessions, KeysMissing, Undecryptable
from bridge.crypto.olm import OlmChannel, OlmError
from bridge.crypto.peers import DeviceKeys, PeerDevices
from bridge.crypto.pickling import PickleKey
from bridge.db.crypto import CryptoStore, RoomEncryption
from bridge.matrix.keys import KeysApi
from bridge.values.crypto_extensions import DEVICE_LISTS, KEY_COUNTS, TO_DEVICE

log = logging.getLogger("eimis.crypto")

DEFAULT_ROTATION_MS = 7 * 24 * 3600 * 1000
DEFAULT_ROTATION_MSGS = 100
CATCH_UP_EVERY_S = 5.0
ROOM_CACHE_SIZE = 100_000

Members = Callable[[str, str], Awaitable[list[str]]]
"""The joined and invited members of a room (room, a member who looks)."""
IsOurs = Callable[[str], bool]
"""Whether a Matrix ID is one of the bridge's (the bot or a ghost)."""
RoomKeyArrived = Callable[[str], None]
"""Told the room whose key arrived, so events waiting for it are tried again at once."""


def room_encryption(content: dict[str, Any]) -> RoomEncryption | None:
    """The settings of an ``m.room.encryption`` content; None for an algorithm not supported."""
    if content.get("algorithm") != MEGOLM:
        return None
    period = content.get("rotation_period_ms")
    messages = content.get("rotation_period_msgs")
    return RoomEncryption(
        MEGOLM,
        int(period) if isinstance(period, int) and period > 0 else DEFAULT_ROTATION_MS,
        int(messages) if isinstance(messages, int) and messages > 0 else DEFAULT_ROTATION_MSGS,
    )


class Crypto:
    def __init__(
        self,
        store: CryptoStore,
        keys: KeysApi,
        pickle_key: PickleKey,
        *,
        bot_mxid: str,
        members: Members,
        is_ours: IsOurs,
        cross_signing: bool = True,
        on_room_key: RoomKeyArrived | None = None,
    ) -> None:
        """``on_room_key(room_id)``: a room key arrived (events waiting for it can go on)."""
        self.store = store
        self.keys = keys
        self.bot_mxid = bot_mxid
        self._members = members
        self._is_ours = is_ours
        self._cross_signing = cross_signing
        self.devices = OwnDevices(store, keys, pickle_key)
        self.peers = PeerDevices(store, keys)
        self.olm = OlmChannel(store, keys, self.devices, pickle_key)
        self.megolm = GroupSessions(store, self.olm, pickle_key)
        self.on_room_key: RoomKeyArrived = on_room_key or (lambda room_id: None)
        self._requested: dict[str, float] = {}
        self._asked: dict[str, str] = {}
        """Session id -> the user asked for its key (whose forwarded key is accepted)."""
        self._key_arrivals: dict[str, asyncio.Event] = {}
        self._caught_up: dict[str, float] = {}
        self._rooms: LRUCache[str, RoomEncryption | None] = LRUCache(ROOM_CACHE_SIZE)
        self.caught_up_messages = 0
        """To-device messages read from inboxes rather than pushed (see ``catch_up``)."""
        self.decrypted = self.encrypted = self.room_keys = self.undecryptable = 0

    def counts(self) -> dict[str, int]:
        """What encryption did since start (metrics, the admin room's status)."""
        return {
            "decrypted": self.decrypted,
            "encrypted": self.encrypted,
            "undecryptable": self.undecryptable,
            "room_keys": self.room_keys,
            "read_from_inbox": self.caught_up_messages,
        }

    async def start(self) -> None:
        """The bot's device exists (it receives the room keys of every portal it is in)."""
        await self.devices.ensure(self.bot_mxid, cross_sign=self._cross_signing)

    # Rooms -------------------------------------------------------------------------------------

    async def encryption_of(self, room_id: str) -> RoomEncryption | None:
        """The room's encryption (None: a plain room), remembered: every send asks."""
        if room_id in self._rooms:
            return self._rooms[room_id]
        settings = await self.store.room(room_id)
        self._rooms[room_id] = settings
        return settings

    async def room_encrypted(self, room_id: str, content: dict[str, Any]) -> bool:
        """Record an ``m.room.encryption`` state event; False if its algorithm is unknown."""
        settings = room_encryption(content)
        if settings is None:
            log.warning("Room %s asks for an encryption algorithm the bridge lacks", room_id)
            return False
        await self.store.set_room(room_id, settings)
        self._rooms[room_id] = settings
        return True

    async def member_left(self, room_id: str) -> None:
        """Someone left: the sessions they hold must not read what comes next."""
        await self.megolm.discard(room_id)

    async def forget(self, user_id: str) -> None:
        """Erase a ghost's device (on the homeserver too) and its crypto material."""
        own = await self.devices.get(user_id)
        if own is not None:
            try:
                await self.keys.delete_device(user_id, own.device_id)
            except Exception as error:  # erased here all the same; the homeserver may follow
                log.warning("Could not delete the device of %s (%s)", user_id, error)
        await self.store.forget_user(user_id)
        self.devices.drop(user_id)

    async def ensure_member_devices(self, room_id: str) -> None:
        """Every ghost in a room that just turned encryption on has its device (ghosts that
        joined before devices were made on join would otherwise miss the room's keys)."""
        for user_id in await self._members(room_id, self.bot_mxid):
            if self._is_ours(user_id) and user_id != self.bot_mxid:
                await self.ensure_device(user_id)

    async def ensure_device(self, user_id: str) -> OwnDevice:
        return await self.devices.ensure(user_id, cross_sign=self._cross_signing)

    # Sending -----------------------------------------------------------------------------------

    async def encrypt(
        self, sender: str, room_id: str, event_type: str, content: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The encrypted content of the event, or None when the room is not encrypted."""
        settings = await self.encryption_of(room_id)
        if settings is None:
            return None
        own = await self.ensure_device(sender)

        async def recipients() -> DeviceKeys:
            people = [m for m in await self._members(room_id, sender) if not self._is_ours(m)]
            return await self.peers.of(sender, people)

        encrypted = await self.megolm.encrypt(
            own, room_id, settings, event_type, content, recipients
        )
        self.encrypted += 1
        return encrypted

    # Receiving ---------------------------------------------------------------------------------

    async def decrypt(self, event: dict[str, Any], *, wait_s: float = 0.0) -> dict[str, Any]:
        """The event decrypted. Its room key usually travels beside it (a to-device event of
        the same or the next transaction, in another lane): a missing key is waited for up to
        ``wait_s`` before ``KeysMissing`` is raised."""
        try:
            decrypted = await self.megolm.decrypt(event)
        except KeysMissing as missing:
            if wait_s <= 0:
                raise
            decrypted = await self._when_key_arrives(event, missing, wait_s)
        self.decrypted += 1
        return decrypted

    async def _when_key_arrives(
        self, event: dict[str, Any], missing: KeysMissing, wait_s: float
    ) -> dict[str, Any]:
        arrived = self._key_arrivals.setdefault(missing.session_id, asyncio.Event())
        try:
            with contextlib.suppress(KeysMissing):
                return await self.megolm.decrypt(event)  # it came while we looked
            async with asyncio.timeout(wait_s):
                await arrived.wait()
        except TimeoutError:
            raise missing from None
        finally:
            self._key_arrivals.pop(missing.session_id, None)
        return await self.megolm.decrypt(event)

    async def catch_up(self, room_id: str) -> int:
        """Read the to-device inboxes of our devices in the room (the bot's, the ghosts'):
        the homeserver does not push to-device messages again in the transactions it replays
        after the bridge was unreachable (Synapse: catch-up transactions carry room events
        only), but keeps them for the device until a /sync acknowledges them. Returns how many
        were read; at most one pass per room every few seconds."""
        now = time.monotonic()
        if now - self._caught_up.get(room_id, -1e9) < CATCH_UP_EVERY_S:
            return 0
        self._caught_up[room_id] = now
        # Not the bot's: a homeserver refuses /sync to an appservice's own user (Synapse: "AS
        # users using /sync directly" are not supported); its ghosts' devices are readable.
        ghosts = [
            m
            for m in await self._members(room_id, self.bot_mxid)
            if self._is_ours(m) and m != self.bot_mxid
        ]
        read = 0
        for user_id in ghosts:
            own = await self.devices.get(user_id)
            if own is None:
                continue
            since = await self.store.sync_since(user_id)
            try:
                events, next_batch = await self.keys.to_device_inbox(user_id, own.device_id, since)
            except Exception as error:
                log.warning("Could not read the to-device inbox of %s (%s)", user_id, error)
                continue
            for event in events:
                await self._to_device(
                    {**event, "to_user_id": user_id, "to_device_id": own.device_id}
                )
            read += len(events)
            if next_batch:
                # Acknowledged at the next pass (the homeserver deletes up to this token then).
                await self.store.set_sync_since(user_id, next_batch)
        if read:
            self.caught_up_messages += read
            log.info("Read %d to-device message(s) the homeserver had kept for %s", read, room_id)
        return read

    async def request_key(self, event: dict[str, Any], missing: KeysMissing) -> None:
        """Ask the sender's devices for a room key we lack (once per session and minute)."""
        now = time.monotonic()
        if now - self._requested.get(missing.session_id, -1e9) < 60:
            return
        self._requested[missing.session_id] = now
        sender = str(event.get("sender"))
        self._asked[missing.session_id] = sender
        own = await self._member_device(missing.room_id)
        content = {
            "action": "request",
            "body": {
                "algorithm": MEGOLM,
                "room_id": missing.room_id,
                "sender_key": missing.sender_key,
                "session_id": missing.session_id,
            },
            "request_id": uuid.uuid4().hex,
            "requesting_device_id": own.device_id,
        }
        await self.keys.send_to_device(
            own.user_id,
            own.device_id,
            "m.room_key_request",
            {sender: {"*": content}},
            uuid.uuid4().hex,
        )

    async def _member_device(self, room_id: str) -> OwnDevice:
        """One of our devices whose user is in the room (a client shares keys with members'
        devices only): a ghost's, else the bot's."""
        for user_id in await self._members(room_id, self.bot_mxid):
            if self._is_ours(user_id) and user_id != self.bot_mxid:
                own = await self.devices.get(user_id)
                if own is not None:
                    return own
        return await self.ensure_device(self.bot_mxid)

    async def handle(self, item: dict[str, Any]) -> None:
        """One crypto item of a transaction (see ``bridge/db/inbox.crypto_rows``)."""
        kind = item.get("kind")
        if kind == TO_DEVICE:
            await self._to_device(item["event"])
        elif kind == DEVICE_LISTS:
            changed = [u for u in item.get("changed", []) if isinstance(u, str)]
            left = [u for u in item.get("left", []) if isinstance(u, str)]
            await self.peers.changed(left)
            await self._devices_changed(changed)
        elif kind == KEY_COUNTS:
            await self.devices.replenish(
                item["user_id"], item["device_id"], item.get("counts") or {}, item.get("fallback")
            )

    async def _to_device(self, event: dict[str, Any]) -> None:
        user_id, device_id = event.get("to_user_id"), event.get("to_device_id")
        sender, event_type = event.get("sender"), event.get("type")
        content = event.get("content")
        if not isinstance(sender, str) or not isinstance(content, dict):
            return
        own = await self.devices.get(str(user_id))
        if own is None or own.device_id != device_id:
            return  # not one of our devices (or one replaced since)
        if event_type == "m.room.encrypted":

            async def handle(payload: dict[str, Any]) -> None:
                await self._decrypted_to_device(own, sender, payload)

            try:
                await self.olm.decrypt(own, sender, content, handle)
            except OlmError as error:
                log.warning("A to-device message from %s did not decrypt: %s", sender, error)
        elif event_type == "m.room_key_request":
            await self._key_request(own, sender, content)

    async def _decrypted_to_device(
        self, own: OwnDevice, sender: str, payload: dict[str, Any]
    ) -> None:
        if not await self._known_sender(own, sender, payload):
            return
        inner = payload.get("type")
        added = None
        if inner == "m.room_key":
            added = await self.megolm.add_room_key(payload)
        elif inner == "m.forwarded_room_key":
            content = payload.get("content") if isinstance(payload.get("content"), dict) else {}
            if self._asked.get(str(content.get("session_id"))) != sender:
                # Only the answer to a request of ours, from whom we asked: a key pushed
                # unasked could make anyone's device speak for another sender.
                log.warning("Refused a forwarded room key nobody asked %s for", sender)
                return
            added = await self.megolm.add_forwarded_key(payload)
        if added is not None:
            self.room_keys += 1
            room_id, session_id = added
            arrived = self._key_arrivals.get(session_id)
            if arrived is not None:
                arrived.set()
            self.on_room_key(room_id)

    async def _known_sender(self, own: OwnDevice, sender: str, payload: dict[str, Any]) -> bool:
        """The Olm sender key belongs to a device of the claimed sender, whose Ed25519 key is
        the one the payload claims: else a key from nobody we can name, refused."""
        sender_key = str(payload.get("sender_key"))
        known = await self.store.device_by_key(sender_key)
        if known is None or known[0] != sender:
            await self.peers.refresh(own.user_id, [sender])
            known = await self.store.device_by_key(sender_key)
        claimed = (
            payload.get("keys", {}).get("ed25519")
            if isinstance(payload.get("keys"), dict)
            else None
        )
        if known is None or known[0] != sender or known[2] != claimed:
            log.warning("Refused a room key from an unknown device of %s", sender)
            return False
        return True

    async def _key_request(self, own: OwnDevice, sender: str, content: dict[str, Any]) -> None:
        """A device asks one of our ghosts' devices for the key of a session that ghost made:
        given (its key from the first message) if the session was given to that user, i.e.
        they were a member when it was in use and are entitled to what it encrypted."""
        body = content.get("body")
        device_id = content.get("requesting_device_id")
        if content.get("action") != "request" or not isinstance(body, dict):
            return
        session_id, room_id = body.get("session_id"), body.get("room_id")
        if not isinstance(session_id, str) or not isinstance(room_id, str):
            return
        row = await self.store.inbound(room_id, session_id)
        if row is None or row.own_key is None or row.sender != own.user_id:
            return  # not a session this device's user made
        given = await self.store.key_given_to(session_id, sender)
        if given is None:
            log.info("Refused a key request: %s never had that session", sender)
            return
        devices = await self.peers.of(own.user_id, [sender])
        target = devices.get((sender, str(device_id)))
        if target is None:
            await self.peers.refresh(own.user_id, [sender])
            target = (await self.store.devices_of([sender])).get((sender, str(device_id)))
        if target is None:
            return
        await self._reshare(own, {(sender, str(device_id)): target}, room_id, session_id, given)
        log.info("Answered a key request of a device of %s", sender)

    async def _devices_changed(self, user_ids: list[str]) -> None:
        """Users' device lists changed: refresh them, and give each new device of a member the
        sessions that member was given (the history they are entitled to read)."""
        tracked = await self.store.tracked(u for u in user_ids if not self._is_ours(u))
        if not tracked:
            return
        before = await self.store.devices_of(tracked)
        await self.peers.changed(tracked)
        await self.peers.refresh(self.bot_mxid, tracked)
        added = {k: v for k, v in (await self.store.devices_of(tracked)).items() if k not in before}
        for user_id in dict.fromkeys(user for user, _ in added):
            new = {k: v for k, v in added.items() if k[0] == user_id}
            for room_id, session_id, ghost, sealed in await self.store.own_sessions_shared_with(
                user_id
            ):
                own = await self.devices.get(ghost)
                if own is not None:
                    await self._reshare(own, new, room_id, session_id, sealed)

    async def _reshare(
        self,
        own: OwnDevice,
        targets: DeviceKeys,
        room_id: str,
        session_id: str,
        sealed: str,
    ) -> None:
        """Send one of our sessions to devices, as of the message their user was first given it
        at (an ``m.room_key`` from the device that made it: what any client imports)."""
        content = {
            "algorithm": MEGOLM,
            "room_id": room_id,
            "session_id": session_id,
            "session_key": self.megolm.open_key(sealed, session_id),
        }
        reached = await self.olm.send(own, targets, "m.room_key", content)
        await self.store.mark_shared(session_id, reached, sealed)


__all__ = ["Crypto", "KeysMissing", "Undecryptable", "room_encryption"]
