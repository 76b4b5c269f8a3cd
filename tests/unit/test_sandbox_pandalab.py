"""The PandaLab-style sandbox: user-side API, OAuth2, idempotency, no echo, signed webhook push."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.idnps import Idnps, luhn_check_digit
from connectors.medipeps.sandbox import USERS as MEDIPEPS_USERS
from connectors.pandalab.sandbox import CLIENT_ID, CLIENT_SECRET, USERS, create_app
from connectors.sandbox import MAX_TEXT_BYTES

from helpers import FakeClock

CAMILLE, JULIEN, SOPHIE = (str(u.idnps) for u in USERS[:3])
MATRIX_USER = "@alice:matrix.example.org"
FOREIGN = "8" + "1234567890" + luhn_check_digit("1234567890")  # valid, not a PandaLab user
WEBHOOK_SECRET = "receiver-test-secret"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sandbox(clock: FakeClock) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(token_lifetime=60, clock=clock, retry_initial=0.01, retry_max=0.05)
    async with TestClient(TestServer(app)) as client:
        yield client


async def token(client: TestClient[Any, Any]) -> str:
    resp = await client.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 60
    return str(body["access_token"])


async def api(client: TestClient[Any, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {await token(client)}"}


async def user_conversation(client: TestClient[Any, Any], creator: str, *others: str) -> str:
    resp = await client.post(
        f"/_sandbox/users/{creator}/conversations", json={"with": list(others), "title": "Suivi"}
    )
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["conversation_id"])


async def user_writes(client: TestClient[Any, Any], author: str, conv: str, text: str) -> str:
    resp = await client.post(
        f"/_sandbox/users/{author}/conversations/{conv}/messages", json={"text": text}
    )
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["message_id"])


async def inbox(client: TestClient[Any, Any], idnps: str) -> list[dict[str, Any]]:
    resp = await client.get(f"/_sandbox/users/{idnps}/inbox")
    assert resp.status == 200
    return list((await resp.json())["messages"])


# --- Users -----------------------------------------------------------------------------------


def test_users_are_valid_and_not_medipeps_users() -> None:
    assert len(USERS) == 5
    assert all(Idnps(u.idnps).kind == "RPPS" for u in USERS)
    assert not {u.idnps for u in USERS} & {u.idnps for u in MEDIPEPS_USERS}


async def test_user_list_and_vendor_user_lookup(sandbox: TestClient[Any, Any]) -> None:
    resp = await sandbox.get("/_sandbox/users")
    users = (await resp.json())["users"]
    assert [u["idnps"] for u in users] == [str(u.idnps) for u in USERS]
    assert set(users[0]) == {"idnps", "given_name", "family_name", "profession"}

    headers = await api(sandbox)
    resp = await sandbox.get(f"/api/v1/users/{JULIEN}", headers=headers)
    body = await resp.json()
    assert resp.status == 200
    assert body["idnps"] == JULIEN and body["profession"] == "Médecin généraliste"
    assert len(body["id"]) == 36  # a UUID

    resp = await sandbox.get(f"/api/v1/users/{FOREIGN}", headers=headers)
    assert resp.status == 404
    assert (await resp.json())["error"] == "user_not_found"


# --- User-side API -----------------------------------------------------------------------------


async def test_user_conversation_members_external_and_inbox(
    sandbox: TestClient[Any, Any],
) -> None:
    conv = await user_conversation(sandbox, CAMILLE, JULIEN, MATRIX_USER, FOREIGN, JULIEN)
    resp = await sandbox.get(f"/_sandbox/users/{JULIEN}/conversations")
    [listed] = (await resp.json())["conversations"]
    assert listed == {
        "conversation_id": conv,
        "title": "Suivi",
        "description": None,
        "members": [CAMILLE, JULIEN],
        "external": [MATRIX_USER, FOREIGN],
    }
    first = await user_writes(sandbox, CAMILLE, conv, "Bonjour **Julien**")
    second = await user_writes(sandbox, JULIEN, conv, "Bonjour Camille")
    third = await user_writes(sandbox, CAMILLE, conv, "Le patient va mieux")

    julien = await inbox(sandbox, JULIEN)
    assert [m["message_id"] for m in julien] == [first, third]
    assert julien[0]["sender"] == CAMILLE
    assert julien[0]["sender_name"] == "Camille Martin"
    assert julien[0]["text"] == "Bonjour **Julien**"
    assert julien[0]["conversation_id"] == conv
    assert julien[0]["ts"].endswith("+00:00")
    assert [m["message_id"] for m in await inbox(sandbox, CAMILLE)] == [second]
    assert await inbox(sandbox, SOPHIE) == []


async def test_user_side_refusals(sandbox: TestClient[Any, Any]) -> None:
    bad_luhn = CAMILLE[:-1] + str((int(CAMILLE[-1]) + 1) % 10)
    resp = await sandbox.get(f"/_sandbox/users/{bad_luhn}/inbox")
    assert resp.status == 400
    assert "Luhn" in (await resp.json())["message"]

    resp = await sandbox.post(f"/_sandbox/users/{CAMILLE}/conversations", json={"with": ["81234"]})
    assert resp.status == 400
    assert "12 in all" in (await resp.json())["message"]

    resp = await sandbox.get(f"/_sandbox/users/{FOREIGN}/conversations")
    assert resp.status == 404
    assert (await resp.json())["error"] == "user_not_found"

    resp = await sandbox.post(
        f"/_sandbox/users/{CAMILLE}/conversations", data=b"{not json", headers=_json_type()
    )
    assert resp.status == 400
    assert (await resp.json())["message"] == "The request body is not valid JSON."

    resp = await sandbox.post(f"/_sandbox/users/{CAMILLE}/conversations", json={"with": [3]})
    assert resp.status == 400
    assert "with[0]" in (await resp.json())["message"]

    conv = await user_conversation(sandbox, CAMILLE, JULIEN)
    resp = await sandbox.post(
        f"/_sandbox/users/{SOPHIE}/conversations/{conv}/messages", json={"text": "x"}
    )
    assert resp.status == 403
    resp = await sandbox.post(
        f"/_sandbox/users/{CAMILLE}/conversations/nope/messages", json={"text": "x"}
    )
    assert resp.status == 404
    assert (await resp.json())["error"] == "conversation_not_found"
    resp = await sandbox.post(
        f"/_sandbox/users/{CAMILLE}/conversations/{conv}/messages",
        json={"text": "é" * (MAX_TEXT_BYTES // 2 + 1)},
    )
    assert resp.status == 413
    resp = await sandbox.post(
        f"/_sandbox/users/{CAMILLE}/conversations/{conv}/messages",
        data=b'{"text": "\\ud800"}',
        headers=_json_type(),
    )
    assert resp.status == 400
    assert "Unicode" in (await resp.json())["message"]


def _json_type() -> dict[str, str]:
    return {"Content-Type": "application/json"}


# --- Vendor API: auth ----------------------------------------------------------------------------


async def test_token_refusals(sandbox: TestClient[Any, Any]) -> None:
    resp = await sandbox.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": "no"},
    )
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_client"

    resp = await sandbox.post("/oauth/token", json={"grant_type": "client_credentials"})
    assert resp.status == 401
    assert "No client credentials" in (await resp.json())["message"]

    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    resp = await sandbox.post(
        "/oauth/token", data={"grant_type": "password"}, headers={"Authorization": f"Basic {basic}"}
    )
    assert resp.status == 400
    assert (await resp.json())["error"] == "unsupported_grant_type"

    resp = await sandbox.post("/oauth/token", data={}, headers={"Authorization": f"Basic {basic}"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_request"

    resp = await sandbox.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    assert (await resp.json())["access_token"]


async def test_api_needs_a_valid_unexpired_token(
    sandbox: TestClient[Any, Any], clock: FakeClock
) -> None:
    path = f"/api/v1/users/{CAMILLE}"
    for headers in ({}, {"Authorization": "Bearer made-up"}, {"Authorization": "Basic x"}):
        resp = await sandbox.get(path, headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_token"
        assert "invalid_token" in resp.headers["WWW-Authenticate"]

    headers = await api(sandbox)
    assert (await sandbox.get(path, headers=headers)).status == 200
    clock.advance(61)
    resp = await sandbox.get(path, headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"] == "invalid_token"
    assert (await sandbox.get(path, headers=await api(sandbox))).status == 200


# --- Vendor API: conversations and messages ------------------------------------------------------


async def test_api_conversation_is_idempotent(sandbox: TestClient[Any, Any]) -> None:
    headers = {**await api(sandbox), "Idempotency-Key": "portal-1"}
    body = {
        "title": "Portail",
        "members": [CAMILLE, SOPHIE],
        "external_participants": [{"ref": MATRIX_USER, "display_name": "Alice"}],
    }
    first = await sandbox.post("/api/v1/conversations", json=body, headers=headers)
    again = await sandbox.post("/api/v1/conversations", json=body, headers=headers)
    assert (first.status, again.status) == (201, 200)
    conv = (await first.json())["id"]
    assert (await again.json())["id"] == conv
    resp = await sandbox.get(f"/_sandbox/users/{CAMILLE}/conversations")
    assert [c["conversation_id"] for c in (await resp.json())["conversations"]] == [conv]


async def test_api_conversation_refusals(sandbox: TestClient[Any, Any]) -> None:
    headers = {**await api(sandbox), "Idempotency-Key": "k"}
    cases: list[tuple[Any, int, str]] = [
        ({"members": [FOREIGN]}, 404, "user_not_found"),
        ({"members": ["8123"]}, 400, "invalid_request"),
        ({"members": []}, 400, "invalid_request"),
        ({"members": CAMILLE}, 400, "invalid_request"),
        (
            {"members": [CAMILLE], "external_participants": [{"ref": "@bad"}]},
            400,
            "invalid_request",
        ),
        ({"members": [CAMILLE], "title": 5}, 400, "invalid_request"),
        ([CAMILLE], 400, "invalid_request"),
    ]
    for body, status, code in cases:
        resp = await sandbox.post("/api/v1/conversations", json=body, headers=headers)
        error = await resp.json()
        assert (resp.status, error["error"]) == (status, code), body
        assert error["message"].endswith(".")
    resp = await sandbox.post(
        "/api/v1/conversations", json={"members": [CAMILLE]}, headers=await api(sandbox)
    )
    assert resp.status == 400
    assert "Idempotency-Key" in (await resp.json())["message"]


async def test_api_message_is_idempotent_and_shown_once(sandbox: TestClient[Any, Any]) -> None:
    auth = await api(sandbox)
    conv = await user_conversation(sandbox, CAMILLE, JULIEN, MATRIX_USER)
    path = f"/api/v1/conversations/{conv}/messages"
    body = {"sender": {"ref": MATRIX_USER, "display_name": "Alice"}, "markdown": "Reçu *merci*"}
    headers = {**auth, "Idempotency-Key": "$event1"}
    first = await sandbox.post(path, json=body, headers=headers)
    again = await sandbox.post(path, json=body, headers=headers)
    assert (first.status, again.status) == (201, 200)
    assert (await first.json())["id"] == (await again.json())["id"]

    for idnps in (CAMILLE, JULIEN):
        [message] = await inbox(sandbox, idnps)
        assert message["sender"] == MATRIX_USER
        assert message["sender_name"] == "Alice"
        assert message["text"] == "Reçu *merci*"

    resp = await sandbox.post(
        "/api/v1/conversations/unknown/messages",
        json=body,
        headers={**auth, "Idempotency-Key": "x"},
    )
    assert resp.status == 404
    assert (await resp.json())["error"] == "conversation_not_found"
    big = {**body, "markdown": "a" * (MAX_TEXT_BYTES + 1)}
    resp = await sandbox.post(path, json=big, headers={**auth, "Idempotency-Key": "big"})
    assert resp.status == 413
    resp = await sandbox.post(
        path,
        json={**body, "sender": {"ref": CAMILLE, "display_name": "Camille"}},
        headers={**auth, "Idempotency-Key": "local"},
    )
    assert resp.status == 400


async def test_unknown_route_and_method_are_json(sandbox: TestClient[Any, Any]) -> None:
    resp = await sandbox.get("/_sandbox/nothing")
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"
    resp = await sandbox.delete("/_sandbox/users")
    assert resp.status == 405
    assert (await resp.json())["error"] == "method_not_allowed"


# --- Webhook push --------------------------------------------------------------------------------


class Receiver:
    """A bridge-like webhook receiver: checks signatures, fails the first ``fail_first`` posts."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.attempts: list[dict[str, Any]] = []
        self.accepted: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        timestamp = request.headers["X-PandaLab-Timestamp"]
        signature = request.headers["X-PandaLab-Signature"]
        async with self._changed:
            self.attempts.append(json.loads(raw))
            self._changed.notify_all()
            if len(self.attempts) <= self.fail_first:
                return web.Response(status=503)
            expected = hmac.new(
                WEBHOOK_SECRET.encode(), timestamp.encode() + b"." + raw, hashlib.sha256
            ).hexdigest()
            if not hmac.compare_digest(signature, f"sha256={expected}"):
                return web.Response(status=401)
            if abs(time.time() - int(timestamp)) > 300:
                return web.Response(status=401)
            self.accepted.append(json.loads(raw))
            self._changed.notify_all()
            return web.Response(status=204)

    async def wait_accepted(self, count: int) -> list[dict[str, Any]]:
        async with self._changed:
            async with asyncio.timeout(10):
                await self._changed.wait_for(lambda: len(self.accepted) >= count)
        return self.accepted


