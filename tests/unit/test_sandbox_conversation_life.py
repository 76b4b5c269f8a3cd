"""A conversation lives in the sandboxes: people are added and removed, members leave, the title
and description change, and the bridge reads the history. The kernel's publishing rules on a
recording publisher, then each vendor's endpoints and published events over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.idnps import Idnps
from connectors.medipeps import sandbox as medipeps
from connectors.pandalab import sandbox as pandalab
from connectors.sandbox import KERNEL_KEY
from connectors.sandbox.errors import SandboxError
from connectors.sandbox.kernel import (
    Conversation,
    External,
    Kernel,
    Message,
    Reaction,
)
from connectors.webhook import sandbox as webhook
from tests.unit.test_sandbox_webhook import SPEC, errors_of

ALICE = "@alice:matrix.example.org"
BOB = "@bob:matrix.example.org"
FOREIGN = "0123456782"
Client = TestClient[Any, Any]

PANDA = [u for u in pandalab.USERS]
CAMILLE, JULIEN, SOPHIE = (str(u.idnps) for u in PANDA[:3])


# --- The kernel's publishing rules ------------------------------------------------------------


class Recorder:
    """An EventPublisher that keeps (kind, details) in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def conversation_created(self, conversation: Conversation) -> None:
        self.calls.append(
            (
                "created",
                (
                    conversation.created_by,
                    conversation.members,
                    tuple(e.ref for e in conversation.external),
                ),
            )
        )

    def message_created(self, conversation: Conversation, message: Message) -> None:
        self.calls.append(("message", message.id))

    def message_edited(self, conversation: Conversation, message: Message) -> None:
        self.calls.append(("edited", message.id))

    def message_deleted(self, conversation: Conversation, message: Message) -> None:
        self.calls.append(("deleted", message.id))

    def reaction_added(self, conversation: Conversation, reaction: Reaction) -> None:
        self.calls.append(("reacted", reaction.id))

    def reaction_removed(self, conversation: Conversation, reaction: Reaction) -> None:
        self.calls.append(("unreacted", reaction.id))

    def conversation_read(
        self, conversation: Conversation, reader: Idnps, up_to: Message, at: datetime
    ) -> None:
        self.calls.append(("read", up_to.id))

    def typing_changed(
        self, conversation: Conversation, who: Idnps, typing: bool, at: datetime
    ) -> None:
        self.calls.append(("typing", typing))

    def participants_added(
        self,
        conversation: Conversation,
        by: Idnps,
        members: tuple[Idnps, ...],
        external: tuple[External, ...],
        at: datetime,
    ) -> None:
        self.calls.append(("added", (by, members, tuple(e.ref for e in external))))

    def participants_removed(
        self,
        conversation: Conversation,
        by: Idnps,
        members: tuple[Idnps, ...],
        external: tuple[External, ...],
        at: datetime,
    ) -> None:
        self.calls.append(("removed", (by, members, tuple(e.ref for e in external))))

    def member_left(self, conversation: Conversation, who: Idnps, at: datetime) -> None:
        self.calls.append(("left", who))

    def conversation_updated(
        self, conversation: Conversation, by: Idnps, changes: Mapping[str, str | None], at: datetime
    ) -> None:
        self.calls.append(("updated", (by, dict(changes))))


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, minutes: int) -> None:
        self.now += timedelta(minutes=minutes)


def new_kernel(**kwargs: Any) -> tuple[Kernel, Recorder, Clock]:
    counter = itertools.count(1)
    clock = Clock()
    kernel = Kernel(
        PANDA, vendor_name="Test", new_id=lambda _kind: str(next(counter)), clock=clock, **kwargs
    )
    recorder = Recorder()
    kernel.publisher = recorder
    return kernel, recorder, clock


def test_a_first_external_participant_publishes_the_conversation_as_created() -> None:
    kernel, recorder, _ = new_kernel()
    camille, julien = kernel.users[Idnps(CAMILLE)], kernel.users[Idnps(JULIEN)]
    conv = kernel.user_creates_conversation(camille, [JULIEN], "Interne").id
    kernel.user_writes(julien, conv, "avant")
    kernel.user_changes_participants(camille, conv, add=[SOPHIE])
    kernel.user_updates(camille, conv, title="Renommée")
    assert recorder.calls == []  # nobody outside: nothing published
    kernel.user_changes_participants(julien, conv, add=[ALICE, FOREIGN])
    assert recorder.calls == [
        ("created", (Idnps(CAMILLE), (CAMILLE, JULIEN, SOPHIE), (ALICE, FOREIGN)))
    ]


