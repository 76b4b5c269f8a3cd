"""The PandaLab connector against the real PandaLab sandbox, over real HTTP."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge.devtools.sandboxes import vendor_sandbox
from connectors.base import (
    ConnectorContext,
    ConnectorError,
    ConversationCreated,
    DeliveryReport,
    Location,
    Mention,
    MessageDeleted,
    MessageEdited,
    MessageReceived,
    NewConversation,
    OutboundAttachment,
    OutboundMessage,
    Participant,
    ReactionAdded,
    ReactionRemoved,
    ReadUpTo,
    RemoteAttachment,
    RemoteEvent,
    Sender,
    TypingChanged,
)
from connectors.idnps import Idnps
from connectors.kit.signing import sign
from connectors.pandalab import PandaLabConnector
from connectors.pandalab.connector import SANDBOX_WEBHOOK_SECRET, PandaLabSettings
from connectors.pandalab.convert import from_markdown, to_markdown
from connectors.pandalab.sandbox import USERS, create_app

from connector_helpers import Recorder, Served, mounted, rpps
from helpers import FakeClock, MemoryStore, wait_until

CONNECTOR_ID = "pl"
ALICE = USERS[0].idnps
BOB = USERS[1].idnps
OUTSIDER_MXID = "@carol:matrix.example.org"


OUTSIDER = rpps(42)


# --- Harness --------------------------------------------------------------------------------------


@dataclass
class Harness:
    sandbox: Served
    receiver: Served
    connector: PandaLabConnector
    recorder: Recorder
    http: aiohttp.ClientSession
    clock: FakeClock

    @property
    def token_requests(self) -> int:
        """How many times the sandbox was asked for an access token."""
        return self.sandbox.paths.count("/oauth/token")

    @property
    def webhook_url(self) -> str:
        return f"{self.receiver.url}/connectors/{CONNECTOR_ID}/webhook"

    async def user_post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.http.post(f"{self.sandbox.url}/_sandbox/{path}", json=body) as resp:
            assert resp.status == 201, await resp.text()
            data: dict[str, Any] = await resp.json()
            return data

    async def user_get(self, path: str) -> dict[str, Any]:
        async with self.http.get(f"{self.sandbox.url}/_sandbox/{path}") as resp:
            assert resp.status == 200, await resp.text()
            data: dict[str, Any] = await resp.json()
            return data

    async def user_call(
        self, method: str, path: str, body: dict[str, Any] | None = None, expect: int = 200
    ) -> Any:
        """A user-side API call that must answer ``expect``; its JSON body (None when empty)."""
        url = f"{self.sandbox.url}/_sandbox/{path}"
        async with self.http.request(method, url, json=body) as resp:
            text = await resp.text()
            assert resp.status == expect, text
            return json.loads(text) if text else None

    async def user_upload(self, idnps: str, name: str, mime_type: str, data: bytes) -> str:
        headers = {"Content-Type": mime_type, "X-Filename": name}
        url = f"{self.sandbox.url}/_sandbox/users/{idnps}/files"
        async with self.http.post(url, data=data, headers=headers) as resp:
            assert resp.status == 201, await resp.text()
            return str((await resp.json())["file_id"])

    async def user_download(self, idnps: str, file_id: str) -> bytes:
        url = f"{self.sandbox.url}/_sandbox/users/{idnps}/files/{file_id}"
        async with self.http.get(url) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.read()

    async def view(self, idnps: str, conversation_id: str) -> dict[str, Any]:
        """The user's conversation view (messages, read markers, typing, delivery reports)."""
        return dict(await self.user_get(f"users/{idnps}/conversations/{conversation_id}"))

    async def open_conversation(self, creator: str, with_: list[str], title: str) -> str:
        data = await self.user_post(
            f"users/{creator}/conversations", {"with": with_, "title": title}
        )
        return str(data["conversation_id"])

    async def write(self, author: str, conversation_id: str, text: str) -> str:
        path = f"users/{author}/conversations/{conversation_id}/messages"
        return str((await self.user_post(path, {"text": text}))["message_id"])

    def make_connector(self, **overrides: Any) -> PandaLabConnector:
        return new_connector(
            self.sandbox, self.recorder, self.clock, self.connector.ctx.public_base_url, **overrides
        )