@pytest.fixture
async def receiver_factory() -> AsyncIterator[Any]:
    servers: list[TestServer] = []

    async def start(fail_first: int) -> tuple[Receiver, str]:
        receiver = Receiver(fail_first)
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return receiver, str(server.make_url("/hook"))

    yield start
    for server in servers:
        await server.close()


async def test_webhook_waits_for_registration_and_redelivers_in_order(
    sandbox: TestClient[Any, Any], receiver_factory: Any
) -> None:
    conv = await user_conversation(sandbox, CAMILLE, MATRIX_USER)
    message = await user_writes(sandbox, CAMILLE, conv, "Première")
    await user_conversation(sandbox, CAMILLE, JULIEN)  # no external participant: not announced
    second = await user_writes(sandbox, CAMILLE, conv, "Seconde")

    receiver, url = await receiver_factory(fail_first=2)
    resp = await sandbox.put(
        "/api/v1/webhook", json={"url": url, "secret": WEBHOOK_SECRET}, headers=await api(sandbox)
    )
    assert resp.status == 200
    assert (await resp.json()) == {"url": url}

    accepted = await receiver.wait_accepted(3)
    assert [e["type"] for e in accepted] == [
        "conversation.created",
        "message.created",
        "message.created",
    ]
    # The first event was refused twice, then delivered again, unchanged, before the others.
    assert [a["id"] for a in receiver.attempts[:3]] == [accepted[0]["id"]] * 3
    assert accepted[0]["data"]["conversation"] == {
        "id": conv,
        "title": "Suivi",
        "description": None,
        "created_by": CAMILLE,
        "members": [CAMILLE],
        "external_participants": [{"ref": MATRIX_USER}],
    }
    assert accepted[1]["data"]["message"]["id"] == message
    assert accepted[1]["data"]["message"]["author"] == CAMILLE
    assert accepted[1]["data"]["message"]["markdown"] == "Première"
    assert accepted[1]["data"]["message"]["conversation_id"] == conv
    assert accepted[2]["data"]["message"]["id"] == second
    assert accepted[0]["created_at"].endswith("+00:00")


