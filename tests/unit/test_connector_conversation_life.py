"""The connectors' part of "a conversation lives": membership, titles, topics and history.

Each vendor is played by a small fake over real HTTP that records every request (method,
path, query, headers, body) and answers what the test set; the shapes are the wire formats of
the issue 13 brief. Vendor events are parsed both by the converters and, for the pushed ones,
through the connector's own web route (signature, 400 naming the field, nothing stored).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from connectors.base import (
    ConnectorContext,
    ConnectorError,
    ConversationCreated,
    ConversationRenamed,
    MemberLeft,
    MessageReceived,
    Participant,
    ParticipantChange,
    ParticipantsAdded,
    ParticipantsRemoved,
    Sender,
    TopicChanged,
)
from connectors.kit.signing import sign
from connectors.medipeps import MedipepsConnector
from connectors.medipeps.connector import MedipepsSettings
from connectors.medipeps.convert import event_from_feed
from connectors.pandalab import PandaLabConnector
from connectors.pandalab.connector import PandaLabSettings
from connectors.pandalab.convert import events_from_webhook
from connectors.payload import InvalidPayload
from connectors.webhook import WebhookConnector
from connectors.webhook import signing as webhook_signing
from connectors.webhook.settings import WebhookSettings

from connector_helpers import Recorder, Served, mounted, rpps
from helpers import MemoryStore

ALICE = rpps(1)
BOB = rpps(2)
OUTSIDER = rpps(42)
CAROL_MXID = "@carol:matrix.example.org"
CAROL = Sender(mxid=CAROL_MXID, display_name="Carol")
DR_X = Sender(mxid="@dr.x:matrix.example.org", display_name="Dr X", idnps=OUTSIDER)
BAD_IDNPS = "812345678901"  # the IDNPS form, a wrong check digit
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)

PANDALAB_WEBHOOK_SECRET = "pandalab-test-webhook-secret-0123456789"
MEDIPEPS_KEY = "medipeps-test-key"
WEBHOOK_SECRET = "webhook-test-secret-0123456789abcdef0123"


# --- A fake vendor --------------------------------------------------------------------------------


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw) if self.raw else None


Answer = tuple[int, Any] | Callable[[Call], tuple[int, Any]]


@dataclass
class FakeVendor:
    """Answers ``(method, path)`` as set in ``answers`` (default 200 ``{}``), records calls;
    ``POST /oauth/token`` always gives a token (PandaLab)."""

    answers: dict[tuple[str, str], Answer] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if request.path == "/oauth/token":
            return web.json_response({"access_token": "tok", "expires_in": 3600})
        path = request.raw_path.split("?", 1)[0]  # as sent: an escaped "/" stays escaped
        call = Call(request.method, path, dict(request.query), dict(request.headers), raw)
        self.calls.append(call)
        answer = self.answers.get((request.method, path), (200, {}))
        status, body = answer(call) if callable(answer) else answer
        if body is None:
            return web.Response(status=status)
        return web.json_response(body, status=status)

    def only(self, method: str, path: str) -> Call:
        [call] = [c for c in self.calls if (c.method, c.path) == (method, path)]
        return call


@pytest.fixture
async def vendor() -> AsyncIterator[tuple[FakeVendor, Served]]:
    fake = FakeVendor()
    served = Served(fake.app())
    await served.start()
    try:
        yield fake, served
    finally:
        await served.close()


def context(settings: Any, recorder: Recorder, public_base_url: str = "") -> ConnectorContext:
    return ConnectorContext(
        connector_id="c1",
        settings=settings,
        emit=recorder,
        store=MemoryStore(),
        public_base_url=public_base_url,
    )


# === PandaLab =====================================================================================


def pandalab(url: str, recorder: Recorder | None = None) -> PandaLabConnector:
    settings = PandaLabSettings(
        api_url=url,
        client_id="bridge",
        client_secret="client-secret",
        webhook_secret=PANDALAB_WEBHOOK_SECRET,
    )
    return PandaLabConnector(context(settings, recorder or Recorder()))


def pl_envelope(kind: str, data: dict[str, Any], event_id: str = "evt-1") -> dict[str, Any]:
    return {"id": event_id, "type": kind, "created_at": T0.isoformat(), "data": data}


def pl_message(message_id: str, at: datetime, **fields: Any) -> dict[str, Any]:
    return {
        "id": message_id,
        "conversation_id": "conv-1",
        "author": str(ALICE),
        "markdown": f"text of {message_id}",
        "created_at": at.isoformat(),
        "kind": "text",
        "reply_to": None,
        "mentions": [],
        "attachment": None,
        "location": None,
        **fields,
    }


def test_pandalab_parses_participants_added_and_removed() -> None:
    data = {
        "conversation_id": "conv-1",
        "by": str(ALICE),
        "members": [str(BOB)],
        "external_participants": [{"ref": str(OUTSIDER)}, {"ref": CAROL_MXID}],
    }
    [added] = events_from_webhook(pl_envelope("conversation.participants_added", data))
    assert added == ParticipantsAdded(
        event_id="evt-1",
        conversation_id="conv-1",
        timestamp=T0,
        sender=ALICE,
        members=(BOB,),
        participants=(Participant(idnps=OUTSIDER), Participant(mxid=CAROL_MXID)),
    )
    only_external = {**data, "members": []}
    [removed] = events_from_webhook(pl_envelope("conversation.participants_removed", only_external))
    assert isinstance(removed, ParticipantsRemoved)
    assert removed.members == () and len(removed.participants) == 2


def test_a_conversation_opened_with_a_topic_carries_it() -> None:
    """PandaLab-style ``description`` and the webhook contract's ``topic`` at creation."""
    conversation = {
        "id": "conv-1",
        "title": "Staff",
        "description": "Suivi post-opératoire",
        "created_by": str(ALICE),
        "members": [str(ALICE)],
        "external_participants": [{"ref": CAROL_MXID}],
    }
    [created] = events_from_webhook(
        pl_envelope("conversation.created", {"conversation": conversation})
    )
    assert isinstance(created, ConversationCreated) and created.topic == "Suivi post-opératoire"
    [plain] = events_from_webhook(
        pl_envelope("conversation.created", {"conversation": {**conversation, "description": ""}})
    )
    assert isinstance(plain, ConversationCreated) and plain.topic is None