def new_connector(
    sandbox: Served,
    recorder: Recorder,
    clock: FakeClock,
    public_base_url: str,
    **overrides: Any,
) -> PandaLabConnector:
    """A connector to ``sandbox`` with the sandbox's settings, its token clock on ``clock``."""
    settings = PandaLabSettings.model_validate(
        vendor_sandbox("pandalab").settings(sandbox.url) | overrides
    )
    ctx = ConnectorContext(
        connector_id=CONNECTOR_ID,
        settings=settings,
        emit=recorder,
        store=MemoryStore(),
        public_base_url=public_base_url,
    )
    connector = PandaLabConnector(ctx)
    connector.client.clock = clock
    return connector


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    clock = FakeClock()
    sandbox = Served(create_app(retry_initial=0.05, retry_max=0.2, clock=clock))
    await sandbox.start()
    recorder = Recorder()
    async with aiohttp.ClientSession() as http:
        # The receiver's port is known once it listens: build the connector, mount its routes,
        # listen, then give the connector its public URL before start() registers the webhook.
        connector = new_connector(sandbox, recorder, clock, public_base_url="")
        receiver = Served(mounted(connector, CONNECTOR_ID))
        await receiver.start()
        connector.ctx.public_base_url = f"{receiver.url}/connectors/{CONNECTOR_ID}"
        h = Harness(sandbox, receiver, connector, recorder, http, clock)
        await h.connector.start()
        try:
            yield h
        finally:
            await h.connector.stop()
            await h.receiver.close()
            await sandbox.close()


# --- Vendor -> bridge -----------------------------------------------------------------------------


async def test_web_routes_serve_the_webhook(harness: Harness) -> None:
    [route] = harness.connector.web_routes()
    assert isinstance(route, web.RouteDef)
    assert route.method == "POST" and route.path == "/webhook"
    assert harness.connector.webhook_url == harness.webhook_url


async def test_user_conversation_reaches_emit(harness: Harness) -> None:
    conv = await harness.open_conversation(ALICE, [BOB, OUTSIDER, OUTSIDER_MXID], "Patient X")

    await wait_until(lambda: len(harness.recorder.events) == 1, what="the conversation event")
    [event] = harness.recorder.events
    assert isinstance(event, ConversationCreated)
    assert event.conversation_id == conv
    assert event.creator == ALICE
    assert event.members == (ALICE, BOB)
    assert event.participants == (Participant(idnps=OUTSIDER), Participant(mxid=OUTSIDER_MXID))
    assert event.title == "Patient X"
    assert event.timestamp.tzinfo is not None
    assert isinstance(event.creator, Idnps)


async def test_messages_arrive_in_order(harness: Harness) -> None:
    conv = await harness.open_conversation(ALICE, [BOB, OUTSIDER], "Suivi")
    sent = [
        (ALICE, await harness.write(ALICE, conv, "premier")),
        (BOB, await harness.write(BOB, conv, "**deuxième**")),
        (ALICE, await harness.write(ALICE, conv, "troisième")),
    ]

    await wait_until(lambda: len(harness.recorder.events) == 4, what="three message events")
    messages = [m for m in harness.recorder.events[1:] if isinstance(m, MessageReceived)]
    assert len(messages) == 3
    assert [(m.sender, m.message_id) for m in messages] == sent
    assert [m.text for m in messages] == ["premier", "**deuxième**", "troisième"]
    assert {m.conversation_id for m in messages} == {conv}
    assert len({m.event_id for m in harness.recorder.events}) == 4
    assert messages[0].timestamp <= messages[2].timestamp
    assert messages[0].timestamp.utcoffset() is not None


async def test_failed_emit_is_not_acknowledged_and_is_redelivered(harness: Harness) -> None:
    harness.recorder.fail_next = 1
    conv = await harness.open_conversation(ALICE, [OUTSIDER], "Redelivery")

    await wait_until(lambda: len(harness.recorder.events) == 1, what="the redelivered event")
    assert harness.recorder.failures == 1
    assert harness.recorder.events[0].conversation_id == conv


# --- Webhook refusals -----------------------------------------------------------------------------


def envelope(kind: str = "conversation.created", **data: Any) -> dict[str, Any]:
    conversation = {
        "id": "c0ffee00-0000-4000-8000-000000000001",
        "title": None,
        "created_by": str(ALICE),
        "members": [str(ALICE)],
        "external_participants": [{"ref": str(OUTSIDER)}],
    }
    return {
        "id": "e0000000-0000-4000-8000-000000000001",
        "type": kind,
        "created_at": datetime.now(UTC).isoformat(),
        "data": data or {"conversation": conversation},
    }


