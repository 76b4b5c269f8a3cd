"""A native Matrix user (a professional on a plain Matrix client) for the demo and the
end-to-end tests, wrapping matrix-nio's AsyncClient (a test and demo dependency, not the bridge's).

Unencrypted by default. With ``encrypted=True`` (and a ``store_dir`` for nio's Olm/Megolm
store) the user is an end-to-end encryption capable device: nio (backed by vodozemac) encrypts
what it sends to encrypted rooms and decrypts what it receives, and :meth:`MatrixUser.sync`
does the key housekeeping that nio's own ``sync_forever`` loop would do (key upload, query,
claim, outgoing to-device messages), since the tests drive /sync themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
from nio import (
    AsyncClient,
    AsyncClientConfig,
    EncryptionError,
    ErrorResponse,
    MegolmEvent,
    ReceiptEvent,
    RoomEncryptedMedia,
    RoomKeyRequest,
    RoomMessage,
    RoomMessageMedia,
    RoomPreset,
    SyncResponse,
    TypingNoticeEvent,
)
from nio.crypto.attachments import decrypt_attachment

from bridge.private_files import private_dir

__all__ = ["MatrixUser", "MatrixUserError", "connect", "login", "text_is"]

MEGOLM = "m.megolm.v1.aes-sha2"

MessagePredicate = Callable[[RoomMessage], bool]

# Room timelines are read from /sync; a high limit keeps a burst between two syncs from being
# cut ("limited" timeline), which would make wait_for_message miss messages.
_SYNC_FILTER: dict[str, Any] = {"room": {"timeline": {"limit": 200}}}
_MAX_LONG_POLL = 5.0


class MatrixUserError(RuntimeError):
    """A client-server request of a MatrixUser failed."""


def text_is(body: str) -> MessagePredicate:
    """Predicate for wait_for_message: a message whose body is exactly ``body``."""
    return lambda event: getattr(event, "body", None) == body


def _client(
    homeserver_url: str,
    user_id: str,
    *,
    encrypted: bool,
    store_dir: Path | None,
    device_id: str | None = None,
) -> AsyncClient:
    if not encrypted:
        return AsyncClient(homeserver_url, user_id, device_id=device_id or "")
    if store_dir is None:
        # nio's default store is a SQLite file per user and device; a shared default directory
        # would leak keys between tests, so the caller names one (under tmp_path).
        raise ValueError("an encrypted MatrixUser needs store_dir (e.g. tmp_path / 'alice')")
    private_dir(store_dir)  # the device's Olm/Megolm keys
    config = AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True)
    return AsyncClient(
        homeserver_url, user_id, device_id=device_id or "", store_path=str(store_dir), config=config
    )


async def login(
    homeserver_url: str,
    user_id: str,
    password: str,
    *,
    encrypted: bool = False,
    store_dir: Path | None = None,
    device_id: str | None = None,
    device_name: str = "eimis-tests",
) -> MatrixUser:
    """Log ``user_id`` in with a password and return a MatrixUser: a new device, or the device
    ``device_id`` again (its nio store in ``store_dir`` is then reused).

    Encrypted, the device's keys are uploaded before this returns, so other users can encrypt
    to it right away."""
    client = _client(
        homeserver_url, user_id, encrypted=encrypted, store_dir=store_dir, device_id=device_id
    )
    resp = await client.login(password, device_name=device_name)
    if isinstance(resp, ErrorResponse):
        await client.close()
        raise MatrixUserError(f"login of {user_id} on {homeserver_url} failed: {resp}")
    return await _ready(MatrixUser(client))


async def connect(
    homeserver_url: str,
    user_id: str,
    access_token: str,
    *,
    encrypted: bool = False,
    store_dir: Path | None = None,
) -> MatrixUser:
    """A MatrixUser from an existing access token (e.g. from LocalSynapse.register_user); the
    device is the token's. Encrypted, its keys are uploaded before this returns."""
    client = _client(homeserver_url, user_id, encrypted=encrypted, store_dir=store_dir)
    client.access_token = access_token
    resp = await client.whoami()
    if isinstance(resp, ErrorResponse):
        await client.close()
        raise MatrixUserError(f"access token of {user_id} rejected by {homeserver_url}: {resp}")
    if encrypted:
        if not resp.device_id:
            await client.close()
            raise MatrixUserError(f"the token of {user_id} has no device: cannot encrypt")
        # restore_login loads (or creates) the Olm account of this device from store_dir.
        client.restore_login(user_id, resp.device_id, access_token)
    else:
        client.device_id = resp.device_id or ""
    return await _ready(MatrixUser(client))


