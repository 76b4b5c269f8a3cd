"""The webhook connector against the real webhook sandbox, over real HTTP.

The sandbox plays a vendor that implements the contract (connectors/webhook/openapi.yaml); the
test plays the bridge's storage (a recorder behind ``ctx.emit``) and, where a vendor would
misbehave, the vendor itself (hand-signed requests).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from bridge.devtools.sandboxes import vendor_sandbox
from connectors.base import (
    Capabilities,
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
    Sender,
    TypingChanged,
)
from connectors.kit.signing import sign as signature
from connectors.webhook import WebhookConnector
from connectors.webhook.sandbox import PUSHER_KEY, SECRET, USERS, create_app
from connectors.webhook.settings import WebhookSettings

from connector_helpers import Recorder, Served, mounted, rpps
from helpers import MemoryStore, wait_until

CONNECTOR_ID = "wh"
INES = USERS[0].idnps
HUGO = USERS[1].idnps
JADE = USERS[4].idnps  # ADELI-based
CAROL = Sender(mxid="@carol:matrix.example.org", display_name="Carol Petit")
NEW_SECRET = "rotated-secret-0123456789abcdef0123456789"


OUTSIDER = rpps(42)


# --- Harness --------------------------------------------------------------------------------------


class FakeSecrets:
    """The bridge's sealed secrets as a connector sees them: current, then those in grace."""

    def __init__(self, current: str | None = None, previous: Sequence[str] = ()) -> None:
        self.current_secret = current
        self.previous = list(previous)

    def current(self) -> str | None:
        return self.current_secret

    def accepted(self) -> Sequence[str]:
        return [s for s in (self.current_secret, *self.previous) if s]