async def post_webhook(
    harness: Harness,
    body: bytes,
    *,
    secret: str = SANDBOX_WEBHOOK_SECRET,
    timestamp: int | None = None,
    signature: str | None = None,
) -> tuple[int, dict[str, Any]]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    headers = {
        "Content-Type": "application/json",
        "X-PandaLab-Timestamp": ts,
        "X-PandaLab-Signature": signature or sign(secret, ts, body),
    }
    async with harness.http.post(harness.webhook_url, data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_webhook_accepts_a_signed_event(harness: Harness) -> None:
    status, _ = await post_webhook(harness, json.dumps(envelope()).encode())
    assert status == 200
    [event] = harness.recorder.events
    assert event.event_id == "e0000000-0000-4000-8000-000000000001"


@pytest.mark.parametrize(
    ("case", "expected_status", "expected_words"),
    [
        ("bad signature", 401, "signature"),
        ("wrong secret", 401, "signature"),
        ("stale timestamp", 401, "replay window"),
        ("future timestamp", 401, "replay window"),
        ("missing headers", 401, "required"),
        ("malformed json", 400, "JSON"),
        ("unknown type", 400, "unknown event type"),
        ("invalid idnps", 400, "IDNPS"),
        ("missing field", 400, "data.conversation.members"),
    ],
)
async def test_webhook_refusals_emit_nothing(
    harness: Harness, case: str, expected_status: int, expected_words: str
) -> None:
    body = json.dumps(envelope()).encode()
    kwargs: dict[str, Any] = {}
    if case == "bad signature":
        kwargs["signature"] = "sha256=" + "0" * 64
    elif case == "wrong secret":
        kwargs["secret"] = "not-the-secret"
    elif case == "stale timestamp":
        kwargs["timestamp"] = int(time.time()) - 301
    elif case == "future timestamp":
        kwargs["timestamp"] = int(time.time()) + 301
    elif case == "malformed json":
        body = b'{"id": "e1", "type": '
    elif case == "unknown type":
        body = json.dumps(envelope("conversation.deleted")).encode()
    elif case == "invalid idnps":
        bad = envelope()
        bad["data"]["conversation"]["members"] = ["812345678901"]
        body = json.dumps(bad).encode()
    elif case == "missing field":
        bad = envelope()
        del bad["data"]["conversation"]["members"]
        body = json.dumps(bad).encode()

    if case == "missing headers":
        async with harness.http.post(harness.webhook_url, data=body) as resp:
            status, answer = resp.status, await resp.json()
    else:
        status, answer = await post_webhook(harness, body, **kwargs)

    assert status == expected_status
    assert expected_words in answer["message"]
    assert answer["error"]
    assert harness.recorder.events == []


async def test_stale_timestamp_refused_even_with_a_valid_signature(harness: Harness) -> None:
    old = int(time.time()) - 3600
    status, answer = await post_webhook(harness, json.dumps(envelope()).encode(), timestamp=old)
    assert status == 401
    assert "300 s replay window" in answer["message"]
    assert harness.recorder.events == []


async def test_refusal_logs_no_content(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bad = envelope(
        "message.created",
        message={
            "id": "m1",
            "conversation_id": "c1",
            "author": "8123",
            "markdown": "secret diagnosis",
            "created_at": datetime.now(UTC).isoformat(),
        },
    )
    status, _ = await post_webhook(harness, json.dumps(bad).encode())
    assert status == 400
    assert "secret diagnosis" not in caplog.text
    assert SANDBOX_WEBHOOK_SECRET not in caplog.text


# --- Bridge -> vendor -----------------------------------------------------------------------------


async def test_outbound_conversation_and_message_show_once(harness: Harness) -> None:
    request = NewConversation(
        request_id="portal-1",
        title="Depuis Matrix",
        members=(ALICE, BOB),
        external=(
            Sender(mxid=OUTSIDER_MXID, display_name="Carol"),
            Sender(mxid="@dr.x:matrix.example.org", display_name="Dr X", idnps=OUTSIDER),
        ),
    )
    conv = await harness.connector.create_conversation(request)
    assert await harness.connector.create_conversation(request) == conv

    listing = await harness.user_get(f"users/{ALICE}/conversations")
    mine = [c for c in listing["conversations"] if c["conversation_id"] == conv]
    assert len(listing["conversations"]) == 1 and len(mine) == 1
    assert mine[0]["members"] == [ALICE, BOB]
    assert mine[0]["external"] == [OUTSIDER_MXID, OUTSIDER]
    assert mine[0]["title"] == "Depuis Matrix"

    message = OutboundMessage(
        request_id="$event-1",
        sender=Sender(mxid=OUTSIDER_MXID, display_name="Carol"),
        text="Bonjour *Camille*",
        html="Bonjour <em>Camille</em>",
        timestamp=datetime.now(UTC),
    )
    first = await harness.connector.send_message(conv, message)
    assert await harness.connector.send_message(conv, message) == first

    inbox = (await harness.user_get(f"users/{ALICE}/inbox"))["messages"]
    assert [(m["message_id"], m["sender"], m["sender_name"], m["text"]) for m in inbox] == [
        (first, OUTSIDER_MXID, "Carol", "Bonjour *Camille*")
    ]

    # No echo: a user message written after ours is the first event the webhook delivers.
    reply = await harness.write(ALICE, conv, "Reçu")
    await wait_until(lambda: len(harness.recorder.events) == 1, what="the reply")
    [event] = harness.recorder.events
    assert isinstance(event, MessageReceived) and event.message_id == reply


async def test_outbound_message_by_idnps_sender(harness: Harness) -> None:
    conv = await harness.connector.create_conversation(
        NewConversation("portal-2", None, (ALICE,), (Sender("@x:example.org", "X"),))
    )
    sender = Sender(mxid="@dr.y:example.org", display_name="Dr Y", idnps=OUTSIDER)
    await harness.connector.send_message(conv, message("$e2", "hello", sender=sender))
    [received] = (await harness.user_get(f"users/{ALICE}/inbox"))["messages"]
    assert received["sender"] == OUTSIDER


async def test_vendor_refusals_map_to_permanent_errors(harness: Harness) -> None:
    with pytest.raises(ConnectorError) as unknown_conv:
        await harness.connector.send_message(
            "no-such-conversation",
            message("$e3", "hi", sender=Sender("@x:example.org", "X")),
        )
    assert unknown_conv.value.retriable is False
    assert "404" in str(unknown_conv.value) and "conversation_not_found" in str(unknown_conv.value)

    with pytest.raises(ConnectorError) as unknown_member:
        await harness.connector.create_conversation(
            NewConversation("portal-3", None, (OUTSIDER,), (Sender("@x:example.org", "X"),))
        )
    assert unknown_member.value.retriable is False


async def test_get_user(harness: Harness) -> None:
    user = await harness.connector.get_user(ALICE)
    assert user is not None
    assert user.idnps == ALICE and isinstance(user.idnps, Idnps)
    assert (user.given_name, user.family_name, user.profession) == (
        USERS[0].given_name,
        USERS[0].family_name,
        USERS[0].profession,
    )
    assert await harness.connector.get_user(OUTSIDER) is None


# --- Tokens ---------------------------------------------------------------------------------------


async def test_token_is_cached(harness: Harness) -> None:
    fetched = harness.token_requests
    for _ in range(3):
        assert await harness.connector.get_user(ALICE) is not None
    assert harness.token_requests - fetched == 0  # the token fetched by start() is still good


async def test_token_renewed_before_expiry(harness: Harness) -> None:
    fetched = harness.token_requests
    # Inside the client's safety margin, before the vendor's expiry:
    harness.clock.advance(3600 - 10)
    assert await harness.connector.get_user(ALICE) is not None
    assert harness.token_requests - fetched == 1
    assert await harness.connector.get_user(ALICE) is not None
    assert harness.token_requests - fetched == 1


async def test_token_refreshed_once_on_401(harness: Harness) -> None:
    fetched = harness.token_requests
    harness.connector.client.clock = FakeClock()  # the client believes its token still fresh
    harness.clock.advance(3601)  # ... but the vendor has expired it
    assert await harness.connector.get_user(ALICE) is not None
    assert harness.token_requests - fetched == 1


async def test_token_refused_twice_says_the_credentials_are_rejected(harness: Harness) -> None:
    """Nothing passes until an operator fixes the credentials: the bridge waits (and alerts)
    instead of failing the deliveries for good."""
    fetched = harness.token_requests
    harness.connector.client.clock = FakeClock()
    harness.clock.step = 10_000  # the vendor expires every token before it is used
    with pytest.raises(ConnectorError) as refused:
        await harness.connector.get_user(ALICE)
    assert refused.value.credentials_rejected and refused.value.retriable
    assert "401" in str(refused.value)
    assert harness.token_requests - fetched == 1  # one refresh, no loop


async def test_bad_credentials_fail_start_permanently(harness: Harness) -> None:
    connector = harness.make_connector(client_secret="not-the-s3cret-xyz")
    try:
        with pytest.raises(ConnectorError) as refused:
            await connector.start()
    finally:
        await connector.stop()
    assert refused.value.credentials_rejected  # the operator must act: an alert, not retries
    assert "invalid_client" in str(refused.value)
    assert "s3cret-xyz" not in str(refused.value)


# --- Vendor down ----------------------------------------------------------------------------------


async def test_vendor_down_is_a_retriable_error(harness: Harness) -> None:
    conv = await harness.connector.create_conversation(
        NewConversation("portal-4", None, (ALICE,), (Sender("@x:example.org", "X"),))
    )
    outgoing = message("$e4", "hi", sender=Sender("@x:example.org", "X"))
    await harness.sandbox.down()
    with pytest.raises(ConnectorError) as down:
        await harness.connector.send_message(conv, outgoing)
    assert down.value.retriable is True

    await harness.sandbox.start()
    sent = await harness.connector.send_message(conv, outgoing)
    inbox = (await harness.user_get(f"users/{ALICE}/inbox"))["messages"]
    assert [m["message_id"] for m in inbox] == [sent]


async def test_vendor_5xx_is_retriable(harness: Harness) -> None:
    async def boom(request: web.Request) -> web.Response:
        return web.json_response({"error": "overloaded", "message": "try later"}, status=503)

    async def slow_down(request: web.Request) -> web.Response:
        return web.json_response({"error": "rate_limited"}, status=429)

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "t", "token_type": "Bearer", "expires_in": 60})

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    app.router.add_get("/api/v1/users/{idnps}", boom)
    app.router.add_post("/api/v1/conversations", slow_down)
    fake = Served(app)
    await fake.start()
    connector = harness.make_connector(api_url=fake.url)
    try:
        with pytest.raises(ConnectorError) as server_error:
            await connector.get_user(ALICE)
        assert server_error.value.retriable is True
        assert "503" in str(server_error.value)
        with pytest.raises(ConnectorError) as throttled:
            await connector.create_conversation(
                NewConversation("k", None, (ALICE,), (Sender("@x:example.org", "X"),))
            )
        assert throttled.value.retriable is True
    finally:
        await connector.stop()
        await fake.close()