def test_pandalab_parses_member_left() -> None:
    data = {"conversation_id": "conv-1", "member": str(BOB)}
    [left] = events_from_webhook(pl_envelope("conversation.member_left", data))
    assert left == MemberLeft(event_id="evt-1", conversation_id="conv-1", timestamp=T0, sender=BOB)


def test_pandalab_update_gives_one_event_per_changed_key() -> None:
    data = {"conversation_id": "conv-1", "by": str(ALICE), "title": "Staff", "description": None}
    renamed, topic = events_from_webhook(pl_envelope("conversation.updated", data))
    assert renamed == ConversationRenamed(
        event_id="evt-1:title", conversation_id="conv-1", timestamp=T0, sender=ALICE, title="Staff"
    )
    assert topic == TopicChanged(
        event_id="evt-1:description",
        conversation_id="conv-1",
        timestamp=T0,
        sender=ALICE,
        topic=None,
    )
    only_topic = {"conversation_id": "conv-1", "by": str(ALICE), "description": "Garde"}
    [event] = events_from_webhook(pl_envelope("conversation.updated", only_topic))
    assert isinstance(event, TopicChanged) and event.topic == "Garde"


@pytest.mark.parametrize(
    ("kind", "data", "words"),
    [
        (
            "conversation.participants_added",
            {"conversation_id": "c", "by": str(ALICE), "members": [BAD_IDNPS]},
            "data.members[0] is not a valid IDNPS",
        ),
        (
            "conversation.participants_added",
            {"conversation_id": "c", "by": str(ALICE), "members": [], "external_participants": []},
            "both empty",
        ),
        (
            "conversation.participants_removed",
            {"conversation_id": "c", "by": str(ALICE), "external_participants": [{"ref": "@x"}]},
            "data.external_participants[0].ref starting with '@' is not a Matrix user id",
        ),
        (
            "conversation.participants_removed",
            {"conversation_id": "c", "members": [str(BOB)]},
            "data.by",
        ),
        ("conversation.member_left", {"conversation_id": "c"}, "data.member"),
        (
            "conversation.participants_added",
            {"conversation_id": "c", "by": str(ALICE), "external_participants": [{}]},
            "data.external_participants[0].ref is missing",
        ),
        ("conversation.updated", {"conversation_id": "c", "by": str(ALICE)}, "neither"),
        (
            "conversation.updated",
            {"conversation_id": "c", "by": str(ALICE), "title": 3},
            "data.title is not a string",
        ),
        ("conversation.updated", {"by": str(ALICE), "title": "x"}, "data.conversation_id"),
    ],
)
def test_pandalab_malformed_changes_are_invalid_payloads(
    kind: str, data: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidPayload, match=words.replace("[", r"\[").replace("]", r"\]")):
        events_from_webhook(pl_envelope(kind, data))