@dataclass
class Harness:
    sandbox: Served
    receiver: Served
    connector: WebhookConnector
    recorder: Recorder
    secrets: FakeSecrets
    http: aiohttp.ClientSession

    @property
    def events_url(self) -> str:
        return f"{self.receiver.url}/connectors/{CONNECTOR_ID}/events"

    async def push(
        self,
        body: Any,
        *,
        key: str | None = "key-1",
        secret: str = SECRET,
        timestamp: int | None = None,
        sig: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Push ``body`` (bytes, or JSON) to the events endpoint, signed as a vendor would."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        ts = str(int(time.time()) if timestamp is None else timestamp)
        sent = {
            "Content-Type": "application/json",
            "X-Eimis-Timestamp": ts,
            "X-Eimis-Signature": sig or signature(secret, ts, raw),
        }
        if key is not None:
            sent["Idempotency-Key"] = key
        sent.update(headers or {})
        async with self.http.post(self.events_url, data=raw, headers=sent) as resp:
            assert resp.content_type == "application/json", await resp.text()
            return resp.status, await resp.json(), dict(resp.headers)

    # The vendor's app, as its users use it (USER_API.md) ----------------------------------------

    async def user(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        url = f"{self.sandbox.url}/_sandbox/{path}"
        async with self.http.request(method, url, **kwargs) as resp:
            text = await resp.text()
            assert resp.status == expect, f"{method} {path}: {resp.status} {text}"
            return json.loads(text) if text else None

    async def open_conversation(self, creator: str, with_: list[str], title: str) -> str:
        body = {"with": with_, "title": title}
        data = await self.user("POST", f"users/{creator}/conversations", 201, json=body)
        return str(data["conversation_id"])

    async def write(self, author: str, conversation_id: str, **body: Any) -> str:
        path = f"users/{author}/conversations/{conversation_id}/messages"
        return str((await self.user("POST", path, 201, json=body))["message_id"])

    async def view(self, idnps: str, conversation_id: str) -> dict[str, Any]:
        return dict(await self.user("GET", f"users/{idnps}/conversations/{conversation_id}"))

    async def inbox(self, idnps: str) -> list[dict[str, Any]]:
        return list((await self.user("GET", f"users/{idnps}/inbox"))["messages"])

    def vendor_requests(self, path_part: str) -> list[dict[str, str]]:
        """Headers of the vendor API calls (not the user side) whose path contains ``path_part``."""
        return [
            h
            for _, path, h in self.sandbox.requests
            if path_part in path and not path.startswith("/_sandbox/")
        ]


def new_connector(
    sandbox_url: str,
    recorder: Recorder,
    secrets: FakeSecrets,
    public_base_url: str = "",
    **overrides: Any,
) -> WebhookConnector:
    settings = WebhookSettings.model_validate(
        vendor_sandbox("webhook").settings(sandbox_url) | overrides
    )
    ctx = ConnectorContext(
        connector_id=CONNECTOR_ID,
        settings=settings,
        emit=recorder,
        store=MemoryStore(),
        public_base_url=public_base_url,
        secrets=secrets,
    )
    return WebhookConnector(ctx)


@asynccontextmanager
async def running(
    *,
    secrets: FakeSecrets | None = None,
    sandbox_secrets: Sequence[str] = (SECRET,),
    **overrides: Any,
) -> AsyncIterator[Harness]:
    sandbox = Served(create_app(secrets=sandbox_secrets, retry_initial=0.05, retry_max=0.2))
    await sandbox.start()
    recorder = Recorder()
    secrets = secrets or FakeSecrets(current=SECRET)
    async with aiohttp.ClientSession() as http:
        connector = new_connector(sandbox.url, recorder, secrets, **overrides)
        receiver = Served(mounted(connector, CONNECTOR_ID))
        await receiver.start()
        connector.ctx.public_base_url = f"{receiver.url}/connectors/{CONNECTOR_ID}"
        h = Harness(sandbox, receiver, connector, recorder, secrets, http)
        await connector.start()
        try:
            yield h
        finally:
            await connector.stop()
            await receiver.close()
            await sandbox.close()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async with running() as h:
        yield h


def event(type_: str = "message", **fields: Any) -> dict[str, Any]:
    """A valid event of the contract (a text message by default)."""
    base: dict[str, Any] = {
        "id": "evt-1",
        "type": type_,
        "conversation_id": "conv-1",
        "at": "2025-01-31T08:00:00.123Z",
    }
    defaults: dict[str, dict[str, Any]] = {
        "message": {"message_id": "msg-1", "sender": str(INES), "text": "Bonjour"},
        "conversation.created": {
            "creator": str(INES),
            "members": [str(INES)],
            "participants": [str(OUTSIDER)],
        },
    }
    return {**base, **defaults.get(type_, {}), **fields}


# --- Vendor -> bridge, through the sandbox --------------------------------------------------------


async def test_start_announces_the_events_url_to_the_vendor(harness: Harness) -> None:
    pusher = harness.sandbox.app[PUSHER_KEY]
    assert pusher.events_url == harness.events_url
    [announce] = harness.vendor_requests("/bridge")
    assert announce["Idempotency-Key"]
    assert announce["X-Eimis-Signature"].startswith("sha256=")


async def test_conversation_and_messages_reach_the_bridge_in_order(harness: Harness) -> None:
    conv = await harness.open_conversation(INES, [str(HUGO), str(OUTSIDER), CAROL.mxid], "Suivi")
    sent = [
        await harness.write(INES, conv, text="premier"),
        await harness.write(HUGO, conv, text="**deuxième**"),
        await harness.write(INES, conv, text="troisième"),
    ]

    await wait_until(lambda: len(harness.recorder.events) == 4, what="four events")
    created, *messages = harness.recorder.events
    assert isinstance(created, ConversationCreated)
    assert created.conversation_id == conv and created.creator == INES
    assert created.members == (INES, HUGO)
    assert created.participants == (Participant(idnps=OUTSIDER), Participant(mxid=CAROL.mxid))
    assert created.title == "Suivi"
    assert [m.message_id for m in messages] == sent
    assert [m.text for m in messages] == ["premier", "**deuxième**", "troisième"]
    assert [m.sender for m in messages] == [INES, HUGO, INES]
    assert all(m.timestamp.tzinfo is not None for m in harness.recorder.events)
    assert len({e.event_id for e in harness.recorder.events}) == 4


async def test_every_event_kind_reaches_the_bridge(harness: Harness) -> None:
    conv = await harness.open_conversation(JADE, [CAROL.mxid], "Tout")
    pdf = b"%PDF-1.4 " + bytes(range(256)) * 300
    headers = {"Content-Type": "application/pdf", "X-Filename": "bilan%20%C3%A9t%C3%A9.pdf"}
    upload = await harness.user("POST", f"users/{JADE}/files", 201, data=pdf, headers=headers)
    first = await harness.write(JADE, conv, text="Le bilan", file_id=upload["file_id"])
    second = await harness.write(
        JADE,
        conv,
        text=f"@{CAROL.mxid} voir ci-dessus",
        reply_to=first,
        mentions=[CAROL.mxid],
    )
    place = await harness.write(
        JADE, conv, text="", location={"lat": 45.76, "lon": 4.84, "label": "Cabinet"}
    )
    await harness.user(
        "PATCH",
        f"users/{JADE}/conversations/{conv}/messages/{second}",
        json={"text": "corrigé"},
    )
    reaction = await harness.user(
        "POST",
        f"users/{JADE}/conversations/{conv}/messages/{first}/reactions",
        201,
        json={"emoji": "👍"},
    )
    await harness.user(
        "DELETE",
        f"users/{JADE}/conversations/{conv}/messages/{first}/reactions/{reaction['reaction_id']}",
        204,
    )
    await harness.user("DELETE", f"users/{JADE}/conversations/{conv}/messages/{place}", 204)
    await harness.user(
        "POST", f"users/{JADE}/conversations/{conv}/read", 204, json={"up_to": second}
    )
    for typing in (True, False):
        await harness.user(
            "POST", f"users/{JADE}/conversations/{conv}/typing", 204, json={"typing": typing}
        )

    await wait_until(lambda: len(harness.recorder.events) == 11, what="eleven events")
    kinds = [type(e) for e in harness.recorder.events]
    assert kinds == [
        ConversationCreated,
        MessageReceived,
        MessageReceived,
        MessageReceived,
        MessageEdited,
        ReactionAdded,
        ReactionRemoved,
        MessageDeleted,
        ReadUpTo,
        TypingChanged,
        TypingChanged,
    ]
    with_file, with_reply, with_place = harness.recorder.of(MessageReceived)
    assert with_file.sender == JADE and with_file.text == "Le bilan"
    assert with_file.attachment is not None
    assert with_file.attachment.name == "bilan été.pdf"
    assert with_file.attachment.mime_type == "application/pdf"
    assert with_file.attachment.size == len(pdf)
    async with await harness.connector.open_attachment(with_file.attachment) as chunks:
        got = b"".join([chunk async for chunk in chunks])
    assert got == pdf
    assert with_reply.reply_to == first
    assert with_reply.mentions == (Mention(display_name=CAROL.mxid, mxid=CAROL.mxid),)
    assert with_place.location == Location(45.76, 4.84, "Cabinet")
    [edited] = harness.recorder.of(MessageEdited)
    assert (edited.message_id, edited.text) == (second, "corrigé")
    added, removed = harness.recorder.of(ReactionAdded) + harness.recorder.of(ReactionRemoved)
    assert added.key == "👍" and added.message_id == first
    assert removed.reaction_id == added.reaction_id
    [deleted] = harness.recorder.of(MessageDeleted)
    assert deleted.message_id == place
    [read] = harness.recorder.of(ReadUpTo)
    assert (read.sender, read.message_id) == (JADE, second)
    assert [t.typing for t in harness.recorder.of(TypingChanged)] == [True, False]


async def test_a_push_that_could_not_be_stored_is_redelivered_and_stored_once(
    harness: Harness,
) -> None:
    harness.recorder.fail_next = 1
    conv = await harness.open_conversation(INES, [str(OUTSIDER)], "Redelivery")

    await wait_until(lambda: len(harness.recorder.events) == 1, what="the redelivered event")
    assert harness.recorder.failures == 1
    assert harness.recorder.events[0].conversation_id == conv
    pushes = harness.receiver.requests
    assert len(pushes) == 2 and pushes[0][2]["Idempotency-Key"] == pushes[1][2]["Idempotency-Key"]


# --- The events endpoint: signatures --------------------------------------------------------------


async def test_a_signed_single_event_and_a_signed_batch_are_stored(harness: Harness) -> None:
    status, answer, _ = await harness.push(event(), key="single")
    assert (status, answer) == (200, {"stored": 1})
    batch = {
        "events": [
            event("conversation.created", id="b1", conversation_id="c9"),
            event(id="b2", conversation_id="c9", message_id="m9", text="**gras**", kind="notice"),
            event("typing", id="b3", conversation_id="c9", sender=str(JADE), typing=True),
            event(
                id="b4",
                conversation_id="c9",
                message_id="m10",
                text="",
                attachment={"file_id": "f1", "name": "a.pdf", "mime_type": "a/b", "size": 10.0},
            ),
        ]
    }
    status, answer, _ = await harness.push(batch, key="batch")
    assert (status, answer) == (200, {"stored": 4})
    assert [e.event_id for e in harness.recorder.events] == ["evt-1", "b1", "b2", "b3", "b4"]
    notice = harness.recorder.events[2]
    assert isinstance(notice, MessageReceived) and notice.message_kind == "notice"
    file = harness.recorder.events[4]  # JSON has one number type: 10.0 is the integer 10
    assert isinstance(file, MessageReceived) and file.attachment and file.attachment.size == 10


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("bad signature", "does not match"),
        ("wrong secret", "does not match"),
        ("stale timestamp", "replay window"),
        ("future timestamp", "replay window"),
        ("missing headers", "required"),
        ("malformed signature", "64 lower-case hex"),
        ("timestamp not digits", "unix time"),
        ("too many signatures", "more than 5"),
    ],
)
async def test_unauthentic_pushes_are_refused_with_401(
    harness: Harness, case: str, words: str
) -> None:
    raw = json.dumps(event()).encode()
    now = int(time.time())
    kwargs: dict[str, Any] = {}
    if case == "bad signature":
        kwargs["sig"] = "sha256=" + "0" * 64
    elif case == "wrong secret":
        kwargs["secret"] = "not-the-secret-not-the-secret-not-the"
    elif case == "stale timestamp":
        kwargs["timestamp"] = now - 301
    elif case == "future timestamp":
        kwargs["timestamp"] = now + 301
    elif case == "malformed signature":
        kwargs["sig"] = "sha1=abc"
    elif case == "timestamp not digits":
        kwargs["headers"] = {"X-Eimis-Timestamp": "2025-01-01T00:00:00Z"}
    elif case == "too many signatures":
        kwargs["sig"] = ", ".join([signature(SECRET, str(now), raw)] * 6)
    if case == "missing headers":
        async with harness.http.post(
            harness.events_url, data=raw, headers={"Content-Type": "application/json"}
        ) as resp:
            status, answer = resp.status, await resp.json()
    else:
        status, answer, _ = await harness.push(raw, **kwargs)
    assert status == 401
    assert answer["error"] == "unauthorized" and words in answer["message"]
    assert harness.recorder.events == []