def test_changes_with_external_participants_are_published_and_no_ops_are_not() -> None:
    kernel, recorder, _ = new_kernel()
    camille = kernel.users[Idnps(CAMILLE)]
    conv = kernel.user_creates_conversation(camille, [ALICE], None).id
    recorder.calls.clear()
    kernel.user_changes_participants(camille, conv, add=[JULIEN, BOB, ALICE])
    kernel.user_changes_participants(camille, conv, add=[JULIEN], remove=[SOPHIE, FOREIGN])
    kernel.user_updates(camille, conv, title=None)  # it had none
    kernel.user_updates(camille, conv, title="Suivi", description="Plaie")
    kernel.user_updates(camille, conv, title="Suivi", description="Plaie")
    kernel.user_updates(camille, conv, description=None)
    kernel.user_changes_participants(camille, conv, remove=[JULIEN, BOB])
    assert recorder.calls == [
        ("added", (CAMILLE, (JULIEN,), (BOB,))),
        ("updated", (CAMILLE, {"title": "Suivi", "description": "Plaie"})),
        ("updated", (CAMILLE, {"description": None})),
        ("removed", (CAMILLE, (JULIEN,), (BOB,))),
    ]


def test_removing_the_last_external_is_published_then_nothing_more() -> None:
    kernel, recorder, _ = new_kernel()
    camille, julien = kernel.users[Idnps(CAMILLE)], kernel.users[Idnps(JULIEN)]
    conv = kernel.user_creates_conversation(camille, [JULIEN, ALICE], None).id
    recorder.calls.clear()
    kernel.user_changes_participants(camille, conv, remove=[ALICE])
    kernel.user_writes(julien, conv, "entre nous")
    kernel.user_leaves(julien, conv)
    assert recorder.calls == [("removed", (CAMILLE, (), (ALICE,)))]
    kernel.user_changes_participants(camille, conv, add=[BOB])
    assert recorder.calls[-1] == ("created", (Idnps(CAMILLE), (CAMILLE,), (BOB,)))


def test_api_side_changes_are_never_published_and_a_removed_member_stops_receiving() -> None:
    kernel, recorder, _ = new_kernel()
    conv, _ = kernel.api_creates_conversation(
        "k", "Portail", [CAMILLE, JULIEN], [External(ALICE, "Alice")]
    )
    kernel.api_adds_participants(conv.id, [SOPHIE], [External(BOB, "Bob")])
    kernel.api_adds_participants(conv.id, [SOPHIE], [External(BOB, "Bob")])  # again: no-op
    kernel.api_updates(conv.id, title="Nouveau", description="Sujet")
    kernel.api_removes_participants(conv.id, [JULIEN], [BOB, "@nobody:example.org"])
    assert recorder.calls == []
    assert conv.members == (CAMILLE, SOPHIE)
    assert [e.ref for e in conv.external] == [ALICE]
    assert (conv.title, conv.description) == ("Nouveau", "Sujet")
    kernel.api_writes("m1", conv.id, External(ALICE, "Alice"), "après")
    assert [m.text for m in kernel.inbox(Idnps(CAMILLE))] == ["après"]
    assert kernel.inbox(Idnps(JULIEN)) == []
    assert kernel.conversations_of(Idnps(JULIEN)) == []
    # A conversation opened by the bridge that loses its last external and gains one again
    # through a user is published as created, by that user.
    kernel.api_removes_participants(conv.id, [], [ALICE])
    kernel.user_changes_participants(kernel.users[Idnps(SOPHIE)], conv.id, add=[BOB])
    assert recorder.calls == [("created", (Idnps(SOPHIE), (CAMILLE, SOPHIE), (BOB,)))]


