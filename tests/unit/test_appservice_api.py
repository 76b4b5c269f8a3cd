"""The appservice HTTP API as the homeserver sees it, over real HTTP with a real SQLite inbox.

What the homeserver relies on: a 200 means the whole transaction is durably stored (so it will
not resend it), anything else means nothing was stored (so it must resend), and a resend of a
stored transaction is acknowledged without being processed twice. Events are recognised by
event id, not by transaction id: a transaction id reused with new events (Synapse numbers them
from 1 again after a restart) is stored like any other.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from mautrix.util.async_db import Database

from bridge.appservice import auth
from bridge.appservice.auth import check_hs_token
from bridge.appservice.server import AppserviceServer
from bridge.config import DatabaseConfig
from bridge.db.database import open_database
from bridge.db.inbox import InboxStore

HS_TOKEN = "hs-token-for-tests-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {HS_TOKEN}"}
KNOWN_USER = "@eimis_pl_810000001916:eimis.example"


def txn_path(txn_id: str) -> str:
    return f"/_matrix/app/v1/transactions/{txn_id}"


def event(n: int) -> dict[str, Any]:
    return {
        "event_id": f"$event{n}",
        "room_id": "!room:eimis.example",
        "type": "m.room.message",
        "sender": "@alice:eimis.example",
        "content": {"msgtype": "m.text", "body": f"message {n}"},
    }


@dataclass
class Harness:
    client: TestClient
    db: Database
    inbox: InboxStore
    db_url: str
    stored_calls: list[None] = field(default_factory=list)
    user_queries: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=lambda: {"database": True, "homeserver": True})

    async def stored_event_ids(self) -> list[str]:
        return [item.payload["event_id"] for item in await self.inbox.pending(0, 1000)]

    async def put(self, txn_id: str, body: Any, **kwargs: Any) -> Any:
        """PUT ``body`` as JSON (any JSON value, null included) with the right token by default."""
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", AUTH)}
        return await self.client.put(
            txn_path(txn_id), data=json.dumps(body).encode(), headers=headers, **kwargs
        )


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness(tmp_path: Path) -> AsyncIterator[MakeHarness]:
    clients: list[TestClient] = []
    dbs: list[Database] = []

    async def make(max_body_bytes: int = 1024 * 1024) -> Harness:
        db_url = f"sqlite:{tmp_path / 'bridge.db'}"
        db = await open_database(DatabaseConfig(url=db_url))
        dbs.append(db)
        inbox = InboxStore(db)
        harness: Harness

        async def query_user(mxid: str) -> bool:
            harness.user_queries.append(mxid)
            return mxid == KNOWN_USER

        async def ready() -> dict[str, bool]:
            return dict(harness.checks)

        server = AppserviceServer(
            hs_token=HS_TOKEN,
            inbox=inbox,
            on_stored=lambda: harness.stored_calls.append(None),
            query_user=query_user,
            ready=ready,
            max_body_bytes=max_body_bytes,
        )
        client = TestClient(TestServer(server.app))
        await client.start_server()
        clients.append(client)
        harness = Harness(client=client, db=db, inbox=inbox, db_url=db_url)
        return harness

    yield make
    for client in clients:
        await client.close()
    for db in dbs:
        if not getattr(db, "_stopped", False):
            await db.stop()


@pytest.fixture
async def hs(make_harness: MakeHarness) -> Harness:
    return await make_harness()


async def matrix_error(response: Any, status: int, errcode: str) -> None:
    assert response.status == status, await response.text()
    body = await response.json()
    assert body["errcode"] == errcode
    assert isinstance(body["error"], str) and body["error"]


# --- Transactions --------------------------------------------------------------------------------


async def test_transaction_with_the_right_token_is_stored_then_acknowledged(hs: Harness) -> None:
    response = await hs.put("txn1", {"events": [event(1), event(2)]})

    assert response.status == 200
    assert await response.json() == {}
    assert await hs.stored_event_ids() == ["$event1", "$event2"]
    assert (await hs.inbox.pending(0, 10))[0].payload == event(1)
    assert len(hs.stored_calls) == 1


async def test_half_a_surrogate_pair_in_content_becomes_a_replacement_character(
    hs: Harness,
) -> None:
    """JSON can escape half a UTF-16 pair, which no UTF-8 text holds: kept as U+FFFD, the event
    stored (refusing would make the homeserver resend the transaction for ever)."""
    broken = {**event(1), "content": {"msgtype": "m.text", "body": "ok \\ud800 then"}}
    data = json.dumps({"events": [broken]}).replace("\\\\ud800", "\\ud800").encode()
    response = await hs.client.put(
        txn_path("txn-surrogate"), data=data, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 200
    [stored] = await hs.inbox.pending(0, 10)
    assert stored.payload["content"]["body"] == "ok \ufffd then"


async def test_transaction_replayed_is_acknowledged_but_not_stored_or_processed_twice(
    hs: Harness,
) -> None:
    first = await hs.put("txn1", {"events": [event(1)]})
    again = await hs.put("txn1", {"events": [event(1)]})

    assert (first.status, again.status) == (200, 200)
    assert await again.json() == {}
    assert await hs.stored_event_ids() == ["$event1"]
    assert len(hs.stored_calls) == 1


async def test_reused_transaction_id_with_new_events_is_stored_and_processed(
    hs: Harness,
) -> None:
    # Synapse on SQLite numbers its transactions from 1 again after a restart.
    first = await hs.put("1", {"events": [event(1)]})
    reused = await hs.put("1", {"events": [event(2), event(3)]})

    assert (first.status, reused.status) == (200, 200)
    assert await hs.stored_event_ids() == ["$event1", "$event2", "$event3"]
    assert len(hs.stored_calls) == 2


async def test_ephemeral_events_of_a_reused_transaction_id_are_stored(hs: Harness) -> None:
    def typing(*user_ids: str) -> dict[str, Any]:
        return {
            "type": "m.typing",
            "room_id": "!room:eimis.example",
            "content": {"user_ids": user_ids},
        }

    await hs.put("1", {"events": [], "ephemeral": [typing("@alice:eimis.example")]})
    await hs.put("1", {"events": [], "ephemeral": [typing("@alice:eimis.example")]})  # resent
    await hs.put("1", {"events": [], "ephemeral": [typing()]})  # the id reused

    payloads = [item.payload for item in await hs.inbox.pending(0, 10)]
    assert [p["content"]["user_ids"] for p in payloads] == [["@alice:eimis.example"], []]
    assert len(hs.stored_calls) == 2


async def test_transaction_without_events_is_acknowledged(hs: Harness) -> None:
    response = await hs.put("txn-ephemeral", {"events": [], "ephemeral": [{"type": "m.typing"}]})
    assert response.status == 200
    assert await hs.stored_event_ids() == []


@pytest.mark.parametrize(
    ("headers", "status", "errcode"),
    [
        ({}, 401, "M_UNAUTHORIZED"),
        ({"Authorization": "Bearer"}, 401, "M_UNAUTHORIZED"),
        ({"Authorization": f"Basic {HS_TOKEN}"}, 401, "M_UNAUTHORIZED"),
        ({"Authorization": "Bearer wrong-token"}, 403, "M_FORBIDDEN"),
        ({"Authorization": f"Bearer {HS_TOKEN}x"}, 403, "M_FORBIDDEN"),
        ({"Authorization": f"Bearer {HS_TOKEN[:-1]}"}, 403, "M_FORBIDDEN"),
    ],
)
async def test_transaction_without_the_right_token_is_refused_and_not_stored(
    hs: Harness, headers: dict[str, str], status: int, errcode: str
) -> None:
    response = await hs.put("txn1", {"events": [event(1)]}, headers=headers)

    await matrix_error(response, status, errcode)
    assert await hs.stored_event_ids() == []
    assert hs.stored_calls == []
    assert not await hs.inbox.transaction_seen("txn1")


async def test_token_in_the_query_string_is_not_accepted(hs: Harness) -> None:
    response = await hs.client.put(
        txn_path("txn1"), json={"events": [event(1)]}, params={"access_token": HS_TOKEN}
    )

    await matrix_error(response, 401, "M_UNAUTHORIZED")
    assert await hs.stored_event_ids() == []
    assert not await hs.inbox.transaction_seen("txn1")


async def test_refused_transaction_can_be_resent_with_the_right_token(hs: Harness) -> None:
    refused = await hs.put("txn1", {"events": [event(1)]}, headers={"Authorization": "Bearer x"})
    accepted = await hs.put("txn1", {"events": [event(1)]})
    assert (refused.status, accepted.status) == (403, 200)
    assert await hs.stored_event_ids() == ["$event1"]


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"events": [}', b"\xff\xfe{}"])
async def test_malformed_json_is_refused_and_not_stored(hs: Harness, body: bytes) -> None:
    response = await hs.client.put(
        txn_path("txn1"), data=body, headers={**AUTH, "Content-Type": "application/json"}
    )

    await matrix_error(response, 400, "M_NOT_JSON")
    assert not await hs.inbox.transaction_seen("txn1")


@pytest.mark.parametrize(
    "body",
    [
        [event(1)],
        "events",
        None,
        {"events": {"0": event(1)}},
        {"events": [event(1), "$event2"]},
        {"events": [event(1), {k: v for k, v in event(2).items() if k != "event_id"}]},
        {"events": [event(1), {**event(2), "event_id": 2}]},
        {"events": [event(1), {k: v for k, v in event(2).items() if k != "room_id"}]},
        {"events": [{k: v for k, v in event(1).items() if k != "type"}]},
        {"events": [{k: v for k, v in event(1).items() if k != "sender"}]},
    ],
    ids=[
        "list",
        "string",
        "null",
        "events-object",
        "event-string",
        "no-event-id",
        "int-event-id",
        "no-room-id",
        "no-type",
        "no-sender",
    ],
)
async def test_badly_shaped_transaction_is_refused_and_nothing_is_stored(
    hs: Harness, body: Any
) -> None:
    response = await hs.put("txn1", body)

    await matrix_error(response, 400, "M_BAD_JSON")
    # Not even the valid events before the bad one: a transaction is stored whole or not at all.
    assert await hs.stored_event_ids() == []
    assert not await hs.inbox.transaction_seen("txn1")
    assert hs.stored_calls == []


async def test_body_over_the_size_limit_is_refused_with_413(make_harness: MakeHarness) -> None:
    hs = await make_harness(max_body_bytes=4096)
    big = {**event(1), "content": {"msgtype": "m.text", "body": "x" * 8192}}

    response = await hs.put("txn1", {"events": [big]})

    assert not await hs.inbox.transaction_seen("txn1")
    assert hs.stored_calls == []
    await matrix_error(response, 413, "M_TOO_LARGE")


async def test_oversized_body_is_refused_and_not_stored(make_harness: MakeHarness) -> None:
    hs = await make_harness(max_body_bytes=4096)
    big = {**event(1), "content": {"msgtype": "m.text", "body": "x" * 8192}}
    small = {**event(2), "content": {"msgtype": "m.text", "body": "x" * 2048}}

    refused = await hs.put("txn1", {"events": [big]})
    accepted = await hs.put("txn2", {"events": [small]})

    assert refused.status >= 400
    assert not await hs.inbox.transaction_seen("txn1")
    assert accepted.status == 200
    assert await hs.stored_event_ids() == ["$event2"]


async def test_storage_failure_is_not_acknowledged(make_harness: MakeHarness) -> None:
    hs = await make_harness()
    await hs.db.stop()

    response = await hs.put("txn1", {"events": [event(1)]})

    await matrix_error(response, 503, "M_UNKNOWN")
    assert hs.stored_calls == []
    db = await open_database(DatabaseConfig(url=hs.db_url))
    try:
        assert not await InboxStore(db).transaction_seen("txn1")
        assert await InboxStore(db).pending(0, 10) == []
    finally:
        await db.stop()


# --- Other homeserver calls ----------------------------------------------------------------------


async def test_user_query_answers_200_for_a_user_the_bridge_has(hs: Harness) -> None:
    response = await hs.client.get(f"/_matrix/app/v1/users/{KNOWN_USER}", headers=AUTH)
    assert response.status == 200
    assert await response.json() == {}
    assert hs.user_queries == [KNOWN_USER]


async def test_user_query_answers_404_for_a_user_the_bridge_does_not_have(hs: Harness) -> None:
    mxid = "@eimis_pl_899700218896:eimis.example"
    response = await hs.client.get(f"/_matrix/app/v1/users/{mxid}", headers=AUTH)
    await matrix_error(response, 404, "M_NOT_FOUND")
    assert hs.user_queries == [mxid]


async def test_user_query_needs_the_token(hs: Harness) -> None:
    response = await hs.client.get(f"/_matrix/app/v1/users/{KNOWN_USER}")
    await matrix_error(response, 401, "M_UNAUTHORIZED")
    response = await hs.client.get(
        f"/_matrix/app/v1/users/{KNOWN_USER}", headers={"Authorization": "Bearer nope"}
    )
    await matrix_error(response, 403, "M_FORBIDDEN")
    assert hs.user_queries == []


async def test_room_alias_query_answers_404(hs: Harness) -> None:
    response = await hs.client.get("/_matrix/app/v1/rooms/%23eimis_x:eimis.example", headers=AUTH)
    await matrix_error(response, 404, "M_NOT_FOUND")


async def test_ping_answers_200_with_the_token(hs: Harness) -> None:
    response = await hs.client.post(
        "/_matrix/app/v1/ping", json={"transaction_id": "ping1"}, headers=AUTH
    )
    assert response.status == 200
    assert await response.json() == {}


async def test_ping_is_refused_without_the_right_token(hs: Harness) -> None:
    response = await hs.client.post(
        "/_matrix/app/v1/ping", json={}, headers={"Authorization": "Bearer nope"}
    )
    await matrix_error(response, 403, "M_FORBIDDEN")
    response = await hs.client.post("/_matrix/app/v1/ping", json={})
    await matrix_error(response, 401, "M_UNAUTHORIZED")


# --- Probes --------------------------------------------------------------------------------------


async def test_liveness_answers_200_without_a_token(hs: Harness) -> None:
    response = await hs.client.get("/live")
    assert response.status == 200


async def test_readiness_is_200_when_every_check_passes(hs: Harness) -> None:
    response = await hs.client.get("/ready")
    assert response.status == 200
    assert await response.json() == {
        "ready": True,
        "checks": {"database": True, "homeserver": True},
    }


async def test_readiness_is_503_and_names_the_failing_check(hs: Harness) -> None:
    hs.checks["homeserver"] = False
    response = await hs.client.get("/ready")
    assert response.status == 503
    assert await response.json() == {
        "ready": False,
        "checks": {"database": True, "homeserver": False},
    }


# --- The token check itself ----------------------------------------------------------------------


def test_token_check_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)

    check_hs_token(make_mocked_request("GET", "/", headers=AUTH), HS_TOKEN)
    with pytest.raises(web.HTTPException) as caught:
        check_hs_token(
            make_mocked_request("GET", "/", headers={"Authorization": "Bearer wrong"}), HS_TOKEN
        )
    assert caught.value.status == 403

    assert len(calls) == 2
    assert {bytes(b) for _, b in calls} == {HS_TOKEN.encode()}


def test_token_check_decision_is_the_constant_time_comparison(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With compare_digest saying "different", even the right token is refused: no other path
    # (such as ==) decides.
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: False)
    with pytest.raises(web.HTTPException) as caught:
        check_hs_token(make_mocked_request("GET", "/", headers=AUTH), HS_TOKEN)
    assert caught.value.status == 403
    assert json.loads(caught.value.text or "{}")["errcode"] == "M_FORBIDDEN"