async def test_api_writes_are_not_echoed(
    sandbox: TestClient[Any, Any], receiver_factory: Any
) -> None:
    receiver, url = await receiver_factory(fail_first=0)
    auth = await api(sandbox)
    await sandbox.put("/api/v1/webhook", json={"url": url, "secret": WEBHOOK_SECRET}, headers=auth)
    resp = await sandbox.post(
        "/api/v1/conversations",
        json={
            "members": [CAMILLE],
            "external_participants": [{"ref": MATRIX_USER, "display_name": "Alice"}],
        },
        headers={**auth, "Idempotency-Key": "portal"},
    )
    conv = (await resp.json())["id"]
    resp = await sandbox.post(
        f"/api/v1/conversations/{conv}/messages",
        json={"sender": {"ref": MATRIX_USER, "display_name": "Alice"}, "markdown": "Depuis Matrix"},
        headers={**auth, "Idempotency-Key": "m1"},
    )
    assert resp.status == 201
    reply = await user_writes(sandbox, CAMILLE, conv, "Réponse")

    # Delivery is in order: had the API conversation or message been echoed, it would come first.
    accepted = await receiver.wait_accepted(1)
    assert [e["data"]["message"]["id"] for e in accepted] == [reply]
    assert len(receiver.attempts) == 1