def test_user_side_refusals_in_the_kernel() -> None:
    kernel, _, _ = new_kernel(features=("edit",))
    camille, sophie = kernel.users[Idnps(CAMILLE)], kernel.users[Idnps(SOPHIE)]
    conv = kernel.user_creates_conversation(camille, [JULIEN, ALICE], None).id

    def code(call: Any) -> tuple[int, str]:
        with pytest.raises(SandboxError) as caught:
            call()
        return caught.value.status, caught.value.code

    assert code(lambda: kernel.user_changes_participants(sophie, conv, add=[BOB])) == (
        403,
        "not_a_member",
    )
    assert code(lambda: kernel.user_leaves(sophie, conv)) == (403, "not_a_member")
    assert code(lambda: kernel.user_changes_participants(camille, conv, remove=[ALICE])) == (
        501,
        "not_supported",
    )
    assert code(lambda: kernel.user_updates(camille, conv, description="x")) == (
        501,
        "not_supported",
    )
    assert code(lambda: kernel.user_changes_participants(camille, conv, add=["12345"])) == (
        400,
        "invalid_request",
    )
    assert code(lambda: kernel.user_changes_participants(camille, conv)) == (
        400,
        "invalid_request",
    )
    assert code(lambda: kernel.api_adds_participants(conv, ["810000034560"], [])) == (
        404,
        "user_not_found",
    )
    assert code(lambda: kernel.api_updates(conv, description="x")) == (501, "not_supported")


def test_history_is_vendor_users_messages_oldest_first_with_limit_and_since() -> None:
    kernel, _, clock = new_kernel()
    camille, julien = kernel.users[Idnps(CAMILLE)], kernel.users[Idnps(JULIEN)]
    conv = kernel.user_creates_conversation(camille, [JULIEN, ALICE], None).id
    ids = []
    for i in range(5):
        clock.advance(1)
        ids.append(kernel.user_writes(julien if i % 2 else camille, conv, f"m{i}").id)
        kernel.api_writes(f"k{i}", conv, External(ALICE, "Alice"), f"a{i}")
    kernel.user_deletes(camille, conv, ids[2])
    assert [m.id for m in kernel.api_history(conv, limit=50)] == [ids[0], ids[1], ids[3], ids[4]]
    assert [m.id for m in kernel.api_history(conv, limit=2)] == [ids[3], ids[4]]
    since = datetime(2026, 1, 5, 8, 2, tzinfo=UTC)
    assert [m.id for m in kernel.api_history(conv, limit=50, since=since)] == ids[1:2] + ids[3:]
    with pytest.raises(SandboxError):
        kernel.api_history(conv, limit=0)


# --- The user-side API (every sandbox) --------------------------------------------------------


@pytest.fixture
async def panda(tmp_path: Path) -> AsyncIterator[Client]:
    app = pandalab.create_app(retry_initial=0.01, retry_max=0.05, files_dir=str(tmp_path))
    async with TestClient(TestServer(app)) as client:
        yield client


async def ok(resp: Any, status: int) -> Any:
    text = await resp.text()
    assert resp.status == status, text
    return json.loads(text) if text else None


async def refused(resp: Any, status: int, code: str, field: str = "error") -> None:
    body = await resp.json()
    assert (resp.status, body[field]) == (status, code), body


async def create(client: Client, creator: str, *others: str) -> str:
    resp = await client.post(
        f"/_sandbox/users/{creator}/conversations", json={"with": list(others), "title": "Suivi"}
    )
    return str((await ok(resp, 201))["conversation_id"])


async def test_user_side_participants_leave_and_update(panda: Client) -> None:
    conv = await create(panda, CAMILLE, ALICE)
    base = f"/_sandbox/users/{CAMILLE}/conversations/{conv}"
    body = await ok(await panda.post(base + "/participants", json={"add": [JULIEN, BOB]}), 200)
    assert body == {
        "conversation_id": conv,
        "title": "Suivi",
        "description": None,
        "members": [CAMILLE, JULIEN],
        "external": [ALICE, BOB],
    }
    body = await ok(await panda.post(base + "/participants", json={"remove": [BOB]}), 200)
    assert body["external"] == [ALICE]
    body = await ok(await panda.patch(base, json={"description": "Plaie du pied"}), 200)
    assert (body["title"], body["description"]) == ("Suivi", "Plaie du pied")
    body = await ok(await panda.patch(base, json={"title": None}), 200)
    assert (body["title"], body["description"]) == (None, "Plaie du pied")
    view = await ok(await panda.get(f"/_sandbox/users/{JULIEN}/conversations/{conv}"), 200)
    assert view["description"] == "Plaie du pied"
    await ok(await panda.post(f"/_sandbox/users/{JULIEN}/conversations/{conv}/leave"), 204)
    listed = await ok(await panda.get(f"/_sandbox/users/{JULIEN}/conversations"), 200)
    assert listed["conversations"] == []
    # Refusals
    await refused(
        await panda.post(f"/_sandbox/users/{JULIEN}/conversations/{conv}/leave"),
        403,
        "not_a_member",
    )
    await refused(
        await panda.post(
            f"/_sandbox/users/{JULIEN}/conversations/{conv}/participants", json={"add": [BOB]}
        ),
        403,
        "not_a_member",
    )
    await refused(
        await panda.patch(f"/_sandbox/users/{JULIEN}/conversations/{conv}", json={"title": "x"}),
        403,
        "not_a_member",
    )
    for bad in (
        {},
        {"add": []},
        {"add": ["123"]},
        {"add": ["@nope"]},
        {"remove": [CAMILLE]},
        {"add": "x"},
        {"add": [BOB], "remove": [BOB]},
    ):
        await refused(await panda.post(base + "/participants", json=bad), 400, "invalid_request")
    for bad in ({}, {"title": 5}, {"title": "x" * 256}):
        await refused(await panda.patch(base, json=bad), 400, "invalid_request")


