"""The PandaLab connector against the real PandaLab sandbox, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
from connectors.pandalab import PandaLabConnector
from connectors.pandalab.connector import SANDBOX_WEBHOOK_SECRET, PandaLabSettings
from connectors.pandalab.sandbox import USERS, create_app, sign

CONNECTOR_ID = "pl"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ALICE = USERS[0].idnps
BOB = USERS[1].idnps
OUTSIDER_MXID = "@carol:matrix.example.org"


def rpps(n: int) -> Idnps:
    """A valid RPPS-based IDNPS that is not a sandbox user."""
    partial = f"9{n:09d}"
    return Idnps("8" + partial + luhn_check_digit(partial))


OUTSIDER = rpps(42)


# --- Harness --------------------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand (``step`` moves it on every reading)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.step = 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@dataclass
class Recorder:
    """The bridge's event sink: records events; ``fail_next`` makes the next emits raise."""

    events: list[RemoteEvent] = field(default_factory=list)
    fail_next: int = 0
    failures: int = 0

    async def __call__(self, event: RemoteEvent) -> None:
        if self.fail_next:
            self.fail_next -= 1
            self.failures += 1
            raise RuntimeError("storage unavailable")
        self.events.append(event)


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
        self.paths: list[str] = []
        """The path of every request served, in order."""
        app.middlewares.append(self._record)
        self.runner = web.AppRunner(app)
        self.site: web.TCPSite | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.paths.append(request.path)
        return await handler(request)

    async def start(self) -> None:
        if self.site is None and not self.runner.server:
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
        PandaLabConnector.sandbox_settings(sandbox.url) | overrides
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


def bridge_web_app(connector: PandaLabConnector) -> web.Application:
    """The bridge's web server, as the bridge mounts connectors: routes under /connectors/<id>."""
    sub = web.Application()
    sub.add_routes(connector.web_routes())
    app = web.Application()
    app.add_subapp(f"/connectors/{CONNECTOR_ID}", sub)
    return app


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
        receiver = Served(bridge_web_app(connector))
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

    await wait_for(lambda: len(harness.recorder.events) == 1, "the conversation event")
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

    await wait_for(lambda: len(harness.recorder.events) == 4, "three message events")
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

    await wait_for(lambda: len(harness.recorder.events) == 1, "the redelivered event")
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
    await wait_for(lambda: len(harness.recorder.events) == 1, "the reply")
    [event] = harness.recorder.events
    assert isinstance(event, MessageReceived) and event.message_id == reply


async def test_outbound_message_by_idnps_sender(harness: Harness) -> None:
    conv = await harness.connector.create_conversation(
        NewConversation("portal-2", None, (ALICE,), (Sender("@x:example.org", "X"),))
    )
    sender = Sender(mxid="@dr.y:example.org", display_name="Dr Y", idnps=OUTSIDER)
    await harness.connector.send_message(
        conv, OutboundMessage("$e2", sender, "hello", None, datetime.now(UTC))
    )
    [received] = (await harness.user_get(f"users/{ALICE}/inbox"))["messages"]
    assert received["sender"] == OUTSIDER


async def test_vendor_refusals_map_to_permanent_errors(harness: Harness) -> None:
    with pytest.raises(ConnectorError) as unknown_conv:
        await harness.connector.send_message(
            "no-such-conversation",
            OutboundMessage("$e3", Sender("@x:example.org", "X"), "hi", None, datetime.now(UTC)),
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
    harness.clock.now += 3600 - 10  # inside the client's safety margin, before the vendor's expiry
    assert await harness.connector.get_user(ALICE) is not None
    assert harness.token_requests - fetched == 1
    assert await harness.connector.get_user(ALICE) is not None
    assert harness.token_requests - fetched == 1


async def test_token_refreshed_once_on_401(harness: Harness) -> None:
    fetched = harness.token_requests
    harness.connector.client.clock = FakeClock()  # the client believes its token still fresh
    harness.clock.now += 3601  # ... but the vendor has expired it
    assert await harness.connector.get_user(ALICE) is not None
    assert harness.token_requests - fetched == 1


async def test_token_refused_twice_is_a_permanent_error(harness: Harness) -> None:
    fetched = harness.token_requests
    harness.connector.client.clock = FakeClock()
    harness.clock.step = 10_000  # the vendor expires every token before it is used
    with pytest.raises(ConnectorError) as refused:
        await harness.connector.get_user(ALICE)
    assert refused.value.retriable is False
    assert "401" in str(refused.value)
    assert harness.token_requests - fetched == 1  # one refresh, no loop


async def test_bad_credentials_fail_start_permanently(harness: Harness) -> None:
    connector = harness.make_connector(client_secret="not-the-s3cret-xyz")
    try:
        with pytest.raises(ConnectorError) as refused:
            await connector.start()
    finally:
        await connector.stop()
    assert refused.value.retriable is False
    assert "invalid_client" in str(refused.value)
    assert "s3cret-xyz" not in str(refused.value)


# --- Vendor down ----------------------------------------------------------------------------------


async def test_vendor_down_is_a_retriable_error(harness: Harness) -> None:
    conv = await harness.connector.create_conversation(
        NewConversation("portal-4", None, (ALICE,), (Sender("@x:example.org", "X"),))
    )
    message = OutboundMessage("$e4", Sender("@x:example.org", "X"), "hi", None, datetime.now(UTC))
    await harness.sandbox.down()
    with pytest.raises(ConnectorError) as down:
        await harness.connector.send_message(conv, message)
    assert down.value.retriable is True

    await harness.sandbox.start()
    sent = await harness.connector.send_message(conv, message)
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
        PandaLabConnector.sandbox_settings("http://127.0.0.1:1")
    )
    assert PandaLabConnector.Settings is PandaLabSettings
    assert settings.replay_window_s == 300
    assert "pandalab-sandbox-secret" not in repr(settings)
    assert PandaLabConnector.type_name == "pandalab"
    assert PandaLabConnector.capabilities.formatting == "markdown"
    assert PandaLabConnector.capabilities.max_text_length == 10000
    assert isinstance(PandaLabConnector.sandbox_app(), web.Application)