async def test_a_valid_signature_from_the_past_is_refused_even_if_correct(
    harness: Harness,
) -> None:
    status, answer, _ = await harness.push(event(), timestamp=int(time.time()) - 3600)
    assert status == 401 and "300 s replay window" in answer["message"]


async def test_rotation_keeps_both_directions_working_during_the_grace_period() -> None:
    # The vendor still has the old secret: it signs with it and accepts only it.
    rotating = FakeSecrets(current=NEW_SECRET, previous=[SECRET])
    async with running(secrets=rotating, sandbox_secrets=(SECRET,)) as h:
        assert h.sandbox.app[PUSHER_KEY].events_url == h.events_url  # announced, old accepted
        status, _, _ = await h.push(event(id="old"), key="k-old", secret=SECRET)
        assert status == 200
        status, _, _ = await h.push(event(id="new"), key="k-new", secret=NEW_SECRET)
        assert status == 200
        conv = await h.connector.create_conversation(
            NewConversation("!grace:example.org", None, (INES,), (CAROL,))
        )
        [sent] = h.vendor_requests("/conversations")
        assert sent["X-Eimis-Signature"].count("sha256=") == 2

        rotating.previous = []  # the grace period ends
        status, answer, _ = await h.push(event(id="late"), key="k-late", secret=SECRET)
        assert status == 401
        with pytest.raises(ConnectorError) as refused:
            await h.connector.send_message(conv, text_message("$after-grace"))
        assert refused.value.retriable is True
        assert "signature" in str(refused.value)
        assert [e.event_id for e in h.recorder.events] == ["old", "new"]