# --- PandaLab-style ---------------------------------------------------------------------------

HOOK_SECRET = "life-receiver-secret"


class Receiver:
    """A webhook receiver (PandaLab or webhook contract): keeps the bodies in arrival order."""

    def __init__(self, check: Any, batched: bool = False) -> None:
        self.bodies: list[Any] = []
        self._check = check
        self._batched = batched
        self._changed = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if not self._check(request.headers, raw):
            return web.Response(status=401)
        async with self._changed:
            self.bodies.append(json.loads(raw))
            self._changed.notify_all()
        return web.json_response({"stored": 1})

    @property
    def events(self) -> list[Any]:
        if not self._batched:
            return list(self.bodies)
        return [e for body in self.bodies for e in body.get("events", [body])]

    async def wait_for(self, count: int) -> list[Any]:
        async with self._changed:
            async with asyncio.timeout(10):
                await self._changed.wait_for(lambda: len(self.events) >= count)
        return self.events


def pandalab_signed(headers: Any, raw: bytes) -> bool:
    timestamp = headers["X-PandaLab-Timestamp"]
    expected = hmac.new(HOOK_SECRET.encode(), timestamp.encode() + b"." + raw, hashlib.sha256)
    return bool(headers["X-PandaLab-Signature"] == "sha256=" + expected.hexdigest())


async def serve(receiver: Receiver) -> TestServer:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = TestServer(app)
    await server.start_server()
    return server


async def panda_auth(client: Client) -> dict[str, str]:
    resp = await client.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": pandalab.CLIENT_ID,
            "client_secret": pandalab.CLIENT_SECRET,
        },
    )
    return {"Authorization": f"Bearer {(await resp.json())['access_token']}"}