async def test_webhook_registration_is_validated(sandbox: TestClient[Any, Any]) -> None:
    auth = await api(sandbox)
    for body in (
        {"url": "ftp://example.org/hook", "secret": "s"},
        {"url": "/relative", "secret": "s"},
        {"url": "https://example.org/hook", "secret": ""},
        {"url": "https://example.org/hook"},
    ):
        resp = await sandbox.put("/api/v1/webhook", json=body, headers=auth)
        assert resp.status == 400, body
        assert (await resp.json())["error"] == "invalid_request"
    resp = await sandbox.put(
        "/api/v1/webhook", json={"url": "https://example.org/h", "secret": "s"}
    )
    assert resp.status == 401


class FailureWatch(logging.Handler):
    """Sets ``seen`` when the sandbox logs a delivery attempt that was not acknowledged."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = asyncio.Event()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if "not acknowledged" in record.getMessage():
            self.seen.set()


async def test_webhook_moved_while_unreachable(clock: FakeClock, receiver_factory: Any) -> None:
    """A failing webhook backs off for a minute here; registering a new one ends the wait."""
    dead = TestServer(web.Application())
    await dead.start_server()
    dead_url = str(dead.make_url("/hook"))
    await dead.close()  # nothing listens there any more: every attempt fails to connect

    watch = FailureWatch()
    logger = logging.getLogger("eimis.sandbox.pandalab")
    logger.addHandler(watch)
    previous_level = logger.level
    logger.setLevel(logging.DEBUG)
    app = create_app(token_lifetime=60, clock=clock, retry_initial=60, retry_max=60)
    try:
        async with TestClient(TestServer(app)) as sandbox:
            auth = await api(sandbox)
            hook = {"secret": WEBHOOK_SECRET}
            await sandbox.put("/api/v1/webhook", json={**hook, "url": dead_url}, headers=auth)
            conv = await user_conversation(sandbox, CAMILLE, FOREIGN)
            async with asyncio.timeout(10):
                await watch.seen.wait()

            receiver, url = await receiver_factory(fail_first=0)
            await sandbox.put("/api/v1/webhook", json={**hook, "url": url}, headers=auth)
            [event] = await receiver.wait_accepted(1)
    finally:
        logger.removeHandler(watch)
        logger.setLevel(previous_level)
    assert event["data"]["conversation"]["id"] == conv
    assert event["data"]["conversation"]["external_participants"] == [{"ref": FOREIGN}]
    logged = "\n".join(watch.lines)
    assert "Suivi" not in logged and WEBHOOK_SECRET not in logged and dead_url not in logged


async def test_api_system_message_is_idempotent_and_shown_as_system(
    sandbox: TestClient[Any, Any],
) -> None:
    auth = await api(sandbox)
    conv = await user_conversation(sandbox, CAMILLE, JULIEN, MATRIX_USER)
    path = f"/api/v1/conversations/{conv}/system-messages"
    text = "Impossible d'ajouter à cette conversation : 810000000000."
    headers = {**auth, "Idempotency-Key": "system:eimis.abc"}
    first = await sandbox.post(path, json={"text": text}, headers=headers)
    again = await sandbox.post(path, json={"text": text}, headers=headers)
    assert (first.status, again.status) == (201, 200)
    assert (await first.json())["id"] == (await again.json())["id"]
    for idnps in (CAMILLE, JULIEN):
        [message] = await inbox(sandbox, idnps)
        assert (message["kind"], message["sender"], message["text"]) == ("system", "EIMIS", text)
    view = await (await sandbox.get(f"/_sandbox/users/{CAMILLE}/conversations/{conv}")).json()
    assert [(m["kind"], m["text"]) for m in view["messages"]] == [("system", text)]
    # Not a message of a vendor user: never in the history the bridge reads back.
    resp = await sandbox.get(f"/api/v1/conversations/{conv}/messages", headers=auth)
    assert (await resp.json())["messages"] == []
    resp = await sandbox.post(path, json={"text": text}, headers=auth)
    assert resp.status == 400  # the Idempotency-Key is required
    resp = await sandbox.post(
        "/api/v1/conversations/unknown/system-messages", json={"text": text}, headers=headers
    )
    assert resp.status == 404