async def test_a_connector_declared_in_the_config_signs_with_its_settings_secret() -> None:
    async with running(secrets=FakeSecrets()) as h:  # the bridge holds no secret for it
        status, _, _ = await h.push(event())
        assert status == 200
        assert await h.connector.get_user(INES) is not None


async def test_without_any_secret_everything_is_refused_and_nothing_crashes() -> None:
    sandbox = Served(create_app())
    await sandbox.start()
    recorder = Recorder()
    settings = vendor_sandbox("webhook").settings(sandbox.url) | {"secret": None}
    connector = new_connector(sandbox.url, recorder, FakeSecrets(), **settings)
    receiver = Served(mounted(connector, CONNECTOR_ID))
    await receiver.start()
    try:
        await connector.start()  # logs, retries in the background, does not raise
        url = f"{receiver.url}/connectors/{CONNECTOR_ID}/events"
        raw = json.dumps(event()).encode()
        ts = str(int(time.time()))
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                url,
                data=raw,
                headers={
                    "Content-Type": "application/json",
                    "Idempotency-Key": "k",
                    "X-Eimis-Timestamp": ts,
                    "X-Eimis-Signature": signature(SECRET, ts, raw),
                },
            ) as resp,
        ):
            assert resp.status == 401
            assert "no shared secret" in (await resp.json())["message"]
        with pytest.raises(ConnectorError) as no_secret:
            await connector.get_user(INES)
        assert "no shared secret" in str(no_secret.value)
    finally:
        await connector.stop()
        await receiver.close()
        await sandbox.close()


# --- The events endpoint: idempotency -------------------------------------------------------------


async def test_a_repeated_key_gets_the_first_answer_and_stores_nothing_again(
    harness: Harness,
) -> None:
    body = event()
    first = await harness.push(body, key="same")
    again = await harness.push(body, key="same")
    assert first[:2] == again[:2] == (200, {"stored": 1})
    assert again[2].get("Idempotent-Replayed") == "true"
    assert len(harness.recorder.events) == 1

    status, answer, _ = await harness.push(event(text="autre chose"), key="same")
    assert status == 422 and answer["error"] == "idempotency_key_reused"
    assert len(harness.recorder.events) == 1


async def test_a_repeat_while_the_first_is_being_stored_gets_409(harness: Harness) -> None:
    harness.recorder.gate = asyncio.Event()
    first = asyncio.create_task(harness.push(event(), key="slow"))
    async with asyncio.timeout(5):
        await harness.recorder.entered.wait()
    status, answer, headers = await harness.push(event(), key="slow")
    assert status == 409 and answer["error"] == "request_in_progress"
    assert headers["Retry-After"] == "1"
    harness.recorder.gate.set()
    assert (await first)[0] == 200
    assert len(harness.recorder.events) == 1


async def test_a_storage_failure_is_a_503_and_the_same_request_then_succeeds(
    harness: Harness,
) -> None:
    harness.recorder.fail_next = 1
    status, answer, headers = await harness.push(event(), key="retry-me")
    assert status == 503 and answer["error"] == "not_stored" and int(headers["Retry-After"]) > 0
    assert harness.recorder.events == []
    status, _, _ = await harness.push(event(), key="retry-me")
    assert status == 200 and len(harness.recorder.events) == 1


async def test_the_same_event_under_a_new_key_is_harmless_downstream(harness: Harness) -> None:
    # The endpoint stores it again; the bridge's inbox keeps (connector, event id) once.
    await harness.push(event(), key="a")
    await harness.push(event(), key="b")
    assert {e.event_id for e in harness.recorder.events} == {"evt-1"}


