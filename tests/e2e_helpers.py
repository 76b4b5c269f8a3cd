"""Shared steps of the end-to-end tests: sandbox users, waiting for what they receive."""

from __future__ import annotations

import base64
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

from bridge.devtools.demo import SandboxUser
from bridge.devtools.matrix_user import MatrixUser, connect
from bridge.devtools.stack import LocalStack
from bridge.directory.fhir import IDNPS_SYSTEM, PROFESSION_SYSTEM

from helpers import wait_until

counter = itertools.count(1)

# A 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


NATIVE_PASSWORD = "correct horse battery"
"""The password of the native users the tests register."""


def unique(text: str) -> str:
    return f"{text} #{next(counter)}"


async def users_of(stack: LocalStack, http: ClientSession, type_name: str) -> list[SandboxUser]:
    sandbox = stack.sandboxes[type_name]
    async with http.get(f"{sandbox.url}/_sandbox/users") as resp:
        users = (await resp.json())["users"]
    return [SandboxUser(http, sandbox, user) for user in users]


async def conversation_titled(user: SandboxUser, title: str) -> str | None:
    for conversation in await user.conversations():
        if conversation.get("title") == title:
            return str(conversation["conversation_id"])
    return None


async def inbox_texts(user: SandboxUser) -> list[str]:
    return [m["text"] for m in await user.inbox()]


async def received(user: SandboxUser, text: str) -> dict[str, Any] | None:
    for message in await user.inbox():
        if message["text"] == text:
            return message
    return None


async def portal_of(stack: LocalStack, connector: str, conversation_id: str) -> str:
    assert stack.bridge is not None

    async def lookup() -> str | None:
        assert stack.bridge is not None
        return await stack.bridge.stores.portals.by_conversation(connector, conversation_id)

    return str(await wait_until(lookup, 30, "the portal room"))


class AppUser(SandboxUser):
    """A vendor user doing everything the vendor's app allows (USER_API.md v2)."""

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.http.request(method, f"{self.base}{path}", **kwargs) as resp:
            body = await resp.json(content_type=None) if resp.content_length != 0 else None
            if resp.status >= 400:
                raise AssertionError(f"{method} {path}: {resp.status} {body}")
            return body

    async def post(self, conversation_id: str, **fields: Any) -> str:
        body = await self._json("POST", f"/conversations/{conversation_id}/messages", json=fields)
        return str(body["message_id"])

    async def upload(self, data: bytes, mime_type: str, name: str) -> str:
        body = await self._json(
            "POST",
            "/files",
            data=data,
            headers={"Content-Type": mime_type, "X-Filename": name},
        )
        return str(body["file_id"])

    async def download(self, file_id: str) -> bytes:
        async with self.http.get(f"{self.base}/files/{file_id}") as resp:
            assert resp.status == 200, resp.status
            return await resp.read()

    async def edit(self, conversation_id: str, message_id: str, text: str) -> None:
        await self._json(
            "PATCH", f"/conversations/{conversation_id}/messages/{message_id}", json={"text": text}
        )

    async def delete(self, conversation_id: str, message_id: str) -> None:
        await self._json("DELETE", f"/conversations/{conversation_id}/messages/{message_id}")

    async def react(self, conversation_id: str, message_id: str, emoji: str) -> str:
        body = await self._json(
            "POST",
            f"/conversations/{conversation_id}/messages/{message_id}/reactions",
            json={"emoji": emoji},
        )
        return str(body["reaction_id"])

    async def unreact(self, conversation_id: str, message_id: str, reaction_id: str) -> None:
        await self._json(
            "DELETE",
            f"/conversations/{conversation_id}/messages/{message_id}/reactions/{reaction_id}",
        )

    async def read(self, conversation_id: str, message_id: str) -> None:
        await self._json(
            "POST", f"/conversations/{conversation_id}/read", json={"up_to": message_id}
        )

    async def type(self, conversation_id: str, typing: bool = True) -> None:
        await self._json(
            "POST", f"/conversations/{conversation_id}/typing", json={"typing": typing}
        )

    async def conversation(self, conversation_id: str) -> dict[str, Any]:
        return dict(await self._json("GET", f"/conversations/{conversation_id}"))

    async def message(self, conversation_id: str, message_id: str) -> dict[str, Any] | None:
        for message in (await self.conversation(conversation_id))["messages"]:
            if message["message_id"] == message_id:
                return dict(message)
        return None

    # The life of a conversation (USER_API.md: participants, leave, title and description).

    async def add(self, conversation_id: str, *refs: str) -> dict[str, Any]:
        """Adds people (IDNPS or Matrix IDs) to the conversation: the conversation after."""
        return dict(
            await self._json(
                "POST",
                f"/conversations/{conversation_id}/participants",
                json={"add": list(refs)},
            )
        )

    async def remove(self, conversation_id: str, *refs: str) -> dict[str, Any]:
        """Removes people from the conversation: the conversation after."""
        return dict(
            await self._json(
                "POST",
                f"/conversations/{conversation_id}/participants",
                json={"remove": list(refs)},
            )
        )

    async def try_remove(self, conversation_id: str, *refs: str) -> int:
        """The HTTP status of a removal (the vendor may not allow it)."""
        async with self.http.post(
            f"{self.base}/conversations/{conversation_id}/participants",
            json={"remove": list(refs)},
        ) as resp:
            return resp.status

    async def leave(self, conversation_id: str) -> None:
        await self._json("POST", f"/conversations/{conversation_id}/leave")

    async def rename(self, conversation_id: str, **fields: str | None) -> dict[str, Any]:
        """PATCHes the conversation's ``title`` and/or ``description``."""
        return dict(await self._json("PATCH", f"/conversations/{conversation_id}", json=fields))

    async def in_conversation(self, conversation_id: str) -> bool:
        """Whether the conversation is still in this user's list."""
        return any(c["conversation_id"] == conversation_id for c in await self.conversations())