# --- Settings -------------------------------------------------------------------------------------


def test_settings_and_capabilities() -> None:
    settings = PandaLabSettings.model_validate(
        vendor_sandbox("pandalab").settings("http://127.0.0.1:1")
    )
    assert PandaLabConnector.Settings is PandaLabSettings
    assert settings.replay_window_s == 300
    assert "pandalab-sandbox-secret" not in repr(settings)
    assert PandaLabConnector.type_name == "pandalab"
    assert PandaLabConnector.capabilities.formatting == "markdown"
    assert PandaLabConnector.capabilities.max_text_length == 10000
    assert isinstance(vendor_sandbox("pandalab").app(), web.Application)


# --- v2: rich messages ----------------------------------------------------------------------------

CAROL = Sender(mxid=OUTSIDER_MXID, display_name="Carol")
DR_X = Sender(mxid="@dr.x:matrix.example.org", display_name="Dr X", idnps=OUTSIDER)
CHUNK = 64 * 1024


def file_attachment(
    data: bytes, name: str, mime_type: str, opened: list[str] | None = None
) -> OutboundAttachment:
    """A file the bridge would stream from its media store, in 64 KiB chunks."""

    @asynccontextmanager
    async def open_file() -> AsyncIterator[AsyncIterator[bytes]]:
        if opened is not None:
            opened.append(name)

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(data), CHUNK):
                yield data[start : start + CHUNK]

        yield chunks()

    return OutboundAttachment(name, mime_type, len(data), open_file)