# --- The events endpoint: malformed requests ------------------------------------------------------


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


MALFORMED: list[tuple[str, Any, int, str]] = [
    ("not json", b'{"id": "e1", "type": ', 400, "not valid JSON"),
    ("not utf-8", b'{"id": "\xff"}', 400, "UTF-8"),
    ("nan", b'{"id": NaN}', 400, "not valid JSON"),
    ("deeply nested", _deep(100_000), 400, "JSON"),
    ("lone surrogate", b'{"id": "\\ud800", "type": "message"}', 400, "surrogate"),
    ("array", [event()], 400, "JSON object"),
    ("unknown type", event("conversation.deleted"), 400, "type must be one of"),
    ("missing field", {k: v for k, v in event().items() if k != "sender"}, 400, "the event.sender"),
    ("unknown field", event(colour="blue"), 400, "unknown field 'colour'"),
    ("wrong type", event(text=12), 400, "the event.text must be a string"),
    ("id not ascii", event(id="évènement"), 400, "visible ASCII"),
    ("id too long", event(id="x" * 201), 400, "1 to 200"),
    ("idnps with letters", event(sender="81000090001A"), 400, "IDNPS"),
    ("idnps luhn", event(sender="810000900019"), 422, "Luhn"),
    ("idnps with spaces", event(sender=f" {INES}"), 400, "spaces"),
    ("timestamp without offset", event(at="2025-01-31T08:00:00"), 400, "RFC 3339"),
    ("timestamp out of range", event(at="2025-13-31T08:00:00Z"), 400, "RFC 3339"),
    ("timestamp before 1970", event(at="1969-12-31T23:59:59Z"), 400, "1970"),
    ("timestamp in year 3000", event(at="3000-01-01T00:00:00Z"), 400, "1970"),
    (
        "size not an integer",
        event(attachment={"file_id": "f", "name": "x", "mime_type": "a/b", "size": 1.5}),
        400,
        "size must be an integer",
    ),
    ("empty message", event(text=""), 400, "non-empty text, an attachment or a location"),
    ("nul in text", event(text="a\u0000b"), 400, "NUL"),
    ("text too long", event(text="x" * 65537), 400, "65536"),
    ("bad kind", event(kind="shout"), 400, "kind must be one of"),
    ("kind a list", event(kind=["text"]), 400, "kind must be one of"),
    ("type a list", event(type=["message"]), 400, "type must be one of"),
    ("bad participant", event("conversation.created", participants=["@nobody"]), 400, "Matrix"),
    ("no participants", event("conversation.created", participants=[]), 400, "1 to 100"),
    (
        "bad location",
        event(location={"latitude": 91, "longitude": 0}),
        400,
        "latitude must be within",
    ),
    (
        "bad attachment",
        event(attachment={"file_id": "f", "name": "x", "mime_type": "PDF", "size": 1}),
        400,
        "MIME",
    ),
    ("bad mention", event(mentions=[{"ref": "nobody", "display_name": "X"}]), 400, "IDNPS"),
    ("typing not bool", event("typing", sender=str(INES), typing="yes"), 400, "true or false"),
    ("empty batch", {"events": []}, 400, "non-empty array"),
    ("too many events", {"events": [event(id=f"e{i}") for i in range(101)]}, 400, "at most 100"),
    ("batch with extra", {"events": [event()], "more": 1}, 400, "unknown field 'more'"),
    ("bad event in batch", {"events": [event(), event(id="")]}, 400, "events[1].id"),
]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [pytest.param(body, status, words, id=case) for case, body, status, words in MALFORMED],
)
async def test_malformed_events_get_a_clear_4xx_and_nothing_is_stored(
    harness: Harness, body: Any, status: int, words: str
) -> None:
    got, answer, _ = await harness.push(body)
    assert got == status, answer
    assert words in answer["message"], answer
    assert answer["error"]
    assert harness.recorder.events == []


async def test_a_batch_is_all_or_nothing(harness: Harness) -> None:
    status, _, _ = await harness.push({"events": [event(id="ok"), event(id="bad", sender="1")]})
    assert status == 400
    assert harness.recorder.events == []


async def test_oversize_bodies_are_refused_with_413(harness: Harness) -> None:
    big = json.dumps(event(text="x" * 60_000)).encode()
    body = json.dumps({"events": [event(id=f"e{i}", text="x" * 60_000) for i in range(20)]})
    status, answer, _ = await harness.push(body.encode())
    assert status == 413 and "1048576 bytes" in answer["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: streamed, cut at the limit
        for _ in range(20):
            yield big

    ts = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": "k",
        "X-Eimis-Timestamp": ts,
        "X-Eimis-Signature": "sha256=" + "0" * 64,
    }
    async with harness.http.post(harness.events_url, data=chunks(), headers=headers) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "body_too_large"
    assert harness.recorder.events == []