async def app_users_of(stack: LocalStack, http: ClientSession, type_name: str) -> list[AppUser]:
    sandbox = stack.sandboxes[type_name]
    async with http.get(f"{sandbox.url}/_sandbox/users") as resp:
        users = (await resp.json())["users"]
    return [AppUser(http, sandbox, user) for user in users]


async def inbox_message(user: SandboxUser, predicate: Any) -> dict[str, Any] | None:
    for message in await user.inbox():
        if predicate(message):
            return message
    return None


class Proxy:
    """An HTTP server on 127.0.0.1 that stands between two parties of a test and hands every
    request to ``forward`` (subclasses decide what passes, what is changed or lost)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError


async def vendor_copy(user: SandboxUser, predicate: Any) -> dict[str, Any]:
    """The first message in ``user``'s inbox that matches ``predicate``, once it has arrived."""
    return await wait_until(lambda: inbox_message(user, predicate), 30, "the message at the vendor")


def file_named(name: str) -> Any:
    """Matches a vendor message whose attachment is called ``name``."""
    return lambda m: (m.get("attachment") or {}).get("name") == name


# --- Matrix events --------------------------------------------------------------------------------


def body_is(text: str) -> Any:
    """Matches a Matrix event whose body is ``text``."""
    return lambda e: (e.get("content") or {}).get("body") == text


def relation(event: dict[str, Any]) -> dict[str, Any]:
    """``m.relates_to`` of an event; empty for a redacted one."""
    return dict((event.get("content") or {}).get("m.relates_to") or {})


def redaction_of(event_id: str) -> Any:
    """Matches the redaction of ``event_id`` (``redacts`` at the top level or in the content,
    as room versions differ)."""
    return lambda e: (
        e.get("type") == "m.room.redaction"
        and event_id in (e.get("redacts"), (e.get("content") or {}).get("redacts"))
    )


def reply_content(text: str, event_id: str) -> dict[str, Any]:
    """A Matrix text message answering ``event_id``."""
    return {
        "msgtype": "m.text",
        "body": text,
        "m.relates_to": {"m.in_reply_to": {"event_id": event_id}},
    }


def edit_content(event_id: str, text: str) -> dict[str, Any]:
    """A Matrix edit replacing the text of ``event_id`` by ``text``."""
    return {
        "msgtype": "m.text",
        "body": f"* {text}",
        "m.new_content": {"msgtype": "m.text", "body": text},
        "m.relates_to": {"rel_type": "m.replace", "event_id": event_id},
    }


def edit_of(event_id: str, text: str) -> Any:
    """Matches a Matrix edit that replaces the text of ``event_id`` by ``text``."""
    return lambda e: (
        relation(e).get("event_id") == event_id
        and (e.get("content") or {}).get("m.new_content", {}).get("body") == text
    )