def message(
    request_id: str, text: str = "", sender: Sender = CAROL, **fields: Any
) -> OutboundMessage:
    return OutboundMessage(
        request_id=request_id, sender=sender, text=text, timestamp=datetime.now(UTC), **fields
    )


async def read_attachment(
    connector: PandaLabConnector, attachment: RemoteAttachment
) -> tuple[bytes, int]:
    """The file's bytes through ``open_attachment``, and the largest chunk it streamed."""
    parts: list[bytes] = []
    async with await connector.open_attachment(attachment) as chunks:
        async for chunk in chunks:
            parts.append(chunk)
    return b"".join(parts), max((len(p) for p in parts), default=0)


def events_of(harness: Harness, kind: type[RemoteEvent]) -> list[Any]:
    return [e for e in harness.recorder.events if isinstance(e, kind)]


def by_id(messages: list[dict[str, Any]], message_id: str) -> dict[str, Any]:
    [found] = [m for m in messages if m["message_id"] == message_id]
    return found


async def bridged_conversation(harness: Harness, request_id: str = "portal-v2") -> str:
    """A conversation the bridge opened: Alice and Bob with Carol (Matrix) and Dr X (IDNPS)."""
    return await harness.connector.create_conversation(
        NewConversation(request_id, "V2", (ALICE, BOB), (CAROL, DR_X))
    )


def test_v2_capabilities() -> None:
    caps = PandaLabConnector.capabilities
    assert (caps.formatting, caps.max_text_length, caps.long_text) == ("markdown", 10000, "split")
    assert set(caps.files) == {"m.image", "m.file", "m.audio", "m.video"}
    for limit in caps.files.values():
        assert limit.max_size == 512 * 1024 * 1024
        assert limit.allows("application/x-anything") and limit.allows("video/mp4")
    assert caps.locations and caps.mentions and caps.replies and caps.edits and caps.deletions
    assert caps.reactions and caps.read_receipts and caps.typing and caps.delivery_status


# Vendor -> bridge


async def test_v2_inbound_reply_mentions_file_and_location(harness: Harness) -> None:
    conv = await bridged_conversation(harness)
    path = f"users/{BOB}/conversations/{conv}/messages"
    first = await harness.write(ALICE, conv, "Bonjour")
    reply = await harness.user_post(
        path,
        {
            "text": "@Camille Martin et @Carol, voir ci-dessous",
            "reply_to": first,
            "mentions": [str(ALICE), OUTSIDER_MXID],
        },
    )
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
    file_id = await harness.user_upload(BOB, "radio.png", "image/png", png)
    with_file = await harness.user_post(path, {"text": "La radio", "file_id": file_id})
    located = await harness.user_post(
        path, {"text": "Ici", "location": {"lat": 48.8566, "lon": 2.3522, "label": "Cabinet"}}
    )

    await wait_until(lambda: len(events_of(harness, MessageReceived)) == 4, what="four messages")
    _, answer, filed, placed = events_of(harness, MessageReceived)
    assert answer.message_id == reply["message_id"] and answer.reply_to == first
    assert answer.text == "@Camille Martin et @Carol, voir ci-dessous"
    assert answer.mentions == (
        Mention("Camille Martin", idnps=ALICE),
        Mention("Carol", mxid=OUTSIDER_MXID),
    )
    assert answer.message_kind == "text" and answer.attachment is None and answer.location is None

    assert filed.message_id == with_file["message_id"] and filed.text == "La radio"
    assert filed.attachment is not None
    assert (filed.attachment.name, filed.attachment.mime_type) == ("radio.png", "image/png")
    assert filed.attachment.size == len(png)
    assert filed.attachment.source == f"{harness.sandbox.url}/api/v1/files/{file_id}"
    data, _ = await read_attachment(harness.connector, filed.attachment)
    assert data == png

    assert placed.message_id == located["message_id"]
    assert placed.location == Location(48.8566, 2.3522, "Cabinet")
    assert len({e.event_id for e in harness.recorder.events}) == len(harness.recorder.events)


