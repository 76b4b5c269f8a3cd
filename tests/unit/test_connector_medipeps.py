"""The Medipeps connector against the real Medipeps sandbox, over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
    EditHandling,
    MessageDeleted,
    MessageReceived,
    NewConversation,
    OutboundAttachment,
    OutboundMessage,
    Participant,
    ReactionHandling,
    ReadUpTo,
    RemoteAttachment,
    RemoteEvent,
    Sender,
    TypingHandling,
)
from connectors.idnps import Idnps
from connectors.medipeps import MedipepsConnector
from connectors.medipeps.connector import MedipepsSettings
from connectors.medipeps.convert import event_from_feed, from_epoch_ms, to_epoch_ms
from connectors.medipeps.sandbox import API_KEY, USERS, create_app
from connectors.payload import InvalidPayload
from connectors.sandbox.webtools import KERNEL_KEY

from connector_helpers import Served, rpps
from helpers import MemoryStore, wait_until

CONNECTOR_ID = "mp"
NATHALIE = USERS[0].idnps
PIERRE = USERS[1].idnps
OUTSIDER_MXID = "@carol:matrix.example.org"


OUTSIDER = rpps(42)


# --- Harness --------------------------------------------------------------------------------------


@dataclass
class Recorder:
    """The bridge's event sink.

    ``fail_calls`` lists the (1-based) emit calls that raise; ``gate``, when set, holds every emit
    until it is opened, so a test can look at the store while an emit is in flight.
    """

    events: list[RemoteEvent] = field(default_factory=list)
    fail_calls: set[int] = field(default_factory=set)
    gate: asyncio.Event | None = None
    calls: int = 0
    in_flight: int = 0

    async def __call__(self, event: RemoteEvent) -> None:
        self.calls += 1
        if self.calls in self.fail_calls:
            raise RuntimeError("storage unavailable")
        if self.gate is not None:
            self.in_flight += 1
            await self.gate.wait()
            self.in_flight -= 1
        self.events.append(event)

    @property
    def ids(self) -> list[str]:
        """Event ids once each, in first-seen order (the bridge stores each event id once)."""
        return list(dict.fromkeys(e.event_id for e in self.events))


@dataclass
class Harness:
    sandbox: Served
    store: MemoryStore
    recorder: Recorder
    http: aiohttp.ClientSession
    connectors: list[MedipepsConnector] = field(default_factory=list)

    @property
    def connector(self) -> MedipepsConnector:
        return self.connectors[-1]

    def make_connector(
        self, recorder: Recorder | None = None, api_url: str | None = None, **overrides: Any
    ) -> MedipepsConnector:
        """A connector on this harness's store; fast polling and backoff unless overridden."""
        settings = vendor_sandbox("medipeps").settings(api_url or self.sandbox.url)
        settings |= {"poll_interval_s": 0.05} | overrides
        ctx = ConnectorContext(
            connector_id=CONNECTOR_ID,
            settings=MedipepsConnector.Settings.model_validate(settings),
            emit=recorder or self.recorder,
            store=self.store,
            public_base_url=f"http://127.0.0.1:1/connectors/{CONNECTOR_ID}",
        )
        connector = MedipepsConnector(ctx)
        connector.backoff_initial_s = 0.05
        connector.backoff_max_s = 0.2
        self.connectors.append(connector)
        return connector

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
        """The user's conversation view (messages, read markers, delivery reports)."""
        return dict(await self.user_get(f"users/{idnps}/conversations/{conversation_id}"))

    async def open_conversation(self, creator: str, with_: list[str], title: str) -> str:
        data = await self.user_post(
            f"users/{creator}/conversations", {"with": with_, "title": title}
        )
        return str(data["conversation_id"])

    async def write(self, author: str, conversation_id: str, text: str) -> str:
        path = f"users/{author}/conversations/{conversation_id}/messages"
        return str((await self.user_post(path, {"text": text}))["message_id"])


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """The sandbox and a started connector polling it."""
    sandbox = Served(create_app())
    await sandbox.start()
    async with aiohttp.ClientSession() as http:
        h = Harness(sandbox, MemoryStore(), Recorder(), http)
        await h.make_connector().start()
        try:
            yield h
        finally:
            for connector in h.connectors:
                await connector.stop()
            await sandbox.close()