async def pl_post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    raw = json.dumps(body).encode()
    ts = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-PandaLab-Timestamp": ts,
        "X-PandaLab-Signature": sign(PANDALAB_WEBHOOK_SECRET, ts, raw),
    }
    async with http.post(url, data=raw, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_pandalab_webhook_stores_both_halves_of_an_update_and_refuses_bad_ones() -> None:
    recorder = Recorder()
    connector = pandalab("http://127.0.0.1:1", recorder)
    receiver = Served(mounted(connector, "c1"))
    await receiver.start()
    url = f"{receiver.url}/connectors/c1/webhook"
    try:
        async with aiohttp.ClientSession() as http:
            update = {
                "conversation_id": "conv-1",
                "by": str(ALICE),
                "title": "T",
                "description": "D",
            }
            status, _ = await pl_post(http, url, pl_envelope("conversation.updated", update))
            assert status == 200
            assert [e.event_id for e in recorder.events] == ["evt-1:title", "evt-1:description"]

            bad = {"conversation_id": "conv-1", "by": str(ALICE), "members": [BAD_IDNPS]}
            status, answer = await pl_post(
                http, url, pl_envelope("conversation.participants_added", bad, "evt-2")
            )
            assert status == 400
            assert "data.members[0]" in answer["message"] and answer["error"] == "invalid_event"
            assert len(recorder.events) == 2
    finally:
        await connector.stop()
        await receiver.close()


async def test_pandalab_adds_and_removes_people(vendor: tuple[FakeVendor, Served]) -> None:
    fake, served = vendor
    connector = pandalab(served.url)
    try:
        change = ParticipantChange("req-1", members=(BOB,), external=(CAROL, DR_X), by=DR_X)
        await connector.add_participants("conv/1", change)  # one path segment, escaped
        call = fake.only("POST", "/api/v1/conversations/conv%2F1/participants")
        assert call.headers["Idempotency-Key"] == "req-1"
        assert call.headers["Authorization"] == "Bearer tok"
        assert call.json == {
            "members": [str(BOB)],
            "external_participants": [
                {"ref": CAROL_MXID, "display_name": "Carol"},
                {"ref": str(OUTSIDER), "display_name": "Dr X"},
            ],
            "added_by": {"ref": str(OUTSIDER), "display_name": "Dr X"},
        }

        await connector.remove_external("conv-2", ParticipantChange("req-2", external=(CAROL,)))
        call = fake.only("POST", "/api/v1/conversations/conv-2/participants/remove")
        assert call.json == {
            "members": [],
            "external_participants": [CAROL_MXID],
            "removed_by": None,
        }
        assert call.headers["Idempotency-Key"].startswith("req-2")

        await connector.remove_members("conv-3", ParticipantChange("req-3", (BOB,), by=CAROL))
        call = fake.only("POST", "/api/v1/conversations/conv-3/participants/remove")
        assert call.json == {
            "members": [str(BOB)],
            "external_participants": [],
            "removed_by": {"ref": CAROL_MXID, "display_name": "Carol"},
        }
        assert call.headers["Idempotency-Key"].startswith("req-3")
    finally:
        await connector.stop()


async def test_pandalab_sets_title_and_description(vendor: tuple[FakeVendor, Served]) -> None:
    fake, served = vendor
    connector = pandalab(served.url)
    try:
        await connector.set_title("conv-1", "Staff", CAROL)
        await connector.set_topic("conv-1", None, DR_X)
        title, topic = [c for c in fake.calls if c.method == "PATCH"]
        assert title.path == topic.path == "/api/v1/conversations/conv-1"
        assert title.json == {
            "title": "Staff",
            "changed_by": {"ref": CAROL_MXID, "display_name": "Carol"},
        }
        assert topic.json == {
            "description": None,
            "changed_by": {"ref": str(OUTSIDER), "display_name": "Dr X"},
        }
    finally:
        await connector.stop()


async def test_pandalab_vendor_errors_map_to_connector_errors(
    vendor: tuple[FakeVendor, Served],
) -> None:
    fake, served = vendor
    fake.answers[("POST", "/api/v1/conversations/c/participants")] = (
        404,
        {"error": "user_not_found", "message": "no such user"},
    )
    fake.answers[("PATCH", "/api/v1/conversations/c")] = (503, {"error": "down"})
    connector = pandalab(served.url)
    try:
        with pytest.raises(ConnectorError) as unknown:
            await connector.add_participants("c", ParticipantChange("r", members=(BOB,)))
        assert unknown.value.retriable is False and "user_not_found" in str(unknown.value)
        with pytest.raises(ConnectorError) as down:
            await connector.set_title("c", "x", CAROL)
        assert down.value.retriable is True
    finally:
        await connector.stop()


async def test_pandalab_history_reads_messages_as_the_webhook_does(
    vendor: tuple[FakeVendor, Served], caplog: pytest.LogCaptureFixture
) -> None:
    fake, served = vendor
    attachment = {"name": "scan.pdf", "mime_type": "application/pdf", "size": 3, "url": "u"}
    messages = [
        pl_message("m0", T0 - timedelta(days=1)),  # before since: left out
        pl_message("m1", T0, attachment={**attachment, "url": f"{served.url}/api/v1/files/f1"}),
        pl_message("m2", T0 + timedelta(minutes=1), author=BAD_IDNPS, markdown="secret words"),
        pl_message("m3", T0 + timedelta(minutes=2), reply_to="m1"),
    ]
    fake.answers[("GET", "/api/v1/conversations/conv-1/messages")] = (200, {"messages": messages})
    connector = pandalab(served.url)
    try:
        got = await connector.history("conv-1", limit=50, since=T0)
    finally:
        await connector.stop()
    call = fake.only("GET", "/api/v1/conversations/conv-1/messages")
    assert call.query == {"limit": "50", "since": T0.isoformat()}
    assert [m.message_id for m in got] == ["m1", "m3"]
    assert all(isinstance(m, MessageReceived) for m in got)
    assert [m.event_id for m in got] == ["history:m1", "history:m3"]
    assert got[0].attachment is not None and got[0].attachment.name == "scan.pdf"
    assert got[0].timestamp == T0 and got[0].sender == ALICE
    assert got[1].reply_to == "m1" and got[1].text == "text of m3"
    assert "messages[2].author" in caplog.text and "secret words" not in caplog.text


async def test_pandalab_history_keeps_the_last_limit_and_caps_it(
    vendor: tuple[FakeVendor, Served],
) -> None:
    fake, served = vendor
    messages = [pl_message(f"m{i}", T0 + timedelta(seconds=i)) for i in range(5)]
    path = "/api/v1/conversations/conv-1/messages"
    fake.answers[("GET", path)] = (200, {"messages": messages})
    connector = pandalab(served.url)
    try:
        got = await connector.history("conv-1", limit=2, since=T0)
        assert [m.message_id for m in got] == ["m3", "m4"]
        await connector.history("conv-1", limit=5000, since=T0)
        assert fake.calls[-1].query["limit"] == "1000"
        fake.answers[("GET", "/api/v1/conversations/conv-2/messages")] = (
            200,
            {"messages": messages},
        )
        other = await connector.history("conv-2", limit=5, since=T0)
        assert other == [], "messages of another conversation are not this one's history"
        fake.answers[("GET", path)] = (200, {"messages": {}})
        with pytest.raises(ConnectorError) as malformed:
            await connector.history("conv-1", limit=2, since=T0)
        assert malformed.value.retriable is False
    finally:
        await connector.stop()


# === Medipeps =====================================================================================


def medipeps(url: str) -> MedipepsConnector:
    settings = MedipepsSettings(api_url=url, api_key=MEDIPEPS_KEY)
    return MedipepsConnector(context(settings, Recorder()))


def mp_msg(msg: int, at: datetime, conv: int = 7, **fields: Any) -> dict[str, Any]:
    return {
        "msg": msg,
        "conv": conv,
        "author": str(ALICE),
        "body": f"body {msg}",
        "at": round(at.timestamp() * 1000),
        "reply_to": None,
        "attachment": None,
        **fields,
    }


def test_medipeps_parses_add_part_leave_and_subject() -> None:
    at = round(T0.timestamp() * 1000)
    added = event_from_feed(
        {
            "seq": 11,
            "type": "ADD_PART",
            "at": at,
            "part": {
                "conv": 7,
                "by": str(ALICE),
                "participants": [str(BOB)],
                "guests": [{"ref": CAROL_MXID}],
            },
        }
    )
    assert added == ParticipantsAdded(
        event_id="part-11",
        conversation_id="7",
        timestamp=T0,
        sender=ALICE,
        members=(BOB,),
        participants=(Participant(mxid=CAROL_MXID),),
    )
    left = event_from_feed(
        {"seq": 12, "type": "LEAVE", "at": at, "leave": {"conv": 7, "who": str(BOB)}}
    )
    assert left == MemberLeft(event_id="leave-12", conversation_id="7", timestamp=T0, sender=BOB)
    renamed = event_from_feed(
        {
            "seq": 13,
            "type": "SUBJECT",
            "at": at,
            "subject": {"conv": 7, "by": str(ALICE), "subject": "S"},
        }
    )
    assert renamed == ConversationRenamed(
        event_id="subject-13", conversation_id="7", timestamp=T0, sender=ALICE, title="S"
    )
    cleared = event_from_feed(
        {
            "seq": 14,
            "type": "SUBJECT",
            "at": at,
            "subject": {"conv": 7, "by": str(ALICE), "subject": None},
        }
    )
    assert isinstance(cleared, ConversationRenamed) and cleared.title is None


@pytest.mark.parametrize(
    ("event", "words"),
    [
        (
            {
                "seq": 1,
                "type": "ADD_PART",
                "at": 0,
                "part": {"conv": 7, "by": BAD_IDNPS, "participants": [str(BOB)]},
            },
            "part.by",
        ),
        (
            {
                "seq": 1,
                "type": "ADD_PART",
                "at": 0,
                "part": {"conv": 7, "by": str(ALICE), "guests": []},
            },
            "both empty",
        ),
        (
            {
                "seq": 1,
                "type": "ADD_PART",
                "at": 0,
                "part": {"by": str(ALICE), "participants": [str(BOB)]},
            },
            "part.conv",
        ),
        ({"seq": 1, "type": "LEAVE", "at": 0, "leave": {"conv": 7}}, "leave.who"),
        ({"type": "LEAVE", "at": 0, "leave": {"conv": 7, "who": str(BOB)}}, "seq"),
        (
            {
                "seq": 1,
                "type": "SUBJECT",
                "at": 0,
                "subject": {"conv": 7, "by": str(ALICE), "subject": 5},
            },
            "subject.subject",
        ),
    ],
)
def test_medipeps_malformed_changes_are_invalid_payloads(event: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidPayload, match=words):
        event_from_feed(event)


async def test_medipeps_adds_people_lets_guests_leave_and_renames(
    vendor: tuple[FakeVendor, Served],
) -> None:
    fake, served = vendor
    fake.answers[("POST", "/mp/conversations/7/guests/leave")] = (204, None)
    connector = medipeps(served.url)
    try:
        change = ParticipantChange("req-1", members=(BOB,), external=(CAROL, DR_X), by=DR_X)
        await connector.add_participants("7", change)
        call = fake.only("POST", "/mp/conversations/7/participants")
        assert call.headers["X-Api-Key"] == MEDIPEPS_KEY
        assert call.json == {
            "participants": [str(BOB)],
            "guests": [
                {"ref": CAROL_MXID, "label": "Carol"},
                {"ref": str(OUTSIDER), "label": "Dr X"},
            ],
            "by_ref": str(OUTSIDER),
            "request_ref": "req-1",
        }
        await connector.add_participants("7", ParticipantChange("req-0", members=(BOB,)))
        assert fake.calls[-1].json["by_ref"] is None

        await connector.remove_external("7", ParticipantChange("req-2", external=(CAROL,)))
        call = fake.only("POST", "/mp/conversations/7/guests/leave")
        assert call.json == {"refs": [CAROL_MXID], "request_ref": "req-2"}

        await connector.set_title("7", "Sujet", CAROL)
        call = fake.only("PATCH", "/mp/conversations/7")
        assert call.json == {"subject": "Sujet", "by_ref": CAROL_MXID}

        with pytest.raises(ConnectorError) as not_an_id:
            await connector.set_title("abc", "x", CAROL)
        assert not_an_id.value.retriable is False
    finally:
        await connector.stop()


async def test_medipeps_refusals_map_to_connector_errors(vendor: tuple[FakeVendor, Served]) -> None:
    fake, served = vendor
    fake.answers[("POST", "/mp/conversations/7/guests/leave")] = (
        403,
        {"code": "FORBIDDEN", "detail": "participants cannot be removed"},
    )
    fake.answers[("POST", "/mp/conversations/7/participants")] = (500, {"code": "OOPS"})
    connector = medipeps(served.url)
    try:
        with pytest.raises(ConnectorError) as forbidden:
            await connector.remove_external("7", ParticipantChange("r", external=(DR_X,)))
        assert forbidden.value.retriable is False and "FORBIDDEN" in str(forbidden.value)
        with pytest.raises(ConnectorError) as broken:
            await connector.add_participants("7", ParticipantChange("r", members=(BOB,)))
        assert broken.value.retriable is True
    finally:
        await connector.stop()


async def test_medipeps_history_reads_the_conversation_feed_from_its_start(
    vendor: tuple[FakeVendor, Served], caplog: pytest.LogCaptureFixture
) -> None:
    fake, served = vendor
    pdf = {"filename": "a.pdf", "mime": "application/pdf", "size": 3, "data_b64": "YWJj"}
    feed = [
        mp_msg(1, T0 - timedelta(days=40)),  # too old
        mp_msg(2, T0, attachment=pdf),
        mp_msg(3, T0 + timedelta(seconds=1), author=BAD_IDNPS, body="secret words"),
        mp_msg(4, T0 + timedelta(seconds=2), reply_to=2),
        mp_msg(5, T0 + timedelta(seconds=3)),
        mp_msg(6, T0 + timedelta(seconds=4)),
    ]

    def page(call: Call) -> tuple[int, Any]:
        after, limit = int(call.query["after"]), int(call.query["limit"])
        rest = [m for m in feed if m["msg"] > after][: min(limit, 2)]  # short pages
        return 200, {"messages": rest, "cursor": rest[-1]["msg"] if rest else after}

    fake.answers[("GET", "/mp/conversations/7/messages")] = page
    connector = medipeps(served.url)
    try:
        got = await connector.history("7", limit=3, since=T0)
        everything = await connector.history("7", limit=50, since=T0)
    finally:
        await connector.stop()
    reads = [c.query for c in fake.calls][:4]
    assert [q["after"] for q in reads] == ["0", "2", "4", "6"]
    assert [m.message_id for m in got] == ["4", "5", "6"]
    assert [m.event_id for m in got] == ["msg-4", "msg-5", "msg-6"], "the live NEW_MSG ids"
    assert got[0].reply_to == "2"
    assert [m.message_id for m in everything] == ["2", "4", "5", "6"]
    assert everything[0].attachment is not None and everything[0].attachment.name == "a.pdf"
    assert everything[0].attachment.size == 3
    assert "msg.author" in caplog.text and "secret words" not in caplog.text


async def test_medipeps_history_stops_on_a_cursor_that_does_not_move(
    vendor: tuple[FakeVendor, Served],
) -> None:
    fake, served = vendor
    fake.answers[("GET", "/mp/conversations/7/messages")] = (
        200,
        {"messages": [mp_msg(1, T0)], "cursor": 0},
    )
    connector = medipeps(served.url)
    try:
        got = await connector.history("7", limit=5, since=T0)
        assert [m.message_id for m in got] == ["1"] and len(fake.calls) == 1
        fake.answers[("GET", "/mp/conversations/7/messages")] = (200, {"messages": []})
        with pytest.raises(ConnectorError):
            await connector.history("7", limit=5, since=T0)
    finally:
        await connector.stop()


# === Webhook contract =============================================================================

ALL_OPERATIONS = ("add_participants", "remove_participants", "titles", "topics", "history")


def webhook(url: str, recorder: Recorder | None = None, **capabilities: bool) -> WebhookConnector:
    settings = WebhookSettings.model_validate(
        {
            "base_url": url,
            "secret": WEBHOOK_SECRET,
            "capabilities": capabilities or dict.fromkeys(ALL_OPERATIONS, True),
            "announce": False,
        }
    )
    return WebhookConnector(context(settings, recorder or Recorder()))


def wh_event(type_: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": "evt-1",
        "type": type_,
        "conversation_id": "conv-1",
        "at": "2025-03-01T08:00:00Z",
        "sender": str(ALICE),
        **fields,
    }


@dataclass
class Pusher:
    http: aiohttp.ClientSession
    url: str
    keys: int = 0

    async def push(self, body: Any) -> tuple[int, dict[str, Any]]:
        raw = json.dumps(body).encode()
        ts = str(int(time.time()))
        self.keys += 1
        headers = {
            "Content-Type": "application/json",
            "X-Eimis-Timestamp": ts,
            "X-Eimis-Signature": sign(WEBHOOK_SECRET, ts, raw),
            "Idempotency-Key": f"key-{self.keys}",
        }
        async with self.http.post(self.url, data=raw, headers=headers) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def pushed() -> AsyncIterator[tuple[Pusher, Recorder]]:
    recorder = Recorder()
    connector = webhook("http://127.0.0.1:1", recorder)
    receiver = Served(mounted(connector, "c1"))
    await receiver.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Pusher(http, f"{receiver.url}/connectors/c1/events"), recorder
    finally:
        await connector.stop()
        await receiver.close()


async def test_webhook_change_events_reach_the_bridge(pushed: tuple[Pusher, Recorder]) -> None:
    pusher, recorder = pushed
    batch = [
        wh_event("participants.added", id="e1", members=[str(BOB)], participants=[CAROL_MXID]),
        wh_event("participants.removed", id="e2", participants=[str(OUTSIDER)]),
        wh_event("member.left", id="e3", sender=str(BOB)),
        wh_event("conversation.renamed", id="e4", title="Staff"),
        wh_event("conversation.renamed", id="e5", title=None),
        wh_event("conversation.topic", id="e6", topic="Garde de nuit"),
        wh_event("conversation.topic", id="e7", topic=None),
    ]
    status, answer = await pusher.push({"events": batch})
    assert status == 200, answer
    added, removed, left, renamed, cleared, topic, no_topic = recorder.events
    assert added == ParticipantsAdded(
        event_id="e1",
        conversation_id="conv-1",
        timestamp=T0,
        sender=ALICE,
        members=(BOB,),
        participants=(Participant(mxid=CAROL_MXID),),
    )
    assert isinstance(removed, ParticipantsRemoved)
    assert removed.members == () and removed.participants == (Participant(idnps=OUTSIDER),)
    assert left == MemberLeft(event_id="e3", conversation_id="conv-1", timestamp=T0, sender=BOB)
    assert isinstance(renamed, ConversationRenamed) and renamed.title == "Staff"
    assert isinstance(cleared, ConversationRenamed) and cleared.title is None
    assert isinstance(topic, TopicChanged) and topic.topic == "Garde de nuit"
    assert isinstance(no_topic, TopicChanged) and no_topic.topic is None


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (wh_event("participants.added"), 400, "at least one of members or participants"),
        (wh_event("participants.added", members=[BAD_IDNPS]), 422, "the event.members[0]"),
        (
            wh_event("participants.added", participants=["@nobody"]),
            400,
            "the event.participants[0]",
        ),
        (wh_event("participants.removed", members="x"), 400, "the event.members must be an array"),
        (wh_event("participants.removed", colour="blue", members=[str(BOB)]), 400, "unknown field"),
        ({**wh_event("member.left"), "sender": None}, 400, "the event.sender"),
        (wh_event("member.left", sender=BAD_IDNPS), 422, "Luhn"),
        (wh_event("conversation.renamed"), 400, "the event.title is required"),
        (wh_event("conversation.renamed", title=5), 400, "the event.title must be a string"),
        (wh_event("conversation.renamed", title="x" * 256), 400, "the event.title must be at most"),
        (wh_event("conversation.topic"), 400, "the event.topic is required"),
        (wh_event("conversation.topic", topic=["x"]), 400, "the event.topic must be a string"),
        (wh_event("conversation.topic", topic="a\u0000b"), 400, "NUL"),
        (wh_event("conversation.topic", topic="x" * 4001), 400, "longer than 4000"),
    ],
)
async def test_webhook_malformed_change_events_get_a_clear_4xx(
    pushed: tuple[Pusher, Recorder], body: dict[str, Any], status: int, words: str
) -> None:
    pusher, recorder = pushed
    got, answer = await pusher.push(body)
    assert got == status, answer
    assert words in answer["message"], answer
    assert recorder.events == []