async def test_v2_open_attachment_streams_a_10_mb_file(harness: Harness) -> None:
    conv = await harness.open_conversation(ALICE, [OUTSIDER], "Gros fichier")
    big = os.urandom(10_000_000)
    file_id = await harness.user_upload(ALICE, "scanner.dcm", "application/dicom", big)
    await harness.user_post(
        f"users/{ALICE}/conversations/{conv}/messages", {"text": "", "file_id": file_id}
    )
    await wait_until(lambda: len(events_of(harness, MessageReceived)) == 1, what="the file message")
    [event] = events_of(harness, MessageReceived)
    assert event.attachment is not None and event.attachment.size == len(big)

    data, largest_chunk = await read_attachment(harness.connector, event.attachment)
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(big).hexdigest()
    assert largest_chunk <= CHUNK  # streamed, not read whole


async def test_v2_open_attachment_keeps_the_token_on_the_api_origin(harness: Harness) -> None:
    elsewhere = RemoteAttachment("x.pdf", "application/pdf", 1, "http://127.0.0.2:9/api/v1/files/x")
    with pytest.raises(ConnectorError) as refused:
        await read_attachment(harness.connector, elsewhere)
    assert refused.value.retriable is False
    assert "origin" in str(refused.value)

    gone = RemoteAttachment("x.pdf", "application/pdf", 1, f"{harness.sandbox.url}/api/v1/files/x")
    with pytest.raises(ConnectorError) as missing:
        await read_attachment(harness.connector, gone)
    assert missing.value.retriable is False and "404" in str(missing.value)


async def test_v2_inbound_edit_reactions_read_typing_delete(harness: Harness) -> None:
    conv = await harness.open_conversation(ALICE, [BOB, OUTSIDER], "Actions")
    mid = await harness.write(ALICE, conv, "première version")
    alice = f"users/{ALICE}/conversations/{conv}"
    bob = f"users/{BOB}/conversations/{conv}"
    await harness.user_call("PATCH", f"{alice}/messages/{mid}", {"text": "seconde version"})
    reaction = await harness.user_call(
        "POST", f"{bob}/messages/{mid}/reactions", {"emoji": "👍"}, expect=201
    )
    reaction_id = reaction["reaction_id"]
    await harness.user_call("DELETE", f"{bob}/messages/{mid}/reactions/{reaction_id}", expect=204)
    await harness.user_call("POST", f"{bob}/read", {"up_to": mid}, expect=204)
    await harness.user_call("POST", f"{bob}/typing", {"typing": True}, expect=204)
    await harness.user_call("DELETE", f"{alice}/messages/{mid}", expect=204)

    await wait_until(lambda: len(harness.recorder.events) == 8, what="eight events")
    _, _, edited, added, removed, read, typing, deleted = harness.recorder.events
    assert isinstance(edited, MessageEdited)
    assert (edited.message_id, edited.sender, edited.text) == (mid, ALICE, "seconde version")
    assert edited.conversation_id == conv and edited.mentions == ()
    assert isinstance(added, ReactionAdded)
    assert (added.reaction_id, added.message_id, added.sender, added.key) == (
        reaction_id,
        mid,
        BOB,
        "👍",
    )
    assert isinstance(removed, ReactionRemoved)
    assert (removed.reaction_id, removed.message_id, removed.sender) == (reaction_id, mid, BOB)
    assert isinstance(read, ReadUpTo) and (read.sender, read.message_id) == (BOB, mid)
    assert isinstance(typing, TypingChanged) and (typing.sender, typing.typing) == (BOB, True)
    assert isinstance(deleted, MessageDeleted)
    assert (deleted.message_id, deleted.sender, deleted.conversation_id) == (mid, ALICE, conv)
    assert len({e.event_id for e in harness.recorder.events}) == 8
    assert all(e.timestamp.utcoffset() is not None for e in harness.recorder.events)


# Bridge -> vendor