def outbound(request_id: str, text: str = "hello", sender: Sender | None = None) -> OutboundMessage:
    return OutboundMessage(
        request_id=request_id,
        sender=sender or Sender(mxid=OUTSIDER_MXID, display_name="Carol"),
        text=text,
        html=None,
        timestamp=datetime.now(UTC),
    )


# --- Vendor -> bridge -----------------------------------------------------------------------------


async def test_user_conversation_reaches_emit(harness: Harness) -> None:
    before = datetime.now(UTC)
    conv = await harness.open_conversation(NATHALIE, [PIERRE, OUTSIDER, OUTSIDER_MXID], "Patient Y")

    await wait_until(lambda: len(harness.recorder.events) == 1, what="the conversation event")
    [event] = harness.recorder.events
    assert isinstance(event, ConversationCreated)
    assert event.event_id == f"conv-{conv}"
    assert event.conversation_id == conv
    assert event.creator == NATHALIE and isinstance(event.creator, Idnps)
    assert event.members == (NATHALIE, PIERRE)
    assert event.participants == (Participant(idnps=OUTSIDER), Participant(mxid=OUTSIDER_MXID))
    assert event.title == "Patient Y"
    assert event.timestamp.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= event.timestamp <= datetime.now(UTC)


async def test_messages_arrive_in_order_and_the_cursor_follows(harness: Harness) -> None:
    conv = await harness.open_conversation(NATHALIE, [PIERRE, OUTSIDER_MXID], "Suivi")
    sent = [
        (NATHALIE, await harness.write(NATHALIE, conv, "premier")),
        (PIERRE, await harness.write(PIERRE, conv, "deuxième")),
        (NATHALIE, await harness.write(NATHALIE, conv, "troisième")),
    ]

    await wait_until(lambda: len(harness.recorder.events) == 4, what="three message events")
    messages = [m for m in harness.recorder.events[1:] if isinstance(m, MessageReceived)]
    assert len(messages) == 3
    assert [(m.sender, m.message_id) for m in messages] == sent
    assert [m.event_id for m in messages] == [f"msg-{mid}" for _, mid in sent]
    assert [m.text for m in messages] == ["premier", "deuxième", "troisième"]
    assert {m.conversation_id for m in messages} == {conv}
    await wait_until(lambda: harness.store.data.get("cursor") == "4", what="the cursor to reach 4")


async def test_cursor_only_advances_after_emit_returns(harness: Harness) -> None:
    harness.recorder.gate = asyncio.Event()
    await harness.open_conversation(NATHALIE, [OUTSIDER], "Gated")

    await wait_until(lambda: harness.recorder.in_flight == 1, what="an emit in flight")
    assert "cursor" not in harness.store.data
    harness.recorder.gate.set()
    await wait_until(lambda: harness.store.data.get("cursor") == "1", what="the cursor to advance")
    assert harness.recorder.ids == ["conv-1"]


async def test_failed_emit_rereads_the_page_and_loses_nothing(harness: Harness) -> None:
    await harness.connector.stop()
    conv = await harness.open_conversation(NATHALIE, [OUTSIDER], "Retry")
    await harness.write(NATHALIE, conv, "un")
    await harness.write(NATHALIE, conv, "deux")
    recorder = Recorder(fail_calls={2})  # the page's second event fails to store once
    await harness.make_connector(recorder).start()

    await wait_until(lambda: recorder.ids == ["conv-1", "msg-1", "msg-2"], what="all three events")
    # The first event was re-read with its page (harmless: the bridge stores an event id once).
    assert [e.event_id for e in recorder.events] == ["conv-1", "conv-1", "msg-1", "msg-2"]
    await wait_until(lambda: harness.store.data.get("cursor") == "3", what="the cursor to reach 3")