def reaction_content(event_id: str, key: str) -> dict[str, Any]:
    """A Matrix reaction ``key`` to ``event_id``."""
    return {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": key}}


async def published_capabilities(
    stack: LocalStack, http: ClientSession, room_id: str, access_token: str
) -> dict[str, dict[str, Any]]:
    """What a portal room's state says each connector supports, by connector id."""
    url = f"{stack.synapse.url}/_matrix/client/v3/rooms/{room_id}/state"
    async with http.get(url, headers={"Authorization": f"Bearer {access_token}"}) as resp:
        state = await resp.json()
    return {
        e["state_key"]: e["content"]["capabilities"]
        for e in state
        if e["type"] == "eu.eimis.bridge.capabilities"
    }


async def encrypted_native(stack: LocalStack, stores: Path, prefix: str) -> MatrixUser:
    """A new native user (``<prefix><n>``) on the stack's Synapse, on a device that encrypts
    (matrix-nio, its keys under ``stores``); ``async with`` it to close it."""
    localpart = f"{prefix}{next(counter)}"
    user_id, token = await stack.synapse.register_user(localpart, NATIVE_PASSWORD)
    return await connect(
        stack.synapse.url, user_id, token, encrypted=True, store_dir=stores / localpart
    )


async def vendor_dm(
    stack: LocalStack, user: SandboxUser, connector: str, native: MatrixUser, hello: str
) -> tuple[str, str]:
    """``user`` opens a conversation with ``native`` and says ``hello``; once ``native`` has
    read it: (the vendor conversation, the portal room)."""
    conversation = await user.start_conversation([native.user_id], unique("DM"))
    await user.send(conversation, hello)
    room_id = await portal_of(stack, connector, conversation)
    await native.accept_invites(room_id, timeout=30)
    await native.wait_for_message(room_id, lambda m: getattr(m, "body", None) == hello, 30)
    return conversation, room_id


@dataclass
class ThreeWay:
    """A conversation a vendor user (``starter``) opened with a user of another vendor
    (``other``) and a native Matrix user: each vendor side's conversation id, and the portal."""

    starter: AppUser
    starter_conv: str
    other: AppUser
    other_conv: str
    native: MatrixUser
    room_id: str
    stack: LocalStack

    def ghost(self, user: AppUser, connector: str) -> str:
        return f"@eimis_{connector}_{user.idnps}:{self.stack.synapse.server_name}"


@contextlib.asynccontextmanager
async def three_way(
    stack: LocalStack, http: ClientSession, starter: str, other: str, title: str, opener: str
) -> AsyncIterator[ThreeWay]:
    """A fresh three-way conversation (users picked in turn), once the opener reached the other
    vendor and the native user joined; the native user is closed afterwards."""
    n = next(counter)
    user_id, token = await stack.synapse.register_user(f"trio{n}", NATIVE_PASSWORD)
    native = await connect(stack.synapse.url, user_id, token)
    try:
        first = (await app_users_of(stack, http, starter))[n % 5]
        second = (await app_users_of(stack, http, other))[n % 5]
        conversation = await first.start_conversation([second.idnps, native.user_id], unique(title))
        text = unique(opener)
        await first.post(conversation, text=text)
        room_id = await portal_of(stack, starter, conversation)
        await native.accept_invites(room_id, timeout=30)
        at_other = await wait_until(
            lambda: inbox_message(second, lambda m: m["text"] == text), 30, f"the opener at {other}"
        )
        yield ThreeWay(
            first, conversation, second, str(at_other["conversation_id"]), native, room_id, stack
        )
    finally:
        await native.close()


# --- Reading Matrix as a native user, straight from the client-server API -------------------------


async def as_native(user: MatrixUser, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """(status, JSON answer) of a client-server API call made with ``user``'s access token."""
    client = user.client
    url = f"{client.homeserver}/_matrix/client/v3{path}"
    headers = {"Authorization": f"Bearer {client.access_token}"}
    async with (
        ClientSession() as http,
        http.request(method, url, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def event_as(user: MatrixUser, room_id: str, event_id: str) -> dict[str, Any]:
    status, event = await as_native(user, "GET", f"/rooms/{room_id}/event/{event_id}")
    assert status == 200, (status, event)
    return dict(event)


async def is_redacted(user: MatrixUser, room_id: str, event_id: str) -> bool:
    event = await event_as(user, room_id, event_id)
    return not event.get("content") and bool((event.get("unsigned") or {}).get("redacted_because"))


async def member_state(user: MatrixUser, room_id: str, member: str) -> dict[str, Any]:
    """``member``'s current m.room.member content in the room, as ``user`` sees it."""
    status, content = await as_native(user, "GET", f"/rooms/{room_id}/state/m.room.member/{member}")
    return dict(content) if status == 200 else {}


async def send_status(trio: ThreeWay, event_id: str, network: str) -> dict[str, Any]:
    """The final send status (not FAIL_RETRIABLE) the bridge sends the native user of ``trio``
    about ``event_id`` for one vendor (``network``): its content."""

    def match(e: dict[str, Any]) -> bool:
        content = e.get("content") or {}
        return (
            e.get("type") == "com.beeper.message_send_status"
            and (content.get("m.relates_to") or {}).get("event_id") == event_id
            and content.get("network") == network
            and content.get("status") != "FAIL_RETRIABLE"
        )

    event = await trio.native.wait_for_event(trio.room_id, match, 60)
    return dict(event["content"])


def practitioner_bundle(
    idnps: str, family: str, given: str, mxid: str, *, profession: str
) -> dict[str, Any]:
    """A FHIR Bundle (Annuaire Santé profile) listing a professional (``profession``: the
    profession code) and their native Matrix account."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "resource": {
                    "resourceType": "Practitioner",
                    "id": "p1",
                    "identifier": [{"system": IDNPS_SYSTEM, "value": idnps}],
                    "name": [{"use": "usual", "family": family, "given": [given]}],
                }
            },
            {
                "resource": {
                    "resourceType": "PractitionerRole",
                    "id": "r1",
                    "practitioner": {"reference": "Practitioner/p1"},
                    "code": [{"coding": [{"system": PROFESSION_SYSTEM, "code": profession}]}],
                    "endpoint": [{"reference": "Endpoint/e1"}],
                }
            },
            {
                "resource": {
                    "resourceType": "Endpoint",
                    "id": "e1",
                    "status": "active",
                    "address": f"matrix:u/{mxid.removeprefix('@')}",
                }
            },
        ],
    }