async def test_v2_outbound_reply_mentions_kinds_location(harness: Harness) -> None:
    conv = await bridged_conversation(harness)
    asked = await harness.write(ALICE, conv, "Une question")
    mentions = (Mention("Camille Martin", idnps=ALICE), Mention("Carol", mxid=OUTSIDER_MXID))
    answer = await harness.connector.send_message(
        conv,
        message(
            "$v2-1",
            "@Camille Martin, voyez avec @Carol",
            sender=DR_X,
            reply_to=asked,
            mentions=mentions,
            message_kind="notice",
        ),
    )
    emote = await harness.connector.send_message(
        conv, message("$v2-2", "réfléchit", message_kind="emote")
    )
    place = Location(48.8566, 2.3522, "Cabinet")
    located = await harness.connector.send_message(conv, message("$v2-3", "", location=place))

    inbox = (await harness.user_get(f"users/{BOB}/inbox"))["messages"]
    replied = by_id(inbox, answer)
    assert replied["reply_to"] == asked and replied["kind"] == "notice"
    assert replied["sender"] == OUTSIDER and replied["sender_name"] == "Dr X"
    assert replied["mentions"] == [str(ALICE), OUTSIDER_MXID]
    assert replied["text"] == f"@[Camille Martin]({ALICE}), voyez avec @[Carol]({OUTSIDER_MXID})"
    assert by_id(inbox, emote)["kind"] == "emote"
    assert by_id(inbox, emote)["reply_to"] is None
    assert by_id(inbox, located)["location"] == {"lat": 48.8566, "lon": 2.3522, "label": "Cabinet"}


async def test_v2_outbound_file_is_streamed_and_arrives_intact(harness: Harness) -> None:
    conv = await bridged_conversation(harness)
    data = os.urandom(3 * 1024 * 1024 + 17)
    opened: list[str] = []
    outgoing = message(
        "$file-1",
        "Le compte rendu",
        attachment=file_attachment(data, "cr.pdf", "application/pdf", opened),
    )
    sent = await harness.connector.send_message(conv, outgoing)
    assert opened == ["cr.pdf"]

    received = by_id((await harness.user_get(f"users/{ALICE}/inbox"))["messages"], sent)
    attachment = received["attachment"]
    assert (attachment["name"], attachment["mime_type"], attachment["size"]) == (
        "cr.pdf",
        "application/pdf",
        len(data),
    )
    assert received["text"] == "Le compte rendu"
    downloaded = await harness.user_download(ALICE, attachment["file_id"])
    assert hashlib.sha256(downloaded).hexdigest() == hashlib.sha256(data).hexdigest()

    # A retry of the same delivery (lost answer) shows the message once.
    assert await harness.connector.send_message(conv, outgoing) == sent
    inbox = (await harness.user_get(f"users/{ALICE}/inbox"))["messages"]
    assert [m["message_id"] for m in inbox] == [sent]


async def test_v2_outbound_file_over_100_mib_is_refused_before_upload(harness: Harness) -> None:
    conv = await bridged_conversation(harness)
    opened: list[str] = []
    huge = file_attachment(b"", "film.mp4", "video/mp4", opened)
    huge = OutboundAttachment(huge.name, huge.mime_type, 512 * 1024 * 1024 + 1, huge.open)
    with pytest.raises(ConnectorError) as refused:
        await harness.connector.send_message(conv, message("$huge", attachment=huge))
    assert refused.value.retriable is False
    assert opened == [] and "/api/v1/uploads" not in harness.sandbox.paths


async def test_v2_upload_reopens_the_file_after_a_refused_token(harness: Harness) -> None:
    client = harness.connector.client
    opened: list[str] = []
    note = file_attachment(b"tiny note", "note.txt", "text/plain", opened)
    file_id, upload_url = await client.create_upload(
        {"name": "note.txt", "mime_type": "text/plain", "size": note.size}, "upload-key"
    )
    client.clock = FakeClock()  # the client believes its token still fresh
    harness.clock.advance(3601)  # ... but the vendor has expired it
    await client.upload(upload_url, note.open, note.mime_type)
    assert opened == ["note.txt", "note.txt"]
    assert file_id


async def test_v2_outbound_edit_and_delete(harness: Harness) -> None:
    conv = await bridged_conversation(harness)
    sent = await harness.connector.send_message(conv, message("$ed-1", "version 1"))
    mention = (Mention("Camille Martin", idnps=ALICE),)
    await harness.connector.edit_message(
        conv, sent, message("$ed-2", "version 2 pour @Camille Martin", mentions=mention)
    )
    edited = by_id((await harness.user_get(f"users/{ALICE}/inbox"))["messages"], sent)
    assert edited["edited"] is True
    assert edited["text"] == f"version 2 pour @[Camille Martin]({ALICE})"
    assert edited["mentions"] == [str(ALICE)]

    assert await harness.connector.delete_message(conv, sent, CAROL) is True
    assert await harness.connector.delete_message(conv, sent, CAROL) is True  # again: a success
    deleted = by_id((await harness.user_get(f"users/{ALICE}/inbox"))["messages"], sent)
    assert deleted["deleted"] is True and deleted["text"] == ""
    # 404: no error, but nothing was deleted, and the bridge is told so (never "delivered").
    assert await harness.connector.delete_message(conv, "no-such-message", CAROL) is False

    with pytest.raises(ConnectorError) as unknown:
        await harness.connector.edit_message(conv, "no-such-message", message("$ed-3", "secret"))
    assert unknown.value.retriable is False and "404" in str(unknown.value)
    assert "secret" not in str(unknown.value)