async def _ready(user: MatrixUser) -> MatrixUser:
    """An encrypted device is only usable by others once its identity and one-time keys are on
    the homeserver: one sync does the upload (see MatrixUser.sync)."""
    if user.encrypted:
        try:
            await user.sync()
        except BaseException:
            await user.close()
            raise
    return user


class MatrixUser:
    """A logged-in native user. Every /sync result is buffered, so a message that arrived
    before wait_for_message was called is still found."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._messages: dict[str, list[RoomMessage]] = {}
        self._undecryptable: dict[str, dict[str, MegolmEvent]] = {}
        self._share_keys_on_request = False
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._ephemeral: dict[str, list[dict[str, Any]]] = {}
        self._seen_event_ids: set[str] = set()
        self._seen_raw_ids: set[str] = set()
        self._accepted: set[str] = set()
        self._sync_lock = asyncio.Lock()

    @property
    def user_id(self) -> str:
        return str(self.client.user_id)

    @property
    def device_id(self) -> str:
        return str(self.client.device_id)

    @property
    def encrypted(self) -> bool:
        """True when this device does end-to-end encryption (nio's Olm machine is loaded)."""
        return self.client.olm is not None

    def messages(self, room_id: str) -> list[RoomMessage]:
        """The m.room.message events seen so far in ``room_id`` (decrypted ones included),
        in the order they became readable: a message decrypted late (key arriving after it,
        see request_room_key) comes after the ones seen meanwhile."""
        return list(self._messages.get(room_id, ()))

    def undecryptable(self, room_id: str) -> list[MegolmEvent]:
        """The m.room.encrypted events of ``room_id`` this device could not decrypt (yet): no
        room key for their Megolm session. One that becomes decryptable moves to messages()."""
        return list(self._undecryptable.get(room_id, {}).values())

    async def sync(self, timeout: float = 0.0) -> None:
        """One /sync, long-polling up to ``timeout`` seconds; buffers new room messages.

        Encrypted, nio decrypts the timeline and to-device events inside ``client.sync`` but does
        no key traffic there; that lives in its ``sync_forever`` loop, which the tests do not
        run. So each sync is followed by the same steps (see _crypto_housekeeping)."""
        async with self._sync_lock:
            resp = await self.client.sync(timeout=int(timeout * 1000), sync_filter=_SYNC_FILTER)
            if isinstance(resp, SyncResponse) and self.encrypted:
                await self._crypto_housekeeping()
        if not isinstance(resp, SyncResponse):
            raise MatrixUserError(f"/sync of {self.user_id} failed: {resp}")
        for room_id, info in resp.rooms.join.items():
            for event in info.timeline.events:
                if isinstance(event, MegolmEvent) and event.event_id not in self._seen_event_ids:
                    self._undecryptable.setdefault(room_id, {})[event.event_id] = event
            for event in info.timeline.events:
                source = getattr(event, "source", None)
                if isinstance(source, dict) and source.get("event_id") not in self._seen_raw_ids:
                    self._seen_raw_ids.add(str(source.get("event_id")))
                    self._events.setdefault(room_id, []).append(source)
            for edu in info.ephemeral:
                self._ephemeral.setdefault(room_id, []).append(_ephemeral_json(edu))
            for event in info.timeline.events:
                if isinstance(event, RoomMessage) and event.event_id not in self._seen_event_ids:
                    self._seen_event_ids.add(event.event_id)
                    self._messages.setdefault(room_id, []).append(event)
        if self.encrypted:
            self._retry_decryption()

    async def _crypto_housekeeping(self) -> None:
        """What nio's sync_forever does between syncs, in an order that lets one pass finish a
        key share: upload our keys when the one-time key count is low (and on the first sync:
        the device keys), query the device lists nio marked as changed or new, answer own-device
        key requests when allowed, claim one-time keys for devices needing a new Olm session
        (wedged ones, key requests waiting for a session), then send the queued to-device
        messages (room keys, forwarded keys, key request cancellations)."""
        client = self.client
        olm = client.olm
        assert olm is not None
        if client.should_upload_keys:
            _check(await client.keys_upload(), f"key upload of {self.user_id}")
        if client.should_query_keys:
            _check(await client.keys_query(), f"key query of {self.user_id}")
        self._approve_key_requests()
        if client.should_claim_keys:
            users = client.get_users_for_key_claiming()
            _check(await client.keys_claim(users), f"key claim of {self.user_id}")
            # A claim puts the key requests that waited for an Olm session back in nio's
            # queue, which nio only drains at the next sync: drain it now.
            olm.collect_key_requests()
            self._approve_key_requests()
        if client.outgoing_to_device_messages:
            for resp in await client.send_to_device_messages():
                _check(resp, f"to-device message of {self.user_id}")

    def _approve_key_requests(self) -> None:
        """nio forwards a room key on request only to another device of the same user, and only
        once that device is verified; a request from an unverified one is parked in
        ``key_request_from_untrusted`` for the application to approve (continue_key_share).
        With share_keys_on_request() the tests approve every own-device request."""
        olm = self.client.olm
        if not self._share_keys_on_request or olm is None:
            return
        for request in list(olm.key_request_from_untrusted.values()):
            if not isinstance(request, RoomKeyRequest) or request.sender != self.user_id:
                continue
            device = self.client.device_store[request.sender].get(request.requesting_device_id)
            if device is None:
                continue  # not queried yet; stays parked until keys_query knows it
            self.client.verify_device(device)
            self.client.continue_key_share(request)

    def _retry_decryption(self) -> None:
        """nio never retries an event it could not decrypt; once a room key arrives (e.g. a
        forwarded one) decrypt the parked events again."""
        for room_id, parked in self._undecryptable.items():
            for event_id, event in list(parked.items()):
                try:
                    decrypted = self.client.decrypt_event(event)
                except EncryptionError:
                    continue
                if not isinstance(decrypted, RoomMessage):
                    continue
                del parked[event_id]
                if event_id not in self._seen_event_ids:
                    self._seen_event_ids.add(event_id)
                    self._messages.setdefault(room_id, []).append(decrypted)

    def share_keys_on_request(self, enabled: bool = True) -> None:
        """Answer room key requests from this user's other devices (verifying them in this
        device's store), as a user does by accepting "share keys with your new session".
        nio never answers requests from other users' devices."""
        self._share_keys_on_request = enabled

    def verify_own_devices(self) -> list[str]:
        """Mark this user's other known devices verified in this device's store, as a user does
        by confirming a new session from an old one (the tests have no SAS/QR dance). nio
        imports a forwarded room key only from an own device that is verified; returns the ids
        of the devices verified now."""
        verified = []
        for device in self.client.device_store.active_user_devices(self.user_id):
            if device.id != self.device_id and self.client.verify_device(device):
                verified.append(str(device.id))
        return verified

    async def request_room_key(self, event: MegolmEvent, *, ask_sender: bool = False) -> None:
        """Ask for the Megolm key of an undecryptable event, then sync (wait_for_message) until
        it decrypts. nio's request_room_key sends the request to this user's own devices only,
        and nio imports the answer (m.forwarded_room_key) only from an own *verified* device
        (verify_own_devices). ``ask_sender`` also sends the request to the sender's device that
        encrypted the event, as Element does, to see that device receive it; nio would refuse
        a key forwarded by another user, so the event stays undecryptable that way."""
        _check(await self.client.request_room_key(event), f"key request of {self.user_id}")
        if ask_sender and event.sender != self.user_id:
            message = event.as_key_request(
                event.sender, self.device_id, event.session_id, event.device_id
            )
            _check(await self.client.to_device(message), f"key request of {self.user_id}")

    async def wait_for_device(self, user_id: str, device_id: str, timeout: float = 20.0) -> None:
        """Sync until this device knows ``user_id``'s device ``device_id`` (its keys queried),
        e.g. before that device asks it for a key (an unknown requester is dropped by nio)."""
        await self._until(
            lambda: device_id in self.client.device_store[user_id],
            f"device {device_id} of {user_id}",
            timeout,
        )

    async def wait_until_encrypted(self, room_id: str, timeout: float = 20.0) -> None:
        """Sync until this client knows the room is encrypted (after someone turned it on):
        nio sends in clear into a room it does not know to be encrypted yet."""
        await self._until(
            lambda: room_id in self.client.rooms and self.client.rooms[room_id].encrypted,
            f"{room_id} known as encrypted",
            timeout,
        )

    async def wait_for_join(self, room_id: str, user_id: str, timeout: float = 20.0) -> None:
        """Sync until ``user_id`` is a joined member of ``room_id`` as this client sees it, so
        that the room key of the next encrypted message is shared with its devices."""

        def joined() -> bool:
            room = self.client.rooms.get(room_id)
            return room is not None and user_id in room.users and user_id not in room.invited_users

        await self._until(joined, f"{user_id} joined in {room_id}", timeout)

    async def _until(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{self.user_id}: no {what} within {timeout} s")
            await self.sync(timeout=min(remaining, _MAX_LONG_POLL))

    @contextlib.asynccontextmanager
    async def syncing(self) -> AsyncIterator[None]:
        """Keep this user syncing in the background (so its device answers key requests and
        sends to-device messages) while the body waits on another user."""

        async def loop() -> None:
            while True:
                await self.sync(timeout=_MAX_LONG_POLL)

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise MatrixUserError(f"background sync of {self.user_id} failed") from (
                    task.exception()
                )

    async def device_keys_of(self, user_id: str) -> dict[str, Any]:
        """The raw /keys/query answer about ``user_id``: ``device_keys`` (by device id),
        ``master_keys``, ``self_signing_keys`` and ``user_signing_keys`` (the last for our own
        user only; None when absent). Plain HTTP, bypassing nio, so a test checks the
        cross-signing signatures itself."""
        url = f"{self.client.homeserver}/_matrix/client/v3/keys/query"
        headers = {"Authorization": f"Bearer {self.client.access_token}"}
        body = {"device_keys": {user_id: []}}
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, json=body, headers=headers) as resp,
        ):
            answer = await resp.json(content_type=None)
            if resp.status != 200:
                raise MatrixUserError(f"/keys/query of {user_id} failed: {resp.status} {answer}")
        return {
            "device_keys": answer.get("device_keys", {}).get(user_id, {}),
            **{
                kind: answer.get(kind, {}).get(user_id)
                for kind in ("master_keys", "self_signing_keys", "user_signing_keys")
            },
        }

    async def accept_invites(
        self, room_id: str | None = None, *, timeout: float = 10.0
    ) -> list[str]:
        """Join pending invites and return the joined room ids.

        With ``room_id``: wait until invited to that room and join it (returns ``[]`` if
        already joined). Without: wait until at least one invite is pending, then join all.
        Raises TimeoutError when nothing arrives within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            pending = [r for r in self.client.invited_rooms if r not in self._accepted]
            if room_id is not None:
                if room_id in self.client.rooms or room_id in self._accepted:
                    return []
                pending = [r for r in pending if r == room_id]
            if pending:
                for rid in pending:
                    resp = await self.client.join(rid)
                    if isinstance(resp, ErrorResponse):
                        raise MatrixUserError(f"{self.user_id} could not join {rid}: {resp}")
                    self._accepted.add(rid)
                return pending
            remaining = deadline - loop.time()
            if remaining <= 0:
                what = f"to {room_id}" if room_id else "at all"
                raise TimeoutError(f"{self.user_id} was not invited {what} within {timeout} s")
            await self.sync(timeout=min(remaining, _MAX_LONG_POLL))

    async def wait_for_message(
        self,
        room_id: str,
        predicate: MessagePredicate | None = None,
        timeout: float = 10.0,
    ) -> RoomMessage:
        """Sync until a message in ``room_id`` matches ``predicate`` (any message if None) and
        return the earliest match. Messages seen before the call count too.
        Raises TimeoutError (listing the last messages seen) after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for event in self._messages.get(room_id, ()):
                if predicate is None or predicate(event):
                    return event
            remaining = deadline - loop.time()
            if remaining <= 0:
                seen = [
                    f"{e.sender}: {getattr(e, 'body', '?')!r}"
                    for e in self._messages.get(room_id, [])[-5:]
                ]
                parked = len(self._undecryptable.get(room_id, {}))
                raise TimeoutError(
                    f"{self.user_id}: no matching message in {room_id} within {timeout} s "
                    f"(last seen: {seen or 'none'}; undecryptable: {parked})"
                )
            await self.sync(timeout=min(remaining, _MAX_LONG_POLL))

    def events(self, room_id: str) -> list[dict[str, Any]]:
        """Every timeline event seen in ``room_id`` (raw JSON), oldest first."""
        return list(self._events.get(room_id, ()))

    async def wait_for_event(
        self, room_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any]:
        """Sync until a timeline event (raw JSON) in ``room_id`` matches ``predicate``."""
        return await self._wait(lambda: self._events.get(room_id, ()), predicate, timeout)

    async def wait_for_ephemeral(
        self, room_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any]:
        """Sync until an ephemeral event (typing, receipt) in ``room_id`` matches."""
        return await self._wait(lambda: self._ephemeral.get(room_id, ()), predicate, timeout)

    async def _wait(
        self,
        seen: Callable[[], Any],
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for event in seen():
                if predicate(event):
                    return dict(event)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{self.user_id}: no matching event within {timeout} s")
            await self.sync(timeout=min(remaining, _MAX_LONG_POLL))

    async def send(self, room_id: str, event_type: str, content: dict[str, Any]) -> str:
        """Send any room event and return its event id (encrypted in an encrypted room)."""
        await self._before_send(room_id)
        resp = await self.client.room_send(
            room_id, event_type, content, ignore_unverified_devices=True
        )
        if isinstance(resp, ErrorResponse):
            raise MatrixUserError(f"{self.user_id} could not send to {room_id}: {resp}")
        return str(resp.event_id)

    async def redact(self, room_id: str, event_id: str) -> str:
        resp = await self.client.room_redact(room_id, event_id)
        if isinstance(resp, ErrorResponse):
            raise MatrixUserError(f"{self.user_id} could not redact: {resp}")
        return str(resp.event_id)

    async def upload(self, data: bytes, mime_type: str, filename: str) -> str:
        """Upload bytes to the media repository; return the mxc:// URI."""
        resp, _ = await self.client.upload(
            lambda *_: data, content_type=mime_type, filename=filename, filesize=len(data)
        )
        uri = getattr(resp, "content_uri", None)
        if not uri:
            raise MatrixUserError(f"upload failed: {resp}")
        return str(uri)

    async def download(self, mxc: str) -> bytes:
        """A file's bytes through authenticated media."""
        server, media_id = mxc.removeprefix("mxc://").split("/", 1)
        url = f"{self.client.homeserver}/_matrix/client/v1/media/download/{server}/{media_id}"
        headers = {"Authorization": f"Bearer {self.client.access_token}"}
        async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
            if resp.status != 200:
                raise MatrixUserError(f"download of {mxc} failed: {resp.status}")
            return await resp.read()

    async def read_receipt(self, room_id: str, event_id: str) -> None:
        resp = await self.client.room_read_markers(room_id, event_id, event_id)
        if isinstance(resp, ErrorResponse):
            raise MatrixUserError(f"read receipt failed: {resp}")

    async def typing(self, room_id: str, typing: bool = True) -> None:
        resp = await self.client.room_typing(room_id, typing, timeout=30000)
        if isinstance(resp, ErrorResponse):
            raise MatrixUserError(f"typing failed: {resp}")

    async def send_text(self, room_id: str, text: str) -> str:
        """Send an m.text message (encrypted in an encrypted room) and return its event id."""
        return await self.send(room_id, "m.room.message", {"msgtype": "m.text", "body": text})

    async def _before_send(self, room_id: str) -> None:
        """nio encrypts only for a room it knows from /sync as encrypted, and shares the room key
        with the devices it has queried: sync until the room is known and query what is due.
        Devices are not verified (tests have no verification dance), hence room_send's
        ignore_unverified_devices=True: they get the key all the same."""
        if not self.encrypted:
            return
        await self._until(lambda: room_id in self.client.rooms, f"room {room_id}", 20.0)
        if self.client.should_query_keys:
            async with self._sync_lock:
                if self.client.should_query_keys:
                    _check(await self.client.keys_query(), f"key query of {self.user_id}")

    async def send_file(self, room_id: str, data: bytes, name: str, mime_type: str) -> str:
        """Send ``data`` as an m.file and return the event id. In an encrypted room the file is
        encrypted before upload (AES-CTR, nio) and the event carries its key in ``file``
        (EncryptedFile), so the homeserver's media store only holds ciphertext."""
        await self._before_send(room_id)
        room = self.client.rooms.get(room_id)
        info = {"mimetype": mime_type, "size": len(data)}
        content: dict[str, Any] = {"msgtype": "m.file", "body": name, "info": info}
        if self.encrypted and room is not None and room.encrypted:
            resp, keys = await self.client.upload(
                lambda *_: data, filename=name, encrypt=True, filesize=len(data)
            )
            uri = getattr(resp, "content_uri", None)
            if not uri or keys is None:
                raise MatrixUserError(f"encrypted upload failed: {resp}")
            content["file"] = {"url": str(uri), "mimetype": mime_type, **keys}
        else:
            content["url"] = await self.upload(data, mime_type, name)
        return await self.send(room_id, "m.room.message", content)

    async def download_file(self, event: RoomMessageMedia | RoomEncryptedMedia) -> bytes:
        """The bytes of a file message, decrypted (and integrity-checked against the sha256 in
        the event) when it was sent as an encrypted file."""
        data = await self.download(event.url)
        if isinstance(event, RoomEncryptedMedia):
            return bytes(decrypt_attachment(data, event.key["k"], event.hashes["sha256"], event.iv))
        return data

    async def create_dm(self, invitee: str) -> str:
        """Create a direct chat with ``invitee`` invited and return its room id."""
        return await self.create_room(invite=[invitee], is_direct=True)

    async def create_room(
        self,
        *,
        invite: list[str] | None = None,
        name: str | None = None,
        is_direct: bool = False,
        encrypted: bool = False,
    ) -> str:
        """Create a private room, invite ``invite`` and return the room id."""
        initial_state = (
            [{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": MEGOLM}}]
            if encrypted
            else []
        )
        resp = await self.client.room_create(
            name=name,
            is_direct=is_direct,
            invite=invite or [],
            preset=RoomPreset.trusted_private_chat if is_direct else RoomPreset.private_chat,
            initial_state=initial_state,
        )
        if isinstance(resp, ErrorResponse):
            raise MatrixUserError(f"{self.user_id} could not create a room: {resp}")
        return str(resp.room_id)

    async def create_encrypted_room(
        self, *, invite: list[str] | None = None, is_direct: bool = False, name: str | None = None
    ) -> str:
        """Create a private room encrypted from its first event (m.room.encryption in the
        initial state, Megolm), invite ``invite`` and return the room id."""
        return await self.create_room(invite=invite, name=name, is_direct=is_direct, encrypted=True)

    async def close(self) -> None:
        """Close the HTTP session and nio's store (the SQLite file of the device's keys)."""
        await self.client.close()
        if self.client.store is not None:
            with contextlib.suppress(Exception):
                self.client.store.database.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _check(resp: Any, what: str) -> None:
    if isinstance(resp, ErrorResponse):
        raise MatrixUserError(f"{what} failed: {resp}")


def _ephemeral_json(edu: Any) -> dict[str, Any]:
    """nio parses typing and receipts into objects without their JSON; rebuild the JSON."""
    if isinstance(edu, TypingNoticeEvent):
        return {"type": "m.typing", "content": {"user_ids": list(edu.users)}}
    if isinstance(edu, ReceiptEvent):
        content: dict[str, Any] = {}
        for receipt in edu.receipts:
            by_type = content.setdefault(receipt.event_id, {})
            by_type.setdefault(str(receipt.receipt_type), {})[receipt.user_id] = {
                "ts": receipt.timestamp
            }
        return {"type": "m.receipt", "content": content}
    return {"type": type(edu).__name__, "content": {}}
