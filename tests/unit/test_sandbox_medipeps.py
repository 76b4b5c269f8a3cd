"""The Medipeps-style sandbox: user-side API, API key, idempotency, no echo, the events feed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from connectors.idnps import Idnps, luhn_check_digit
from connectors.medipeps.sandbox import API_KEY, USERS, create_app
from connectors.sandbox import MAX_TEXT_BYTES

NATHALIE, PIERRE, CHLOE = (str(u.idnps) for u in USERS[:3])
MATRIX_USER = "@bob:matrix.example.org"
FOREIGN = "0" + "12345678" + luhn_check_digit("12345678")  # a valid ADELI-based IDNPS
KEY = {"X-Api-Key": API_KEY}


@pytest.fixture
async def sandbox() -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(create_app())) as client:
        yield client


async def user_conversation(client: TestClient[Any, Any], creator: str, *others: str) -> str:
    resp = await client.post(
        f"/_sandbox/users/{creator}/conversations", json={"with": list(others), "title": "RCP"}
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


async def events(client: TestClient[Any, Any], **query: int) -> dict[str, Any]:
    resp = await client.get("/mp/events", params=query, headers=KEY)
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


def test_users_are_valid() -> None:
    assert len(USERS) == 5
    assert all(Idnps(u.idnps).kind == "RPPS" for u in USERS)
    assert Idnps.is_valid(FOREIGN)


# --- User-side API -----------------------------------------------------------------------------


async def test_user_conversation_and_inbox(sandbox: TestClient[Any, Any]) -> None:
    resp = await sandbox.get("/_sandbox/users")
    assert [u["idnps"] for u in (await resp.json())["users"]] == [str(u.idnps) for u in USERS]

    conv = await user_conversation(sandbox, NATHALIE, PIERRE, FOREIGN, MATRIX_USER)
    assert conv.isdigit()
    resp = await sandbox.get(f"/_sandbox/users/{PIERRE}/conversations")
    assert (await resp.json())["conversations"] == [
        {
            "conversation_id": conv,
            "title": "RCP",
            "description": None,
            "members": [NATHALIE, PIERRE],
            "external": [FOREIGN, MATRIX_USER],
        }
    ]
    first = await user_writes(sandbox, NATHALIE, conv, "Bonjour")
    await user_writes(sandbox, PIERRE, conv, "Salut")
    third = await user_writes(sandbox, NATHALIE, conv, "Compte rendu envoyé")
    pierre = await inbox(sandbox, PIERRE)
    assert [m["message_id"] for m in pierre] == [first, third]
    assert pierre[1]["sender"] == NATHALIE
    assert pierre[1]["sender_name"] == "Nathalie Girard"
    assert pierre[1]["text"] == "Compte rendu envoyé"
    assert [m["text"] for m in await inbox(sandbox, NATHALIE)] == ["Salut"]


async def test_user_side_refusals(sandbox: TestClient[Any, Any]) -> None:
    resp = await sandbox.get("/_sandbox/users/9123/inbox")
    assert resp.status == 400
    assert "starts with '8' (RPPS) or '0' (ADELI)" in (await resp.json())["message"]
    resp = await sandbox.get(f"/_sandbox/users/{FOREIGN}/inbox")
    assert resp.status == 404
    resp = await sandbox.post(
        f"/_sandbox/users/{NATHALIE}/conversations", json={"with": ["81000003456X"]}
    )
    assert resp.status == 400
    assert "digits only" in (await resp.json())["message"]
    resp = await sandbox.post(f"/_sandbox/users/{NATHALIE}/conversations", json={"with": []})
    assert resp.status == 400
    resp = await sandbox.post(
        f"/_sandbox/users/{NATHALIE}/conversations", json={"with": [NATHALIE]}
    )
    assert resp.status == 400


# --- Vendor API ----------------------------------------------------------------------------------


async def test_api_key_is_required(sandbox: TestClient[Any, Any]) -> None:
    path = f"/mp/professionals/{NATHALIE}"
    for headers in ({}, {"X-Api-Key": "wrong"}, {"X-Api-Key": API_KEY + "x"}):
        resp = await sandbox.get(path, headers=headers)
        assert resp.status == 403
        body = await resp.json()
        assert body["code"] == "FORBIDDEN" and body["detail"].endswith(".")
    resp = await sandbox.get("/mp/events", headers={"X-Api-Key": "wrong"})
    assert resp.status == 403

    resp = await sandbox.get(path, headers=KEY)
    assert await resp.json() == {
        "idnps": NATHALIE,
        "first": "Nathalie",
        "last": "Girard",
        "job": "Médecin généraliste",
    }
    resp = await sandbox.get(f"/mp/professionals/{FOREIGN}", headers=KEY)
    assert resp.status == 404
    assert (await resp.json())["code"] == "NOT_FOUND"


async def test_api_conversation_and_message_are_idempotent(sandbox: TestClient[Any, Any]) -> None:
    body = {
        "subject": "Portail",
        "participants": [NATHALIE, CHLOE],
        "guests": [{"ref": MATRIX_USER, "label": "Bob"}],
        "request_ref": "portal-7",
    }
    first = await sandbox.post("/mp/conversations", json=body, headers=KEY)
    again = await sandbox.post("/mp/conversations", json=body, headers=KEY)
    conv = (await first.json())["conv"]
    assert isinstance(conv, int)
    assert (await again.json())["conv"] == conv

    message = {"author_ref": MATRIX_USER, "author_label": "Bob", "body": "Vu", "request_ref": "$e"}
    path = f"/mp/conversations/{conv}/messages"
    first = await sandbox.post(path, json=message, headers=KEY)
    again = await sandbox.post(path, json=message, headers=KEY)
    sent = await first.json()
    assert isinstance(sent["msg"], int) and isinstance(sent["at"], int)
    assert await again.json() == sent

    for idnps in (NATHALIE, CHLOE):
        [shown] = await inbox(sandbox, idnps)
        assert (shown["sender"], shown["sender_name"], shown["text"]) == (MATRIX_USER, "Bob", "Vu")
        assert shown["message_id"] == str(sent["msg"])
        assert shown["conversation_id"] == str(conv)


async def test_api_refusals(sandbox: TestClient[Any, Any]) -> None:
    ok = {"participants": [NATHALIE], "request_ref": "r"}
    cases: list[tuple[Any, int, str]] = [
        ({**ok, "participants": [FOREIGN]}, 404, "NOT_FOUND"),
        ({**ok, "participants": ["8100"]}, 400, "BAD_REQUEST"),
        ({**ok, "request_ref": 3}, 400, "BAD_REQUEST"),
        ({"participants": [NATHALIE]}, 400, "BAD_REQUEST"),
        ({**ok, "guests": [{"ref": PIERRE, "label": "Pierre"}]}, 400, "BAD_REQUEST"),
        ("participants", 400, "BAD_REQUEST"),
    ]
    for body, status, code in cases:
        resp = await sandbox.post("/mp/conversations", json=body, headers=KEY)
        assert (resp.status, (await resp.json())["code"]) == (status, code), body

    resp = await sandbox.post("/mp/conversations", data=b"[", headers=KEY)
    assert resp.status == 400
    assert (await resp.json())["detail"] == "The request body is not valid JSON."

    message = {"author_ref": FOREIGN, "author_label": "Dr X", "body": "Vu", "request_ref": "m"}
    for conv in ("999", "abc", "-1"):
        resp = await sandbox.post(f"/mp/conversations/{conv}/messages", json=message, headers=KEY)
        assert resp.status == 404
        assert (await resp.json())["code"] == "NOT_FOUND"

    conv = (await (await sandbox.post("/mp/conversations", json=ok, headers=KEY)).json())["conv"]
    path = f"/mp/conversations/{conv}/messages"
    big = {**message, "body": "x" * (MAX_TEXT_BYTES + 1)}
    resp = await sandbox.post(path, json=big, headers=KEY)
    assert resp.status == 413
    assert (await resp.json())["code"] == "PAYLOAD_TOO_LARGE"
    resp = await sandbox.post(path, data=b"x" * (2 * 1024 * 1024), headers=KEY)
    assert resp.status == 413
    assert (await resp.json())["code"] == "PAYLOAD_TOO_LARGE"
    resp = await sandbox.post(path, json={**message, "body": 12}, headers=KEY)
    assert resp.status == 400
    assert "'body'" in (await resp.json())["detail"]
    assert (await sandbox.post(path, json=message, headers=KEY)).status == 200


# --- Events feed ---------------------------------------------------------------------------------


async def test_feed_has_vendor_user_events_only(sandbox: TestClient[Any, Any]) -> None:
    await user_conversation(sandbox, NATHALIE, PIERRE)  # no guest: not in the feed
    conv = await user_conversation(sandbox, NATHALIE, PIERRE, MATRIX_USER)
    msg = await user_writes(sandbox, PIERRE, conv, "Résultats reçus")
    resp = await sandbox.post(
        f"/mp/conversations/{conv}/messages",
        json={
            "author_ref": MATRIX_USER,
            "author_label": "Bob",
            "body": "Merci",
            "request_ref": "a",
        },
        headers=KEY,
    )
    assert resp.status == 200
    resp = await sandbox.post(
        "/mp/conversations",
        json={
            "participants": [CHLOE],
            "guests": [{"ref": FOREIGN, "label": "X"}],
            "request_ref": "b",
        },
        headers=KEY,
    )
    assert resp.status == 200

    page = await events(sandbox)
    new_conv, new_msg = page["events"]
    assert page["cursor"] == 2
    assert new_conv["seq"] == 1 and new_conv["type"] == "NEW_CONV"
    assert new_conv["conv"] == {
        "conv": int(conv),
        "subject": "RCP",
        "owner": NATHALIE,
        "participants": [NATHALIE, PIERRE],
        "guests": [{"ref": MATRIX_USER}],
    }
    assert new_msg["seq"] == 2 and new_msg["type"] == "NEW_MSG"
    assert new_msg["msg"] == {
        "msg": int(msg),
        "conv": int(conv),
        "author": PIERRE,
        "body": "Résultats reçus",
        "at": new_msg["at"],
        "reply_to": None,
        "attachment": None,
    }
    assert isinstance(new_msg["at"], int) and new_msg["at"] >= new_conv["at"]


async def test_feed_cursor(sandbox: TestClient[Any, Any]) -> None:
    assert await events(sandbox) == {"events": [], "cursor": 0}
    assert await events(sandbox, after=7) == {"events": [], "cursor": 7}
    conv = await user_conversation(sandbox, CHLOE, MATRIX_USER)
    for n in range(4):
        await user_writes(sandbox, CHLOE, conv, f"message {n}")

    page = await events(sandbox, limit=2)
    assert [e["seq"] for e in page["events"]] == [1, 2] and page["cursor"] == 2
    page = await events(sandbox, after=page["cursor"], limit=2)
    assert [e["seq"] for e in page["events"]] == [3, 4] and page["cursor"] == 4
    page = await events(sandbox, after=page["cursor"], limit=2)
    assert [e["seq"] for e in page["events"]] == [5] and page["cursor"] == 5
    page = await events(sandbox, after=5)
    assert page == {"events": [], "cursor": 5}

    # The feed keeps its events: reading again from an older cursor returns them again.
    again = await events(sandbox, after=2, limit=500)
    assert [e["seq"] for e in again["events"]] == [3, 4, 5]
    assert [e["msg"]["body"] for e in again["events"]] == ["message 1", "message 2", "message 3"]

    for query in ({"limit": 0}, {"limit": 501}, {"after": -1}):
        resp = await sandbox.get("/mp/events", params=query, headers=KEY)
        assert resp.status == 400, query
        assert (await resp.json())["code"] == "BAD_REQUEST"
    resp = await sandbox.get("/mp/events?after=abc", headers=KEY)
    assert resp.status == 400


async def test_unknown_vendor_route_is_json(sandbox: TestClient[Any, Any]) -> None:
    resp = await sandbox.get("/mp/nothing", headers=KEY)
    assert resp.status == 404
    assert (await resp.json())["code"] == "NOT_FOUND"
    resp = await sandbox.delete("/mp/events", headers=KEY)
    assert resp.status == 405
    assert (await resp.json())["code"] == "METHOD_NOT_ALLOWED"
