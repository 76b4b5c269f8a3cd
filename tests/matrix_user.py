"""A native Matrix user for end-to-end tests, wrapping matrix-nio's AsyncClient."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import aiohttp
from nio import (
    AsyncClient,
    ErrorResponse,
    ReceiptEvent,
    RoomMessage,
    RoomPreset,
    SyncResponse,
    TypingNoticeEvent,
)

__all__ = ["MatrixUser", "MatrixUserError", "connect", "login", "text_is"]

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


async def login(homeserver_url: str, user_id: str, password: str) -> MatrixUser:
    """Log ``user_id`` in with a password and return a MatrixUser (a new device)."""
    client = AsyncClient(homeserver_url, user_id)
    resp = await client.login(password, device_name="eimis-tests")
    if isinstance(resp, ErrorResponse):
        await client.close()
        raise MatrixUserError(f"login of {user_id} on {homeserver_url} failed: {resp}")
    return MatrixUser(client)


async def connect(homeserver_url: str, user_id: str, access_token: str) -> MatrixUser:
    """A MatrixUser from an existing access token (e.g. from LocalSynapse.register_user)."""
    client = AsyncClient(homeserver_url, user_id)
    client.access_token = access_token
    resp = await client.whoami()
    if isinstance(resp, ErrorResponse):
        await client.close()
        raise MatrixUserError(f"access token of {user_id} rejected by {homeserver_url}: {resp}")
    client.device_id = resp.device_id or ""
    return MatrixUser(client)


class MatrixUser:
    """A logged-in native user. Every /sync result is buffered, so a message that arrived
    before wait_for_message was called is still found."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._messages: dict[str, list[RoomMessage]] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._ephemeral: dict[str, list[dict[str, Any]]] = {}
        self._seen_event_ids: set[str] = set()
        self._seen_raw_ids: set[str] = set()
        self._accepted: set[str] = set()
        self._sync_lock = asyncio.Lock()

    @property
    def user_id(self) -> str:
        return str(self.client.user_id)

    def messages(self, room_id: str) -> list[RoomMessage]:
        """The m.room.message events seen so far in ``room_id``, oldest first."""
        return list(self._messages.get(room_id, ()))

    async def sync(self, timeout: float = 0.0) -> None:
        """One /sync, long-polling up to ``timeout`` seconds; buffers new room messages."""
        async with self._sync_lock:
            resp = await self.client.sync(timeout=int(timeout * 1000), sync_filter=_SYNC_FILTER)
        if not isinstance(resp, SyncResponse):
            raise MatrixUserError(f"/sync of {self.user_id} failed: {resp}")
        for room_id, info in resp.rooms.join.items():
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
                raise TimeoutError(
                    f"{self.user_id}: no matching message in {room_id} within {timeout} s "
                    f"(last seen: {seen or 'none'})"
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
        """Send any room event and return its event id."""
        resp = await self.client.room_send(room_id, event_type, content)
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
        """Send an m.text message and return its event id."""
        resp = await self.client.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": text}
        )
        if isinstance(resp, ErrorResponse):
            raise MatrixUserError(f"{self.user_id} could not send to {room_id}: {resp}")
        return str(resp.event_id)

    async def create_dm(self, invitee: str) -> str:
        """Create a direct chat with ``invitee`` invited and return its room id."""
        return await self.create_room(invite=[invitee], is_direct=True)

    async def create_room(
        self, *, invite: list[str] | None = None, name: str | None = None, is_direct: bool = False
    ) -> str:
        """Create a private room, invite ``invite`` and return the room id."""
        resp = await self.client.room_create(
            name=name,
            is_direct=is_direct,
            invite=invite or [],
            preset=RoomPreset.trusted_private_chat if is_direct else RoomPreset.private_chat,
        )
        if isinstance(resp, ErrorResponse):
            raise MatrixUserError(f"{self.user_id} could not create a room: {resp}")
        return str(resp.room_id)

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


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