async def test_wrong_media_type_method_or_missing_key_are_4xx_in_json(harness: Harness) -> None:
    status, answer, _ = await harness.push(event(), headers={"Content-Type": "text/plain"})
    assert status == 415 and answer["error"] == "unsupported_media_type"
    status, answer, _ = await harness.push(event(), key=None)
    assert status == 400 and "Idempotency-Key" in answer["message"]
    status, answer, _ = await harness.push(event(), key="clé non ascii")
    assert status == 400
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        async with harness.http.request(method, harness.events_url) as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
            assert (await resp.json())["error"] == "method_not_allowed"
    assert harness.recorder.events == []


async def test_a_vendor_pushing_too_fast_gets_429_with_retry_after() -> None:
    async with running(rate_limit_per_s=0.01, rate_limit_burst=2) as h:
        unsigned = await h.push(event(id="x"), key="x", secret="y" * 40)
        assert unsigned[0] == 401  # refused before the rate limit: it spends no budget
        assert (await h.push(event(id="a"), key="a"))[0] == 200
        assert (await h.push(event(id="b"), key="b"))[0] == 200
        status, answer, headers = await h.push(event(id="c"), key="c")
        assert status == 429 and answer["error"] == "rate_limited"
        assert int(headers["Retry-After"]) >= 1
        assert len(h.recorder.events) == 2


async def test_refusals_log_no_content_and_no_secret(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await harness.push(event(text="diagnostic confidentiel", sender="812345678901"))
    await harness.push(event(text="diagnostic confidentiel"), secret="x" * 40)
    assert "the event.sender" in caplog.text and "does not match" in caplog.text
    assert "diagnostic confidentiel" not in caplog.text
    assert SECRET not in caplog.text


async def test_capabilities_endpoint_shows_the_registration_to_a_signed_get(
    harness: Harness,
) -> None:
    url = f"{harness.receiver.url}/connectors/{CONNECTOR_ID}/capabilities"
    ts = str(int(time.time()))
    headers = {"X-Eimis-Timestamp": ts, "X-Eimis-Signature": signature(SECRET, ts, b"")}
    async with harness.http.get(url, headers=headers) as resp:
        assert resp.status == 200
        registration = await resp.json()
    assert registration["connector_id"] == CONNECTOR_ID
    assert registration["events_url"] == harness.events_url
    assert registration["capabilities"]["formatting"] == "markdown"
    assert registration["limits"]["max_events_per_request"] == 100
    async with harness.http.get(url) as resp:
        assert resp.status == 401


# --- Bridge -> vendor -----------------------------------------------------------------------------


def text_message(request_id: str, text: str = "Bonjour", **fields: Any) -> OutboundMessage:
    return OutboundMessage(
        request_id=request_id,
        sender=fields.pop("sender", CAROL),
        text=text,
        timestamp=datetime.now(UTC),
        **fields,
    )


async def test_conversation_and_messages_are_delivered_once(harness: Harness) -> None:
    request = NewConversation(
        request_id="!room:example.org",
        title="Depuis Matrix",
        members=(INES, HUGO),
        external=(CAROL, Sender("@dr.x:example.org", "Dr X", idnps=OUTSIDER)),
    )
    conv = await harness.connector.create_conversation(request)
    assert await harness.connector.create_conversation(request) == conv
    mine = await harness.user("GET", f"users/{INES}/conversations")
    assert [c["conversation_id"] for c in mine["conversations"]] == [conv]
    assert mine["conversations"][0]["external"] == [CAROL.mxid, OUTSIDER]

    message = text_message(
        "$event-1:example.org",
        "Voir **ceci**, @Inès Garnier",
        html="Voir <strong>ceci</strong>",
        mentions=(Mention("Inès Garnier", idnps=INES),),
        message_kind="emote",
    )
    first = await harness.connector.send_message(conv, message)
    assert await harness.connector.send_message(conv, message) == first
    [received] = await harness.inbox(INES)
    assert received["message_id"] == first
    assert received["sender"] == CAROL.mxid and received["sender_name"] == "Carol Petit"
    assert received["text"] == "Voir **ceci**, @Inès Garnier"
    assert received["kind"] == "emote" and received["mentions"] == [INES]
    replayed = harness.vendor_requests("/messages")
    assert len(replayed) == 2 and replayed[0]["Idempotency-Key"] == "$event-1:example.org"

    reply = await harness.connector.send_message(
        conv, text_message("$event-2", "Oui", reply_to=first, location=Location(1.5, 2.5, "Ici"))
    )
    view = await harness.view(HUGO, conv)
    last = view["messages"][-1]
    assert last["message_id"] == reply and last["reply_to"] == first
    assert last["location"] == {"lat": 1.5, "lon": 2.5, "label": "Ici"}

    # No echo: what the bridge delivered is never pushed back (whatever the vendor published
    # has been pushed and acknowledged once its queue is empty).
    pusher = harness.sandbox.app[PUSHER_KEY]
    await wait_until(lambda: pusher.waiting == 0, what="the vendor's push queue to drain")
    assert harness.recorder.events == []


def attachment(
    data: bytes, name: str, mime_type: str, size: int | None = None
) -> OutboundAttachment:
    @asynccontextmanager
    async def opener() -> AsyncIterator[AsyncIterator[bytes]]:
        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(data), 7000):
                yield data[start : start + 7000]

        yield chunks()

    return OutboundAttachment(name, mime_type, len(data) if size is None else size, opener)