def signed_by_bridge(call: Call) -> bool:
    return (
        webhook_signing.SIGNATURES.refusal(
            [WEBHOOK_SECRET],
            call.headers.get("X-Eimis-Timestamp"),
            call.headers.get("X-Eimis-Signature"),
            call.raw,
            now=time.time(),
            window_s=300,
        )
        is None
    )


def person(sender: Sender) -> dict[str, str]:
    return {"ref": sender.ref, "display_name": sender.display_name, "mxid": sender.mxid}


async def test_webhook_membership_calls(vendor: tuple[FakeVendor, Served]) -> None:
    fake, served = vendor
    for path in ("participants", "participants/remove"):
        fake.answers[("POST", f"/conversations/conv-1/{path}")] = (204, None)
    connector = webhook(served.url)
    try:
        change = ParticipantChange("req-1", members=(BOB,), external=(CAROL, DR_X), by=DR_X)
        await connector.add_participants("conv-1", change)
        await connector.remove_external("conv-1", ParticipantChange("req-2", external=(CAROL,)))
        await connector.remove_members(
            "conv-1", ParticipantChange("req-3", members=(BOB,), by=CAROL, reason="Fin\nde garde")
        )
    finally:
        await connector.stop()
    added, gone, removed = fake.calls
    assert (added.method, added.path) == ("POST", "/conversations/conv-1/participants")
    assert added.headers["Idempotency-Key"] == "req-1"
    assert added.json == {
        "members": [str(BOB)],
        "external": [person(CAROL), person(DR_X)],
        "by": person(DR_X),
    }
    assert gone.path == removed.path == "/conversations/conv-1/participants/remove"
    assert gone.json == {"members": [], "external": [person(CAROL)], "by": None, "reason": None}
    assert removed.json == {
        "members": [str(BOB)],
        "external": [],
        "by": person(CAROL),
        "reason": "Fin de garde",
    }
    assert gone.headers["Idempotency-Key"].startswith("req-2")
    assert removed.headers["Idempotency-Key"].startswith("req-3")
    assert all(signed_by_bridge(c) for c in fake.calls)