async def test_pandalab_api_participants_update_and_history(panda: Client) -> None:
    headers = await panda_auth(panda)
    conv = await create(panda, CAMILLE, ALICE, JULIEN)
    api = f"/api/v1/conversations/{conv}"
    first = await ok(
        await panda.post(
            f"/_sandbox/users/{CAMILLE}/conversations/{conv}/messages", json={"text": "un"}
        ),
        201,
    )
    await ok(
        await panda.post(
            api + "/messages",
            json={"sender": {"ref": ALICE, "display_name": "Alice"}, "markdown": "réponse"},
            headers={**headers, "Idempotency-Key": "m1"},
        ),
        201,
    )
    second = await ok(
        await panda.post(
            f"/_sandbox/users/{JULIEN}/conversations/{conv}/messages", json={"text": "deux"}
        ),
        201,
    )
    added = await ok(
        await panda.post(
            api + "/participants",
            json={
                "members": [SOPHIE],
                "external_participants": [{"ref": BOB, "display_name": "Bob Martin"}],
                "added_by": {"ref": ALICE, "display_name": "Alice"},
            },
            headers={**headers, "Idempotency-Key": "p1"},
        ),
        200,
    )
    assert added == {
        "id": conv,
        "title": "Suivi",
        "description": None,
        "members": [CAMILLE, JULIEN, SOPHIE],
        "external_participants": [
            {"ref": ALICE, "display_name": ALICE},
            {"ref": BOB, "display_name": "Bob Martin"},
        ],
    }
    removed = await ok(
        await panda.post(
            api + "/participants/remove",
            json={"members": [JULIEN], "external_participants": [BOB], "removed_by": None},
            headers=headers,
        ),
        200,
    )
    assert removed["members"] == [CAMILLE, SOPHIE]
    assert [p["ref"] for p in removed["external_participants"]] == [ALICE]
    updated = await ok(
        await panda.patch(
            api,
            json={
                "description": "Suivi de plaie",
                "changed_by": {"ref": ALICE, "display_name": "A"},
            },
            headers=headers,
        ),
        200,
    )
    assert (updated["title"], updated["description"]) == ("Suivi", "Suivi de plaie")
    history = await ok(await panda.get(api + "/messages", headers=headers), 200)
    assert [m["id"] for m in history["messages"]] == [first["message_id"], second["message_id"]]
    assert history["messages"][0]["markdown"] == "un"
    assert history["messages"][0]["author"] == CAMILLE
    assert {"kind", "reply_to", "mentions", "attachment", "location"} <= set(history["messages"][0])
    latest = await ok(await panda.get(api + "/messages?limit=1", headers=headers), 200)
    assert [m["id"] for m in latest["messages"]] == [second["message_id"]]
    future = await ok(
        await panda.get(
            api + "/messages", params={"since": "2999-01-01T00:00:00Z"}, headers=headers
        ),
        200,
    )
    assert future == {"messages": []}
    unencoded = await ok(
        await panda.get(api + "/messages?since=2000-01-01T00:00:00+00:00", headers=headers), 200
    )
    assert len(unencoded["messages"]) == 2
    # Refusals
    for query in ("limit=0", "limit=1001", "limit=x", "since=hier"):
        await refused(
            await panda.get(api + "/messages?" + query, headers=headers), 400, "invalid_request"
        )
    await refused(
        await panda.post(
            api + "/participants",
            json={"members": ["810000034560"]},
            headers={**headers, "Idempotency-Key": "p2"},
        ),
        404,
        "user_not_found",
    )
    await refused(
        await panda.post(api + "/participants", json={"members": [SOPHIE]}, headers=headers),
        400,
        "invalid_request",
    )
    await refused(
        await panda.patch(api, json={"title": "x"}, headers=headers), 400, "invalid_request"
    )
    await refused(
        await panda.get("/api/v1/conversations/nope/messages", headers=headers),
        404,
        "conversation_not_found",
    )
    # The removed member sees nothing more.
    await ok(
        await panda.post(
            api + "/messages",
            json={"sender": {"ref": ALICE, "display_name": "Alice"}, "markdown": "après"},
            headers={**headers, "Idempotency-Key": "m2"},
        ),
        201,
    )
    inbox = await ok(await panda.get(f"/_sandbox/users/{JULIEN}/inbox"), 200)
    assert [m["text"] for m in inbox["messages"]] == ["un", "réponse"]
    await refused(
        await panda.get(f"/_sandbox/users/{JULIEN}/conversations/{conv}"), 403, "not_a_member"
    )


async def test_pandalab_pushes_the_new_events_and_never_echoes(panda: Client) -> None:
    receiver = Receiver(pandalab_signed)
    server = await serve(receiver)
    headers = await panda_auth(panda)
    try:
        await ok(
            await panda.put(
                "/api/v1/webhook",
                json={"url": str(server.make_url("/hook")), "secret": HOOK_SECRET},
                headers=headers,
            ),
            200,
        )
        conv = await create(panda, CAMILLE, JULIEN)
        base = f"/_sandbox/users/{CAMILLE}/conversations/{conv}"
        await ok(await panda.patch(base, json={"description": "Avant"}), 200)
        await ok(await panda.post(base + "/participants", json={"add": [ALICE]}), 200)
        await ok(
            await panda.patch(
                f"/api/v1/conversations/{conv}",
                json={"title": "Par le pont", "changed_by": {"ref": ALICE, "display_name": "A"}},
                headers=headers,
            ),
            200,
        )
        await ok(await panda.post(base + "/participants", json={"add": [SOPHIE, BOB]}), 200)
        await ok(await panda.post(base + "/participants", json={"add": [SOPHIE]}), 200)  # no-op
        await ok(await panda.post(base + "/participants", json={"remove": [BOB]}), 200)
        await ok(await panda.patch(base, json={"title": "Renommée", "description": "Avant"}), 200)
        await ok(await panda.post(f"/_sandbox/users/{SOPHIE}/conversations/{conv}/leave"), 204)
        events = await receiver.wait_for(5)
        assert [(e["type"], e["data"]) for e in events] == [
            (
                "conversation.created",
                {
                    "conversation": {
                        "id": conv,
                        "title": "Suivi",
                        "description": "Avant",
                        "created_by": CAMILLE,
                        "members": [CAMILLE, JULIEN],
                        "external_participants": [{"ref": ALICE}],
                    }
                },
            ),
            (
                "conversation.participants_added",
                {
                    "conversation_id": conv,
                    "by": CAMILLE,
                    "members": [SOPHIE],
                    "external_participants": [{"ref": BOB}],
                },
            ),
            (
                "conversation.participants_removed",
                {
                    "conversation_id": conv,
                    "by": CAMILLE,
                    "members": [],
                    "external_participants": [{"ref": BOB}],
                },
            ),
            ("conversation.updated", {"conversation_id": conv, "by": CAMILLE, "title": "Renommée"}),
            ("conversation.member_left", {"conversation_id": conv, "member": SOPHIE}),
        ]
    finally:
        await server.close()