async def test_restart_resumes_from_the_stored_cursor(harness: Harness) -> None:
    conv = await harness.open_conversation(NATHALIE, [OUTSIDER], "Restart")
    await harness.write(NATHALIE, conv, "avant")
    await wait_until(lambda: harness.store.data.get("cursor") == "2", what="the first two events")
    await harness.connector.stop()
    assert not harness.connector.polling

    after = await harness.write(NATHALIE, conv, "après")
    recorder = Recorder()
    await harness.make_connector(recorder).start()
    await wait_until(lambda: harness.store.data.get("cursor") == "3", what="the new event")
    assert recorder.ids == [f"msg-{after}"]


async def test_a_full_page_is_followed_by_an_immediate_poll(harness: Harness) -> None:
    await harness.connector.stop()
    conv = await harness.open_conversation(NATHALIE, [OUTSIDER], "Pages")
    for n in range(4):
        await harness.write(NATHALIE, conv, f"m{n}")
    recorder = Recorder()
    # With a 60 s interval, only polling again at once after a full page reads 5 events by 2.
    await harness.make_connector(recorder, page_size=2, poll_interval_s=60).start()
    await wait_until(lambda: len(recorder.ids) == 5, timeout=5, what="five events in three pages")
    assert harness.store.data["cursor"] == "5"