async def test_files_are_uploaded_streamed_and_signed_by_digest(harness: Harness) -> None:
    conv = await harness.connector.create_conversation(
        NewConversation("!files:example.org", None, (INES,), (CAROL,))
    )
    data = bytes(range(256)) * 1000
    message = text_message(
        "$file-1", "", attachment=attachment(data, "radio\n.png", "image/png", 0)
    )
    message_id = await harness.connector.send_message(conv, message)
    assert await harness.connector.send_message(conv, message) == message_id  # once
    [received] = await harness.inbox(INES)
    assert received["attachment"]["name"] == "radio.png"
    assert received["attachment"]["size"] == len(data)  # measured, not the declared 0
    file_id = received["attachment"]["file_id"]
    async with harness.http.get(
        f"{harness.sandbox.url}/_sandbox/users/{INES}/files/{file_id}"
    ) as resp:
        assert await resp.read() == data
    [upload, _] = harness.vendor_requests("/files")
    assert len(upload["X-Eimis-Content-SHA256"]) == 64
    assert upload["Content-Length"] == str(len(data))


async def test_files_over_the_declared_size_are_refused_before_sending() -> None:
    small = {"m.file": {"max_size": 1000, "mime_types": ["application/pdf"]}}
    caps = vendor_sandbox("webhook").settings("http://x")["capabilities"] | {"files": small}
    async with running(capabilities=caps) as h:
        conv = await h.connector.create_conversation(
            NewConversation("!big:example.org", None, (INES,), (CAROL,))
        )
        big = text_message(
            "$big", "", attachment=attachment(b"x" * 1001, "a.pdf", "application/pdf", 10)
        )
        with pytest.raises(ConnectorError) as refused:
            await h.connector.send_message(conv, big)
        assert refused.value.retriable is False and "1000 bytes" in str(refused.value)
        exe = text_message(
            "$exe", "", attachment=attachment(b"MZ", "a.exe", "application/x-msdownload")
        )
        with pytest.raises(ConnectorError) as wrong_type:
            await h.connector.send_message(conv, exe)
        assert wrong_type.value.retriable is False
        assert h.vendor_requests("/files") == []


async def test_edits_deletions_reactions_reads_typing_and_delivery_reports(
    harness: Harness,
) -> None:
    connector = harness.connector
    conv = await connector.create_conversation(
        NewConversation("!rich:example.org", None, (INES,), (CAROL,))
    )
    mid = await connector.send_message(conv, text_message("$m1", "Dose 50 mg"))
    await connector.edit_message(conv, mid, text_message("$edit", "Dose 5 mg"))
    await connector.edit_message(conv, mid, text_message("$edit", "Dose 5 mg"))  # a retry

    mine = await harness.write(INES, conv, text="Reçu")
    reaction = await connector.add_reaction(conv, mine, CAROL, "👍", "$r1")
    assert await connector.add_reaction(conv, mine, CAROL, "👍", "$r1") == reaction
    await connector.mark_read(conv, CAROL, mine)
    await connector.set_typing(conv, CAROL, True)
    await connector.report_delivery(conv, mine, DeliveryReport("degraded", "sent as plain text"))
    view = await harness.view(INES, conv)
    edited, own = view["messages"]
    assert edited["text"] == "Dose 5 mg" and edited["edited"] is True
    assert [r["emoji"] for r in own["reactions"]] == ["👍"]
    assert view["read_up_to"] == {CAROL.mxid: mine}
    assert view["typing"] == [CAROL.mxid]
    assert own["delivery"] == [{"status": "degraded", "detail": "sent as plain text"}]

    assert await connector.remove_reaction(conv, mine, reaction, CAROL) is True
    await connector.remove_reaction(conv, mine, reaction, CAROL)  # again: no error
    assert await connector.delete_message(conv, mid, CAROL) is True
    await connector.delete_message(conv, mid, CAROL)  # again: no error
    # 404: no error, but nothing was deleted, and the bridge is told so (never "delivered").
    assert await connector.delete_message(conv, "no-such-message", CAROL) is False
    await connector.set_typing(conv, CAROL, False)
    view = await harness.view(INES, conv)
    deleted, own = view["messages"]
    assert deleted["deleted"] is True and own["reactions"] == [] and view["typing"] == []


async def test_get_user_describes_known_users_and_none_for_others(harness: Harness) -> None:
    jade = await harness.connector.get_user(JADE)
    assert jade is not None and jade.display_name == "Jade MOREL - Masseur-kinésithérapeute"
    assert await harness.connector.get_user(OUTSIDER) is None


async def test_vendor_refusals_and_outages_map_to_connector_errors(harness: Harness) -> None:
    with pytest.raises(ConnectorError) as unknown:
        await harness.connector.send_message("no-such-conversation", text_message("$x"))
    assert unknown.value.retriable is False and "404" in str(unknown.value)

    conv = await harness.connector.create_conversation(
        NewConversation("!reuse:example.org", None, (INES,), (CAROL,))
    )
    await harness.connector.send_message(conv, text_message("$same", "un"))
    with pytest.raises(ConnectorError) as reused:
        await harness.connector.send_message(conv, text_message("$same", "deux"))
    assert reused.value.retriable is False and "idempotency_key_reused" in str(reused.value)

    await harness.sandbox.down()
    with pytest.raises(ConnectorError) as down:
        await harness.connector.send_message(conv, text_message("$down"))
    assert down.value.retriable and down.value.unreachable