# --- Medipeps-style ---------------------------------------------------------------------------

NATHALIE, PIERRE, CHLOE = (str(u.idnps) for u in medipeps.USERS[:3])
MP_KEY = {"X-Api-Key": medipeps.API_KEY}


@pytest.fixture
async def mp(tmp_path: Path) -> AsyncIterator[Client]:
    async with TestClient(TestServer(medipeps.create_app(files_dir=str(tmp_path)))) as client:
        yield client


async def test_medipeps_user_side_lacks_removal_and_descriptions(mp: Client) -> None:
    conv = await create(mp, NATHALIE, ALICE, PIERRE)
    base = f"/_sandbox/users/{NATHALIE}/conversations/{conv}"
    await refused(
        await mp.post(base + "/participants", json={"remove": [PIERRE]}), 501, "not_supported"
    )
    await refused(await mp.patch(base, json={"description": "x"}), 501, "not_supported")
    body = await ok(await mp.patch(base, json={"title": "RCP"}), 200)
    assert body["title"] == "RCP"
    await ok(await mp.post(base + "/participants", json={"add": [CHLOE, BOB]}), 200)
    await ok(await mp.post(f"/_sandbox/users/{PIERRE}/conversations/{conv}/leave"), 204)
    feed = await ok(await mp.get("/mp/events", headers=MP_KEY), 200)
    events = feed["events"][1:]
    for event in events:
        del event["at"]
    assert events == [
        {
            "seq": 2,
            "type": "SUBJECT",
            "subject": {"conv": int(conv), "by": NATHALIE, "subject": "RCP"},
        },
        {
            "seq": 3,
            "type": "ADD_PART",
            "part": {
                "conv": int(conv),
                "by": NATHALIE,
                "participants": [CHLOE],
                "guests": [{"ref": BOB}],
            },
        },
        {"seq": 4, "type": "LEAVE", "leave": {"conv": int(conv), "who": PIERRE}},
    ]


async def test_medipeps_first_guest_appears_as_new_conv(mp: Client) -> None:
    conv = await create(mp, NATHALIE, PIERRE)
    await ok(
        await mp.post(
            f"/_sandbox/users/{PIERRE}/conversations/{conv}/participants", json={"add": [ALICE]}
        ),
        200,
    )
    feed = await ok(await mp.get("/mp/events", headers=MP_KEY), 200)
    [event] = feed["events"]
    assert event["type"] == "NEW_CONV"
    assert event["conv"]["participants"] == [NATHALIE, PIERRE]
    assert event["conv"]["guests"] == [{"ref": ALICE}]