async def test_unparsable_event_is_logged_and_skipped(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await harness.connector.stop()
    events = [
        {
            "seq": 1,
            "type": "NEW_MSG",
            "at": 1_700_000_000_000,
            "msg": {"msg": 7, "conv": 3, "author": "812345678901", "body": "confidential", "at": 1},
        },
        {"seq": 2, "type": "NEW_THING", "at": 1_700_000_000_000},
        {
            "seq": 3,
            "type": "NEW_MSG",
            "at": 1_700_000_000_000,
            "msg": {
                "msg": 8,
                "conv": 3,
                "author": str(NATHALIE),
                "body": "ok",
                "at": 1_700_000_000_000,
            },
        },
    ]

    async def feed(request: web.Request) -> web.Response:
        after = int(request.query["after"])
        page = [e for e in events if int(str(e["seq"])) > after]
        return web.json_response({"events": page, "cursor": 3 if page else after})

    app = web.Application()
    app.router.add_get("/mp/events", feed)
    fake = Served(app)
    await fake.start()
    caplog.set_level(logging.INFO)
    recorder = Recorder()
    try:
        await harness.make_connector(recorder, api_url=fake.url).start()
        await wait_until(
            lambda: harness.store.data.get("cursor") == "3", what="the feed to be read"
        )
    finally:
        await harness.connector.stop()
        await fake.close()

    assert recorder.ids == ["msg-8"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert "seq=1" in errors[0].getMessage() and "IDNPS" in errors[0].getMessage()
    assert "seq=2" in errors[1].getMessage() and "unknown event type" in errors[1].getMessage()
    assert "confidential" not in caplog.text


# --- Bridge -> vendor -----------------------------------------------------------------------------


async def test_outbound_conversation_and_message_show_once(harness: Harness) -> None:
    request = NewConversation(
        request_id="portal-1",
        title="Depuis Matrix",
        members=(NATHALIE, PIERRE),
        external=(
            Sender(mxid=OUTSIDER_MXID, display_name="Carol"),
            Sender(mxid="@dr.x:matrix.example.org", display_name="Dr X", idnps=OUTSIDER),
        ),
    )
    conv = await harness.connector.create_conversation(request)
    assert await harness.connector.create_conversation(request) == conv

    listing = (await harness.user_get(f"users/{NATHALIE}/conversations"))["conversations"]
    assert [(c["conversation_id"], c["members"], c["external"], c["title"]) for c in listing] == [
        (conv, [NATHALIE, PIERRE], [OUTSIDER_MXID, OUTSIDER], "Depuis Matrix")
    ]

    message = outbound("$event-1", "Bonjour Nathalie")
    first = await harness.connector.send_message(conv, message)
    assert await harness.connector.send_message(conv, message) == first
    by_idnps = outbound("$event-2", "De la part du Dr X", Sender("@dr.x:m.org", "Dr X", OUTSIDER))
    second = await harness.connector.send_message(conv, by_idnps)

    inbox = (await harness.user_get(f"users/{NATHALIE}/inbox"))["messages"]
    assert [(m["message_id"], m["sender"], m["sender_name"], m["text"]) for m in inbox] == [
        (first, OUTSIDER_MXID, "Carol", "Bonjour Nathalie"),
        (second, OUTSIDER, "Dr X", "De la part du Dr X"),
    ]

    # No echo: a user message written after ours is the first event in the feed.
    reply = await harness.write(NATHALIE, conv, "Reçu")
    await wait_until(lambda: len(harness.recorder.events) == 1, what="the reply")
    assert harness.recorder.ids == [f"msg-{reply}"]


async def test_vendor_refusals_map_to_permanent_errors(harness: Harness) -> None:
    with pytest.raises(ConnectorError) as unknown_conv:
        await harness.connector.send_message("999", outbound("$e3"))
    assert unknown_conv.value.retriable is False
    assert "404" in str(unknown_conv.value) and "NOT_FOUND" in str(unknown_conv.value)

    with pytest.raises(ConnectorError) as not_an_id:
        await harness.connector.send_message("../professionals", outbound("$e4"))
    assert not_an_id.value.retriable is False

    wrong_key = harness.make_connector(api_key="not-the-k3y-xyz")
    with pytest.raises(ConnectorError) as forbidden:
        await wrong_key.get_user(NATHALIE)
    assert forbidden.value.retriable is False
    assert "403" in str(forbidden.value) and "k3y-xyz" not in str(forbidden.value)


async def test_get_user(harness: Harness) -> None:
    user = await harness.connector.get_user(NATHALIE)
    assert user is not None
    assert user.idnps == NATHALIE and isinstance(user.idnps, Idnps)
    assert (user.given_name, user.family_name, user.profession) == (
        USERS[0].given_name,
        USERS[0].family_name,
        USERS[0].profession,
    )
    assert await harness.connector.get_user(OUTSIDER) is None


# --- Vendor down ----------------------------------------------------------------------------------


async def test_vendor_down_then_back(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    conv = await harness.open_conversation(NATHALIE, [OUTSIDER_MXID], "Panne")
    await wait_until(lambda: harness.store.data.get("cursor") == "1", what="the conversation event")

    await harness.sandbox.down()
    with pytest.raises(ConnectorError) as down:
        await harness.connector.send_message(conv, outbound("$e5"))
    assert down.value.retriable is True

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.levelno == logging.WARNING]

    await wait_until(lambda: len(warnings()) >= 2, what="the poller to warn twice")
    assert harness.connector.polling
    for record in warnings():
        assert "\n" not in record.getMessage()
        assert "polling failed" in record.getMessage()
    assert API_KEY not in caplog.text

    # Users keep writing while the bridge cannot reach the vendor.
    kernel = harness.sandbox.app[KERNEL_KEY]
    written = [kernel.user_writes(kernel.user(NATHALIE), conv, f"pendant {n}").id for n in range(3)]
    assert "pendant" not in caplog.text

    await harness.sandbox.start()
    await wait_until(lambda: harness.store.data.get("cursor") == "4", what="the poller to catch up")
    assert harness.recorder.ids == ["conv-1"] + [f"msg-{m}" for m in written]
    assert any("recovered" in r.getMessage() for r in caplog.records)
    assert await harness.connector.send_message(conv, outbound("$e5"))


async def test_stop_cancels_the_poller(harness: Harness) -> None:
    connector = harness.connector
    assert connector.polling
    await connector.stop()
    assert not connector.polling
    await connector.stop()  # idempotent


# --- Conversions and settings ---------------------------------------------------------------------


def test_epoch_ms_round_trip() -> None:
    moment = from_epoch_ms(1_700_000_000_123)
    assert moment == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert to_epoch_ms(moment) == 1_700_000_000_123
    with pytest.raises(ValueError):
        to_epoch_ms(datetime(2023, 1, 1))


def test_settings_and_capabilities() -> None:
    settings = MedipepsSettings.model_validate(
        vendor_sandbox("medipeps").settings("http://127.0.0.1:1")
    )
    assert MedipepsConnector.Settings is MedipepsSettings
    assert API_KEY not in repr(settings)
    assert (settings.poll_interval_s, settings.page_size) == (1.0, 100)
    assert MedipepsConnector.type_name == "medipeps"
    assert MedipepsConnector.capabilities.formatting == "plain"
    assert MedipepsConnector.capabilities.max_text_length == 4000
    assert isinstance(vendor_sandbox("medipeps").app(), web.Application)


# --- v2: rich messages ----------------------------------------------------------------------------

CAROL = Sender(mxid=OUTSIDER_MXID, display_name="Carol")
DR_X = Sender(mxid="@dr.x:matrix.example.org", display_name="Dr X", idnps=OUTSIDER)
CHUNK = 64 * 1024
MIB = 1024 * 1024


def file_attachment(
    data: bytes, name: str, mime_type: str, opened: list[str] | None = None, size: int | None = None
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

    return OutboundAttachment(name, mime_type, len(data) if size is None else size, open_file)


def message(
    request_id: str, text: str = "", sender: Sender = CAROL, **fields: Any
) -> OutboundMessage:
    return OutboundMessage(
        request_id=request_id, sender=sender, text=text, timestamp=datetime.now(UTC), **fields
    )


async def read_attachment(
    connector: MedipepsConnector, attachment: RemoteAttachment
) -> tuple[bytes, int]:
    """The file's bytes through ``open_attachment``, and the largest chunk it streamed."""
    parts: list[bytes] = []
    async with await connector.open_attachment(attachment) as chunks:
        async for chunk in chunks:
            parts.append(chunk)
    return b"".join(parts), max((len(p) for p in parts), default=0)


def by_id(messages: list[dict[str, Any]], message_id: str) -> dict[str, Any]:
    [found] = [m for m in messages if m["message_id"] == message_id]
    return found


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def bridged_conversation(harness: Harness, request_id: str = "portal-v2") -> str:
    """A conversation the bridge opened: Nathalie and Pierre with Carol and Dr X."""
    return await harness.connector.create_conversation(
        NewConversation(request_id, "V2", (NATHALIE, PIERRE), (CAROL, DR_X))
    )


def test_v2_capabilities() -> None:
    caps = MedipepsConnector.capabilities
    assert (caps.formatting, caps.max_text_length, caps.long_text) == ("plain", 4000, "split")
    assert set(caps.files) == {"m.image", "m.file"}
    assert caps.files["m.image"].mime_types == {"image/jpeg", "image/png"}
    assert caps.files["m.file"].mime_types == {"application/pdf", "image/jpeg", "image/png"}
    assert all(limit.max_size == MIB for limit in caps.files.values())
    assert caps.replies and caps.deletions and caps.read_receipts and caps.delivery_status
    assert not (caps.mentions or caps.locations or caps.edits or caps.reactions or caps.typing)


# Vendor -> bridge


async def test_v2_inbound_reply_file_delete_and_read(harness: Harness) -> None:
    conv = await bridged_conversation(harness)
    first = await harness.write(NATHALIE, conv, "Bonjour")
    path = f"users/{PIERRE}/conversations/{conv}/messages"
    reply = await harness.user_post(
        path, {"text": "Dr X, voir ci-dessous", "reply_to": first, "mentions": [str(OUTSIDER)]}
    )
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(700_000)
    file_id = await harness.user_upload(PIERRE, "radio.png", "image/png", png)
    with_file = await harness.user_post(path, {"text": "", "file_id": file_id})
    await harness.user_call(
        "DELETE", f"users/{NATHALIE}/conversations/{conv}/messages/{first}", expect=204
    )
    await harness.user_call(
        "POST",
        f"users/{PIERRE}/conversations/{conv}/read",
        {"up_to": with_file["message_id"]},
        expect=204,
    )

    await wait_until(lambda: len(harness.recorder.ids) == 5, what="five events")
    hello, answer, filed, deleted, read = harness.recorder.events[-5:]
    assert isinstance(hello, MessageReceived) and hello.reply_to is None
    assert isinstance(answer, MessageReceived)
    assert (answer.message_id, answer.reply_to) == (reply["message_id"], first)
    assert answer.text == "Dr X, voir ci-dessous" and answer.mentions == ()

    assert isinstance(filed, MessageReceived) and filed.message_id == with_file["message_id"]
    assert filed.text == "" and filed.attachment is not None
    assert (filed.attachment.name, filed.attachment.mime_type) == ("radio.png", "image/png")
    assert filed.attachment.size == len(png)
    assert filed.attachment.source.startswith("inline:")
    data, largest_chunk = await read_attachment(harness.connector, filed.attachment)
    assert sha256(data) == sha256(png)
    assert largest_chunk <= CHUNK

    assert isinstance(deleted, MessageDeleted)
    assert (deleted.event_id, deleted.message_id, deleted.sender) == (
        f"del-{first}",
        first,
        NATHALIE,
    )
    assert deleted.conversation_id == conv
    assert isinstance(read, ReadUpTo)
    assert (read.sender, read.message_id, read.conversation_id) == (
        PIERRE,
        with_file["message_id"],
        conv,
    )
    assert len(set(harness.recorder.ids)) == len(harness.recorder.ids)


async def test_v2_unsupported_user_actions_emit_nothing(harness: Harness) -> None:
    conv = await harness.open_conversation(NATHALIE, [OUTSIDER], "Limites")
    mid = await harness.write(NATHALIE, conv, "texte")
    base = f"users/{NATHALIE}/conversations/{conv}"
    await harness.user_call("PATCH", f"{base}/messages/{mid}", {"text": "autre"}, expect=501)
    await harness.user_call("POST", f"{base}/messages/{mid}/reactions", {"emoji": "👍"}, expect=501)
    await harness.user_call("POST", f"{base}/typing", {"typing": True}, expect=501)
    last = await harness.write(NATHALIE, conv, "dernier")
    await wait_until(lambda: f"msg-{last}" in harness.recorder.ids, what="the last message")
    assert harness.recorder.ids == [f"conv-{conv}", f"msg-{mid}", f"msg-{last}"]


async def test_v2_open_attachment_refuses_a_foreign_source(harness: Harness) -> None:
    foreign = RemoteAttachment("x.pdf", "application/pdf", 1, "https://example.org/x.pdf")
    with pytest.raises(ConnectorError) as refused:
        await read_attachment(harness.connector, foreign)
    assert refused.value.retriable is False


# Bridge -> vendor


async def test_v2_outbound_reply_and_files(harness: Harness) -> None:
    conv = await bridged_conversation(harness)
    asked = await harness.write(NATHALIE, conv, "Une question")
    answer = await harness.connector.send_message(
        conv, message("$mp-1", "Réponse pour Nathalie Girard", sender=DR_X, reply_to=asked)
    )
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(MIB - 8)  # exactly 1 MiB: the limit is inclusive
    opened: list[str] = []
    image = await harness.connector.send_message(
        conv,
        message("$mp-2", "", attachment=file_attachment(png, "radio.png", "image/png", opened)),
    )
    pdf = b"%PDF-1.7\n" + os.urandom(123_457)
    document = await harness.connector.send_message(
        conv,
        message(
            "$mp-3", "Le compte rendu", attachment=file_attachment(pdf, "cr.pdf", "application/pdf")
        ),
    )
    assert opened == ["radio.png"]

    inbox = (await harness.user_get(f"users/{NATHALIE}/inbox"))["messages"]
    replied = by_id(inbox, answer)
    assert replied["reply_to"] == asked and replied["sender"] == OUTSIDER
    assert replied["text"] == "Réponse pour Nathalie Girard"
    for sent, data, name, mime in (
        (image, png, "radio.png", "image/png"),
        (document, pdf, "cr.pdf", "application/pdf"),
    ):
        attachment = by_id(inbox, sent)["attachment"]
        assert (attachment["name"], attachment["mime_type"], attachment["size"]) == (
            name,
            mime,
            len(data),
        )
        assert sha256(await harness.user_download(NATHALIE, attachment["file_id"])) == sha256(data)


async def test_v2_outbound_files_medipeps_refuses(harness: Harness) -> None:
    conv = await bridged_conversation(harness)
    opened: list[str] = []
    cases = [
        file_attachment(os.urandom(2 * MIB), "big.png", "image/png", opened),
        file_attachment(b"notes", "notes.txt", "text/plain", opened),
    ]
    for n, attachment in enumerate(cases):
        with pytest.raises(ConnectorError) as refused:
            await harness.connector.send_message(
                conv, message(f"$no-{n}", "x", attachment=attachment)
            )
        assert refused.value.retriable is False
    assert opened == []  # refused before reading a byte

    # A stream longer than it claimed is refused too, once it passes the limit.
    liar = file_attachment(os.urandom(MIB + 1), "liar.png", "image/png", opened, size=1000)
    with pytest.raises(ConnectorError) as refused_liar:
        await harness.connector.send_message(conv, message("$no-3", "x", attachment=liar))
    assert refused_liar.value.retriable is False
    assert (await harness.user_get(f"users/{NATHALIE}/inbox"))["messages"] == []


async def test_v2_outbound_delete_read_and_delivery(harness: Harness) -> None:
    conv = await bridged_conversation(harness)
    connector = harness.connector
    asked = await harness.write(NATHALIE, conv, "Une question")
    sent = await connector.send_message(conv, message("$del-1", "à effacer"))

    assert await connector.delete_message(conv, sent, CAROL) is True
    assert await connector.delete_message(conv, sent, CAROL) is True  # again: still a success
    # 404: no error, but nothing was deleted, and the bridge is told so (never "delivered").
    assert await connector.delete_message(conv, "999999", CAROL) is False
    deleted = by_id((await harness.user_get(f"users/{NATHALIE}/inbox"))["messages"], sent)
    assert deleted["deleted"] is True and deleted["text"] == ""

    await connector.mark_read(conv, DR_X, asked)
    assert (await harness.view(NATHALIE, conv))["read_up_to"] == {str(OUTSIDER): asked}

    report = DeliveryReport("failed", "Le destinataire n'a pas pu être joint.")
    await connector.report_delivery(conv, asked, report)
    mine = by_id((await harness.view(NATHALIE, conv))["messages"], asked)
    assert mine["delivery"] == [{"status": "failed", "detail": report.detail}]

    with pytest.raises(ConnectorError) as bad_id:
        await connector.send_message(conv, message("$del-2", "secret", reply_to="not-a-number"))
    assert bad_id.value.retriable is False and "secret" not in str(bad_id.value)

    # Nothing the bridge did comes back through the feed (no echo).
    last = await harness.write(NATHALIE, conv, "fin")
    await wait_until(lambda: harness.recorder.ids[-1:] == [f"msg-{last}"], what="the last message")
    assert harness.recorder.ids == [f"msg-{asked}", f"msg-{last}"]


async def test_v2_unsupported_operations_are_not_implemented(harness: Harness) -> None:
    """Edits, reactions and typing: Medipeps is none of their classes, has none of their
    methods, and advertises none of them (the bridge never asks; it degrades them)."""
    connector = harness.connector
    for protocol in (EditHandling, ReactionHandling, TypingHandling):
        assert not isinstance(connector, protocol)
    for method in ("edit_message", "add_reaction", "remove_reaction", "set_typing"):
        assert not hasattr(connector, method)
    caps = connector.capabilities
    assert not (caps.edits or caps.reactions or caps.typing)


def test_v2_inline_attachment_from_the_feed() -> None:
    data = os.urandom(5000)
    b64 = base64.b64encode(data).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    event = {
        "seq": 9,
        "type": "NEW_MSG",
        "at": 1_700_000_000_000,
        "msg": {
            "msg": 4,
            "conv": 2,
            "author": str(NATHALIE),
            "body": "",
            "at": 1_700_000_000_000,
            "reply_to": None,
            "attachment": {
                "filename": "a.png",
                "mime": "image/png",
                "size": 5000,
                "data_b64": wrapped,
            },
        },
    }
    parsed = event_from_feed(event)
    assert isinstance(parsed, MessageReceived) and parsed.attachment is not None
    assert parsed.attachment.source == "inline:" + b64 and parsed.attachment.size == 5000
    event["msg"]["attachment"]["data_b64"] = "not base64!"  # type: ignore[index]
    with pytest.raises(InvalidPayload):
        event_from_feed(event)


async def test_v2_pages_cut_short_by_files_are_followed_at_once(harness: Harness) -> None:
    await harness.connector.stop()
    conv = await harness.open_conversation(NATHALIE, [OUTSIDER], "Pièces jointes")
    path = f"users/{NATHALIE}/conversations/{conv}/messages"
    sent = []
    for n in range(8):  # 8 MiB of files: more than one page's ~8 MiB of base64
        file_id = await harness.user_upload(
            NATHALIE, f"scan{n}.png", "image/png", b"\x89PNG\r\n\x1a\n" + os.urandom(MIB - 8)
        )
        sent.append((await harness.user_post(path, {"text": "", "file_id": file_id}))["message_id"])
    recorder = Recorder()
    # With a 60 s interval, only polling again at once after a short page with files reads all.
    await harness.make_connector(recorder, poll_interval_s=60).start()
    expected = [f"conv-{conv}"] + [f"msg-{m}" for m in sent]
    await wait_until(lambda: recorder.ids == expected, timeout=10, what="every file message")


async def test_invalid_utf8_in_the_feed_is_kept_with_replacement_characters(
    harness: Harness,
) -> None:
    """One bad byte from the vendor must neither stall the feed nor drop the event."""
    author = str(rpps(1))
    page = (
        b'{"events": [{"seq": 1, "type": "NEW_MSG", "at": 1700000000000, "msg": {"msg": 7, '
        b'"conv": 3, "author": "' + author.encode() + b'", "body": "Tension \xff\xfe ok", '
        b'"at": 1700000000000}}], "cursor": 1}'
    )

    async def events(request: web.Request) -> web.Response:
        body = page if request.query.get("after") == "0" else b'{"events": [], "cursor": 1}'
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/mp/events", events)
    vendor = Served(app)
    await vendor.start()
    try:
        recorder = Recorder()
        connector = harness.make_connector(recorder, api_url=vendor.url)
        await connector.start()
        await wait_until(lambda: recorder.events, timeout=2, what="the event")
        [event] = recorder.events
        assert isinstance(event, MessageReceived)
        assert event.text == "Tension \ufffd\ufffd ok"
        assert await harness.store.get("cursor") == "1"
    finally:
        await vendor.close()