async def test_webhook_title_and_topic_calls(vendor: tuple[FakeVendor, Served]) -> None:
    fake, served = vendor
    fake.answers[("POST", "/conversations/c/title")] = (204, None)
    fake.answers[("POST", "/conversations/c/topic")] = (204, None)
    connector = webhook(served.url)
    try:
        await connector.set_title("c", "Staff\nthread", CAROL)
        await connector.set_title("c", "Staff\nthread", CAROL)
        await connector.set_topic("c", None, DR_X)
    finally:
        await connector.stop()
    first, again, topic = fake.calls
    assert first.path == "/conversations/c/title" and topic.path == "/conversations/c/topic"
    assert first.json == {"title": "Staff thread", "by": person(CAROL)}
    assert topic.json == {"topic": None, "by": person(DR_X)}
    assert first.headers["Idempotency-Key"] != again.headers["Idempotency-Key"], (
        "a rename back to an earlier title is a new request, not a replay"
    )
    assert all(signed_by_bridge(c) for c in fake.calls)


async def test_webhook_errors_map_to_connector_errors(vendor: tuple[FakeVendor, Served]) -> None:
    fake, served = vendor
    fake.answers[("POST", "/conversations/c/participants")] = (
        404,
        {"error": "unknown_user", "message": "no"},
    )
    fake.answers[("POST", "/conversations/c/title")] = (503, {"error": "down", "message": "x"})
    connector = webhook(served.url)
    try:
        with pytest.raises(ConnectorError) as unknown:
            await connector.add_participants("c", ParticipantChange("r", members=(BOB,)))
        assert unknown.value.retriable is False and "unknown_user" in str(unknown.value)
        assert "/conversations/{id}/participants" in str(unknown.value), "ids are not quoted"
        with pytest.raises(ConnectorError) as down:
            await connector.set_title("c", "x", CAROL)
        assert down.value.retriable is True
    finally:
        await connector.stop()