async def test_medipeps_api_participants_guests_subject_and_history(mp: Client) -> None:
    conv = await create(mp, NATHALIE, ALICE, PIERRE)
    api = f"/mp/conversations/{conv}"
    ids = []
    for author, text in ((NATHALIE, "un"), (PIERRE, "deux"), (NATHALIE, "trois")):
        resp = await mp.post(
            f"/_sandbox/users/{author}/conversations/{conv}/messages", json={"text": text}
        )
        ids.append(int((await ok(resp, 201))["message_id"]))
        await ok(
            await mp.post(
                api + "/messages",
                json={
                    "author_ref": ALICE,
                    "author_label": "Alice",
                    "body": "r",
                    "request_ref": text,
                },
                headers=MP_KEY,
            ),
            200,
        )
    await ok(
        await mp.delete(f"/_sandbox/users/{PIERRE}/conversations/{conv}/messages/{ids[1]}"), 204
    )
    added = await ok(
        await mp.post(
            api + "/participants",
            json={
                "participants": [CHLOE],
                "guests": [{"ref": BOB, "label": "Bob Martin"}],
                "by_ref": ALICE,
                "request_ref": "p1",
            },
            headers=MP_KEY,
        ),
        200,
    )
    assert added == {
        "conv": int(conv),
        "subject": "Suivi",
        "participants": [NATHALIE, PIERRE, CHLOE],
        "guests": [{"ref": ALICE, "label": ALICE}, {"ref": BOB, "label": "Bob Martin"}],
    }
    await ok(
        await mp.post(
            api + "/guests/leave", json={"refs": [BOB], "request_ref": "l1"}, headers=MP_KEY
        ),
        204,
    )
    body = await mp.post(
        api + "/guests/leave", json={"refs": [PIERRE], "request_ref": "l2"}, headers=MP_KEY
    )
    await refused(body, 403, "FORBIDDEN", field="code")
    subject = await ok(
        await mp.patch(api, json={"subject": "RCP", "by_ref": ALICE}, headers=MP_KEY), 200
    )
    assert subject["subject"] == "RCP"
    assert [g["ref"] for g in subject["guests"]] == [ALICE]
    history = await ok(await mp.get(api + "/messages", headers=MP_KEY), 200)
    assert [m["msg"] for m in history["messages"]] == [ids[0], ids[2]]
    assert history["cursor"] == ids[2]
    assert history["messages"][0] == {
        "msg": ids[0],
        "conv": int(conv),
        "author": NATHALIE,
        "body": "un",
        "at": history["messages"][0]["at"],
        "reply_to": None,
        "attachment": None,
    }
    page = await ok(await mp.get(api + f"/messages?after={ids[0]}&limit=1", headers=MP_KEY), 200)
    assert ([m["msg"] for m in page["messages"]], page["cursor"]) == ([ids[2]], ids[2])
    empty = await ok(await mp.get(api + f"/messages?after={ids[2]}", headers=MP_KEY), 200)
    assert empty == {"messages": [], "cursor": ids[2]}
    await refused(
        await mp.get(api + "/messages?limit=501", headers=MP_KEY), 400, "BAD_REQUEST", field="code"
    )
    # Nothing of the API side reached the feed.
    feed = await ok(await mp.get("/mp/events", headers=MP_KEY), 200)
    assert {e["type"] for e in feed["events"]} == {"NEW_CONV", "NEW_MSG", "DEL_MSG"}


# --- Webhook contract -------------------------------------------------------------------------

WH_USERS = [str(u.idnps) for u in webhook.USERS]


@pytest.fixture
async def wh(tmp_path: Path) -> AsyncIterator[Client]:
    app = webhook.create_app(files_dir=str(tmp_path), retry_initial=0.01, retry_max=0.05)
    async with TestClient(TestServer(app)) as client:
        yield client


def signed(body: Any = None, key: str | None = None) -> dict[str, Any]:
    raw = b"" if body is None else json.dumps(body).encode()
    headers = {
        "Content-Type": "application/json",
        **webhook.SIGNATURES.headers([webhook.SECRET], raw, time.time()),
    }
    if key is not None:
        headers["Idempotency-Key"] = key
    return {"data": raw or None, "headers": headers}


def person(ref: str, name: str = "Alice") -> dict[str, str]:
    return {"ref": ref, "display_name": name, "mxid": ref if ref.startswith("@") else ALICE}


def webhook_signed(headers: Any, raw: bytes) -> bool:
    return (
        webhook.SIGNATURES.refusal(
            [webhook.SECRET],
            headers.get("X-Eimis-Timestamp"),
            headers.get("X-Eimis-Signature"),
            raw,
            now=time.time(),
            window_s=300,
        )
        is None
    )


def test_the_webhook_sandbox_declares_the_new_capabilities() -> None:
    for name in ("add_participants", "remove_participants", "titles", "topics", "history"):
        assert webhook.CAPABILITIES[name] is True
    assert errors_of("/components/schemas/Capabilities", webhook.CAPABILITIES) == []
    served = {
        (route.method, route.resource.canonical)
        for route in webhook.create_app().router.routes()
        if route.resource is not None
    }
    for path, method in (
        ("/conversations/{conversation_id}/participants", "post"),
        ("/conversations/{conversation_id}/participants/remove", "post"),
        ("/conversations/{conversation_id}/title", "post"),
        ("/conversations/{conversation_id}/topic", "post"),
        ("/conversations/{conversation_id}/messages", "get"),
    ):
        assert method in SPEC["webhooks"][path]
        assert (method.upper(), path) in served


