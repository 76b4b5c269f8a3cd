"""The Medipeps connector against the real Medipeps sandbox, over real HTTP."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge.directory.idnps import Idnps, luhn_check_digit
from connectors.base import (
    ConnectorContext,
    ConnectorError,
    ConversationCreated,
    MessageReceived,
    NewConversation,
    OutboundMessage,
    Participant,
    RemoteEvent,
    Sender,
)
from connectors.medipeps import MedipepsConnector
from connectors.medipeps.connector import MedipepsSettings
from connectors.medipeps.convert import from_epoch_ms, to_epoch_ms
from connectors.medipeps.sandbox import API_KEY, USERS, create_app
from connectors.sandbox.webtools import KERNEL_KEY

CONNECTOR_ID = "mp"
NATHALIE = USERS[0].idnps
PIERRE = USERS[1].idnps
OUTSIDER_MXID = "@carol:matrix.example.org"


def rpps(n: int) -> Idnps:
    """A valid RPPS-based IDNPS that is not a sandbox user."""
    partial = f"9{n:09d}"
    return Idnps("8" + partial + luhn_check_digit(partial))


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


class MemoryStore:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        return self.data.get(key)

    async def set(self, key: str, value: str) -> None:
        self.data[key] = value


class Served:
    """An aiohttp app on 127.0.0.1, which the test can take down and bring back on the same port."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.runner = web.AppRunner(app)
        self.site: web.TCPSite | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        if self.runner.server is None:
            await self.runner.setup()
        self.site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await self.site.start()
        self.port = self.runner.addresses[0][1]

    async def down(self) -> None:
        """Stop listening and drop open connections, as a crashed server would."""
        assert self.site is not None and self.runner.server is not None
        await self.site.stop()
        self.site = None
        self.runner.server.pre_shutdown()
        await self.runner.server.shutdown(1.0)

    async def close(self) -> None:
        await self.runner.cleanup()


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


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
        settings = MedipepsConnector.sandbox_settings(api_url or self.sandbox.url)
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

    await wait_for(lambda: len(harness.recorder.events) == 1, "the conversation event")
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

    await wait_for(lambda: len(harness.recorder.events) == 4, "three message events")
    messages = [m for m in harness.recorder.events[1:] if isinstance(m, MessageReceived)]
    assert len(messages) == 3
    assert [(m.sender, m.message_id) for m in messages] == sent
    assert [m.event_id for m in messages] == [f"msg-{mid}" for _, mid in sent]
    assert [m.text for m in messages] == ["premier", "deuxième", "troisième"]
    assert {m.conversation_id for m in messages} == {conv}
    await wait_for(lambda: harness.store.data.get("cursor") == "4", "the cursor to reach 4")


async def test_cursor_only_advances_after_emit_returns(harness: Harness) -> None:
    harness.recorder.gate = asyncio.Event()
    await harness.open_conversation(NATHALIE, [OUTSIDER], "Gated")

    await wait_for(lambda: harness.recorder.in_flight == 1, "an emit in flight")
    assert "cursor" not in harness.store.data
    harness.recorder.gate.set()
    await wait_for(lambda: harness.store.data.get("cursor") == "1", "the cursor to advance")
    assert harness.recorder.ids == ["conv-1"]


async def test_failed_emit_rereads_the_page_and_loses_nothing(harness: Harness) -> None:
    await harness.connector.stop()
    conv = await harness.open_conversation(NATHALIE, [OUTSIDER], "Retry")
    await harness.write(NATHALIE, conv, "un")
    await harness.write(NATHALIE, conv, "deux")
    recorder = Recorder(fail_calls={2})  # the page's second event fails to store once
    await harness.make_connector(recorder).start()

    await wait_for(lambda: recorder.ids == ["conv-1", "msg-1", "msg-2"], "all three events")
    # The first event was re-read with its page (harmless: the bridge stores an event id once).
    assert [e.event_id for e in recorder.events] == ["conv-1", "conv-1", "msg-1", "msg-2"]
    await wait_for(lambda: harness.store.data.get("cursor") == "3", "the cursor to reach 3")


async def test_restart_resumes_from_the_stored_cursor(harness: Harness) -> None:
    conv = await harness.open_conversation(NATHALIE, [OUTSIDER], "Restart")
    await harness.write(NATHALIE, conv, "avant")
    await wait_for(lambda: harness.store.data.get("cursor") == "2", "the first two events")
    await harness.connector.stop()
    assert not harness.connector.polling

    after = await harness.write(NATHALIE, conv, "après")
    recorder = Recorder()
    await harness.make_connector(recorder).start()
    await wait_for(lambda: harness.store.data.get("cursor") == "3", "the new event")
    assert recorder.ids == [f"msg-{after}"]


async def test_a_full_page_is_followed_by_an_immediate_poll(harness: Harness) -> None:
    await harness.connector.stop()
    conv = await harness.open_conversation(NATHALIE, [OUTSIDER], "Pages")
    for n in range(4):
        await harness.write(NATHALIE, conv, f"m{n}")
    recorder = Recorder()
    # With a 60 s interval, only polling again at once after a full page reads 5 events by 2.
    await harness.make_connector(recorder, page_size=2, poll_interval_s=60).start()
    await wait_for(lambda: len(recorder.ids) == 5, "five events in three pages", timeout=5)
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
        await wait_for(lambda: harness.store.data.get("cursor") == "3", "the feed to be read")
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
    await wait_for(lambda: len(harness.recorder.events) == 1, "the reply")
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
    await wait_for(lambda: harness.store.data.get("cursor") == "1", "the conversation event")

    await harness.sandbox.down()
    with pytest.raises(ConnectorError) as down:
        await harness.connector.send_message(conv, outbound("$e5"))
    assert down.value.retriable is True

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.levelno == logging.WARNING]

    await wait_for(lambda: len(warnings()) >= 2, "the poller to warn twice")
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
    await wait_for(lambda: harness.store.data.get("cursor") == "4", "the poller to catch up")
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
        MedipepsConnector.sandbox_settings("http://127.0.0.1:1")
    )
    assert MedipepsConnector.Settings is MedipepsSettings
    assert API_KEY not in repr(settings)
    assert (settings.poll_interval_s, settings.page_size) == (1.0, 100)
    assert MedipepsConnector.type_name == "medipeps"
    assert MedipepsConnector.capabilities.formatting == "plain"
    assert MedipepsConnector.capabilities.max_text_length == 4000
    assert isinstance(MedipepsConnector.sandbox_app(), web.Application)