async def test_v2_outbound_unknown_reply_is_a_permanent_error(harness: Harness) -> None:
    conv = await bridged_conversation(harness)
    with pytest.raises(ConnectorError) as refused:
        await harness.connector.send_message(
            conv, message("$re-1", "diagnostic confidentiel", reply_to="no-such-message")
        )
    assert refused.value.retriable is False
    assert "message_not_found" in str(refused.value)
    assert "confidentiel" not in str(refused.value)


async def test_v2_outbound_reactions_read_typing_delivery(harness: Harness) -> None:
    conv = await bridged_conversation(harness)
    asked = await harness.write(ALICE, conv, "Une question")
    connector = harness.connector

    reaction_id = await connector.add_reaction(conv, asked, CAROL, "👍", "$react-1")
    assert await connector.add_reaction(conv, asked, CAROL, "👍", "$react-1") == reaction_id
    view = await harness.view(ALICE, conv)
    assert by_id(view["messages"], asked)["reactions"] == [
        {"reaction_id": reaction_id, "sender": OUTSIDER_MXID, "emoji": "👍"}
    ]
    assert await connector.remove_reaction(conv, asked, reaction_id, CAROL) is True
    await connector.remove_reaction(conv, asked, reaction_id, CAROL)  # again: no error
    assert by_id((await harness.view(ALICE, conv))["messages"], asked)["reactions"] == []

    await connector.mark_read(conv, CAROL, asked)
    assert (await harness.view(ALICE, conv))["read_up_to"] == {OUTSIDER_MXID: asked}

    await connector.set_typing(conv, DR_X, True)
    assert (await harness.view(ALICE, conv))["typing"] == [str(OUTSIDER)]
    await connector.set_typing(conv, DR_X, False)
    assert (await harness.view(ALICE, conv))["typing"] == []

    report = DeliveryReport("degraded", "Le tableau a été envoyé comme texte.")
    await connector.report_delivery(conv, asked, report)
    mine = by_id((await harness.view(ALICE, conv))["messages"], asked)
    assert mine["delivery"] == [{"status": "degraded", "detail": report.detail}]

    # Nothing the bridge did comes back through the webhook (no echo).
    await harness.write(ALICE, conv, "fin")
    await wait_until(lambda: len(harness.recorder.events) == 2, what="the last message")
    assert [type(e) for e in harness.recorder.events] == [MessageReceived, MessageReceived]


# Conversions


def test_v2_mentions_round_trip() -> None:
    mentions = (
        Mention("Jean", idnps=OUTSIDER),
        Mention("Jean Dupont", mxid="@jd:example.org"),
        Mention("Dr [X]", idnps=ALICE),
    )
    text = "@Jean Dupont, @Jean et @Dr [X] ; @Jeanne n'est pas mentionnée"
    markdown = to_markdown(text, None, mentions)
    assert markdown == (
        f"@[Jean Dupont](@jd:example.org), @[Jean]({OUTSIDER}) et @[Dr \\[X\\]]({ALICE}) ; "
        "@Jeanne n'est pas mentionnée"
    )
    back, found = from_markdown(markdown, {}, "data.message")
    assert back == text
    assert set(found) == set(mentions)
    assert to_markdown("sans mention", None, ()) == "sans mention"


async def test_invalid_utf8_inside_a_signed_event_is_kept_with_replacement_characters(
    harness: Harness,
) -> None:
    """A vendor bug (one bad byte in a title) must not cost the whole event, nor stall the
    vendor's redelivery queue: the byte becomes U+FFFD and the rest arrives."""
    body = json.dumps(envelope()).encode().replace(b'"title": null', b'"title": "Bilan \xff"')
    status, _ = await post_webhook(harness, body)
    assert status == 200
    [event] = harness.recorder.events
    assert event.title == "Bilan \ufffd"


async def test_system_messages_reach_every_member_once(harness: Harness) -> None:
    conv = await bridged_conversation(harness)
    connector = harness.connector
    assert connector.capabilities.system_messages
    text = "Impossible d'ajouter à cette conversation : 810000000000."
    await connector.send_system_message(conv, text, "system:eimis.42")
    await connector.send_system_message(conv, text, "system:eimis.42")  # a retry
    view = await harness.view(ALICE, conv)
    notes = [m for m in view["messages"] if m["kind"] == "system"]
    assert [(m["sender"], m["text"]) for m in notes] == [("EIMIS", text)]