async def test_webhook_operations_and_pushed_events(wh: Client) -> None:
    ines, hugo, emma = WH_USERS[:3]
    receiver = Receiver(webhook_signed, batched=True)
    server = await serve(receiver)
    try:
        announce = {
            "connector_id": "wh",
            "contract_version": "1.0",
            "events_url": str(server.make_url("/hook")),
        }
        await ok(await wh.post("/bridge", **signed(announce, "a1")), 204)
        conv = await create(wh, ines, ALICE, hugo)
        base = f"/_sandbox/users/{ines}/conversations/{conv}"
        message = await ok(await wh.post(base + "/messages", json={"text": "bonjour"}), 201)
        await ok(await wh.post(base + "/participants", json={"add": [emma, BOB]}), 200)
        await ok(await wh.post(base + "/participants", json={"remove": [BOB]}), 200)
        await ok(await wh.patch(base, json={"title": "Nouveau", "description": "Sujet"}), 200)
        await ok(await wh.post(f"/_sandbox/users/{hugo}/conversations/{conv}/leave"), 204)
        # The bridge's calls: never pushed back.
        api = f"/conversations/{conv}"
        change = {
            "members": [WH_USERS[3]],
            "external": [person(FOREIGN, "Dr Y")],
            "by": person(ALICE),
        }
        await ok(await wh.post(api + "/participants", **signed(change, "p1")), 204)
        await ok(await wh.post(api + "/participants", **signed(change, "p1")), 204)  # replay
        removal = {**change, "reason": "fin de prise en charge"}
        await ok(await wh.post(api + "/participants/remove", **signed(removal, "r1")), 204)
        await ok(
            await wh.post(api + "/title", **signed({"title": None, "by": person(ALICE)}, "t1")), 204
        )
        await ok(
            await wh.post(api + "/topic", **signed({"topic": "T", "by": person(ALICE)}, "s1")), 204
        )
        kernel = wh.app[KERNEL_KEY]
        state = kernel.conversation(conv)
        assert (state.title, state.description) == (None, "T")
        assert state.members == (ines, emma)
        events = await receiver.wait_for(7)
        shown = [
            {k: v for k, v in e.items() if k not in ("id", "at", "conversation_id")} for e in events
        ]
        assert shown[2:] == [
            {
                "type": "participants.added",
                "sender": ines,
                "members": [emma],
                "participants": [BOB],
            },
            {"type": "participants.removed", "sender": ines, "members": [], "participants": [BOB]},
            {"type": "conversation.renamed", "sender": ines, "title": "Nouveau"},
            {"type": "conversation.topic", "sender": ines, "topic": "Sujet"},
            {"type": "member.left", "sender": hugo},
        ]
        # History: the message event as pushed, same id.
        for event in events:
            assert errors_of("/components/schemas/Event", event) == [], event
        for schema, body in (
            ("ParticipantsRequest", change),
            ("RemoveParticipantsRequest", removal),
            ("TitleRequest", {"title": None, "by": person(ALICE)}),
            ("TopicRequest", {"topic": "T", "by": person(ALICE)}),
        ):
            assert errors_of(f"/components/schemas/{schema}", body) == [], schema
        history = await ok(await wh.get(api + "/messages?limit=10", **signed()), 200)
        assert errors_of("/components/schemas/History", history) == []
        assert history["messages"] == [events[1]]
        assert events[1]["message_id"] == message["message_id"]
        since = await ok(
            await wh.get(
                api + "/messages", params={"since": "2999-01-01T00:00:00+00:00"}, **signed()
            ),
            200,
        )
        assert since == {"messages": []}
        await refused(await wh.get(api + "/messages?limit=0", **signed()), 400, "invalid_request")
        await refused(
            await wh.post(api + "/title", **signed({"title": "x"}, "t2")), 400, "invalid_request"
        )
        await refused(
            await wh.post(
                api + "/participants", **signed({"members": ["123"], "external": []}, "p3")
            ),
            400,
            "invalid_request",
        )
        await refused(
            await wh.post(
                "/conversations/nope/topic", **signed({"topic": None, "by": person(ALICE)}, "s2")
            ),
            404,
            "conversation_not_found",
        )
    finally:
        await server.close()