async def test_webhook_history_reads_message_events_as_pushed(
    vendor: tuple[FakeVendor, Served], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    fake, served = vendor

    def msg(n: int, at: datetime, **fields: Any) -> dict[str, Any]:
        return {
            "id": f"evt-{n}",
            "type": "message",
            "conversation_id": "conv-1",
            "at": at.isoformat().replace("+00:00", "Z"),
            "message_id": f"msg-{n}",
            "sender": str(ALICE),
            "text": f"text {n}",
            **fields,
        }

    file = {"file_id": "f-1", "name": "scan.pdf", "mime_type": "application/pdf", "size": 3}
    fake.answers[("GET", "/conversations/conv-1/messages")] = (
        200,
        {
            "messages": [
                msg(0, T0 - timedelta(days=1)),
                msg(1, T0, attachment=file),
                msg(2, T0, text="secret words", sender=BAD_IDNPS),
                {**msg(3, T0), "type": "typing"},
                msg(4, T0 + timedelta(seconds=1), reply_to="msg-1"),
            ]
        },
    )
    connector = webhook(served.url)
    try:
        got = await connector.history("conv-1", limit=10, since=T0)
    finally:
        await connector.stop()
    [call] = fake.calls
    assert call.method == "GET" and call.path == "/conversations/conv-1/messages"
    assert call.query == {"limit": "10", "since": "2025-03-01T08:00:00.000+00:00"}
    assert signed_by_bridge(call)
    assert [m.event_id for m in got] == ["evt-1", "evt-4"], "the ids the events were pushed with"
    assert [m.message_id for m in got] == ["msg-1", "msg-4"]
    assert got[0].attachment is not None and got[0].attachment.source == "f-1"
    assert got[1].reply_to == "msg-1"
    assert "messages[2].sender" in caplog.text and "messages[3]" in caplog.text
    assert "secret words" not in caplog.text


async def test_webhook_history_answer_without_messages_is_an_error(
    vendor: tuple[FakeVendor, Served],
) -> None:
    fake, served = vendor
    fake.answers[("GET", "/conversations/c/messages")] = (200, [])
    connector = webhook(served.url)
    try:
        with pytest.raises(ConnectorError) as malformed:
            await connector.history("c", limit=1, since=T0)
        assert malformed.value.retriable is False
    finally:
        await connector.stop()


def test_webhook_settings_declare_the_new_operations_off_by_default() -> None:
    declared = WebhookSettings.model_validate({"base_url": "http://vendor.example"})
    for flag in ALL_OPERATIONS:
        assert getattr(declared.capabilities, flag) is False
    titles_only = webhook("http://vendor.example", titles=True)
    assert titles_only.capabilities.titles and not titles_only.capabilities.topics
    assert not titles_only.capabilities.history and not titles_only.capabilities.add_participants