async def test_429_and_5xx_are_retriable_and_retry_after_is_kept() -> None:
    answers = iter(
        [
            web.json_response(
                {"error": "slow_down", "message": "x"}, status=429, headers={"Retry-After": "7"}
            ),
            web.json_response({"error": "oops", "message": "x"}, status=502),
        ]
    )

    async def vendor(_: web.Request) -> web.Response:
        return next(answers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", vendor)
    served = Served(app)
    await served.start()
    connector = new_connector(served.url, Recorder(), FakeSecrets(current=SECRET))
    try:
        with pytest.raises(ConnectorError) as limited:
            await connector.send_message("c", text_message("$a"))
        assert limited.value.retriable and limited.value.retry_after == 7.0
        with pytest.raises(ConnectorError) as failed:
            await connector.send_message("c", text_message("$b"))
        assert failed.value.retriable and not failed.value.unreachable
    finally:
        await connector.stop()
        await served.close()


async def test_a_vendor_down_at_start_is_announced_to_once_it_is_back() -> None:
    sandbox = Served(create_app())
    await sandbox.start()
    await sandbox.down()
    connector = new_connector(
        sandbox.url, Recorder(), FakeSecrets(current=SECRET), public_base_url="http://b/c/wh"
    )
    connector.announce_retry_initial_s = 0.05
    try:
        await connector.start()  # does not raise
        await sandbox.start()
        pusher = sandbox.app[PUSHER_KEY]
        await wait_until(
            lambda: pusher.events_url == "http://b/c/wh/events", what="the announcement"
        )
    finally:
        await connector.stop()
        await sandbox.close()


# --- Settings and capabilities --------------------------------------------------------------------


def test_capabilities_are_declared_per_instance_and_validated() -> None:
    plain = new_connector("http://vendor.example", Recorder(), FakeSecrets(), capabilities={})
    rich = new_connector("http://vendor.example", Recorder(), FakeSecrets())
    # The contract carries 50 mentions a message at most: the bridge knows it. Every vendor
    # answers GET /users (404: no listing), so user_listing is always on.
    assert plain.capabilities == Capabilities(
        formatting="plain", max_text_length=4000, max_mentions=50, user_listing=True
    )
    assert rich.capabilities.edits and rich.capabilities.formatting == "markdown"
    assert rich.capabilities.files["m.image"].allows("image/png")
    # The class default is untouched (but for the user listing, which every instance has).
    assert WebhookConnector.capabilities == Capabilities(user_listing=True)

    as_json = json.dumps({"edits": True, "formatting": "markdown"})
    settings = WebhookSettings.model_validate(
        {"base_url": "https://v.example/", "capabilities": as_json}
    )
    assert settings.capabilities.edits and settings.base_url == "https://v.example"


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"capabilities": {"edtis": True}}, "edtis"),
        ({"capabilities": {"message_kinds": ["notice"]}}, "must include 'text'"),
        ({"capabilities": {"files": {"m.sticker": {"max_size": 1}}}}, "not a kind of file"),
        ({"capabilities": {"files": {"m.file": {"max_size": 0}}}}, "max_size"),
        ({"capabilities": {"files": {"m.file": {"max_size": 9, "mime_types": ["pdf"]}}}}, "MIME"),
        ({"capabilities": {"max_text_length": 70000}}, "max_text_length"),
        ({"capabilities": "{not json"}, "JSON object"),
        ({"secret": "short"}, "at least 32 characters"),
        ({"base_url": "ftp://vendor.example"}, "http"),
        ({"base_url": "https://vendor.example/?q=1"}, "without query"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_invalid_settings_are_refused_naming_the_key(settings: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError) as refused:
        WebhookSettings.model_validate({"base_url": "https://vendor.example"} | settings)
    assert words in str(refused.value)


async def test_the_system_operation_is_signed_idempotent_and_shown_as_system(
    harness: Harness,
) -> None:
    connector = harness.connector
    assert connector.capabilities.system_messages
    conv = await connector.create_conversation(
        NewConversation("!sys:example.org", None, (INES, HUGO), (CAROL,))
    )
    text = "Un message n'a pas pu être remis à mp : refusé"
    await connector.send_system_message(conv, text, "system:eimis.0123abcd")
    await connector.send_system_message(conv, text, "system:eimis.0123abcd")  # a retry
    for member in (INES, HUGO):
        [note] = await harness.inbox(member)
        assert (note["kind"], note["sender"], note["text"]) == ("system", "EIMIS", text)
    sent = harness.vendor_requests("/system")
    assert len(sent) == 2 and sent[0]["Idempotency-Key"] == sent[1]["Idempotency-Key"]
    assert sent[0]["Idempotency-Key"] == "system:eimis.0123abcd"
    assert sent[0]["X-Eimis-Signature"].startswith("sha256=")
