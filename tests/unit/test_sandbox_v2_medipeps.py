"""Medipeps-style sandbox v2: replies, inline files, deletions, read markers and delivery
statuses on both sides; 501 for what Medipeps-style lacks (edits, reactions, typing)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from connectors.medipeps import sandbox as medipeps_sandbox
from connectors.medipeps.sandbox import API_KEY, USERS, create_app
from connectors.sandbox import KERNEL_KEY

NATHALIE, PIERRE, CHLOE = (str(u.idnps) for u in USERS[:3])
BOB = "@bob:matrix.example.org"
KEY = {"X-Api-Key": API_KEY}
MiB = 1024 * 1024
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
Client = TestClient[Any, Any]


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Client]:
    async with TestClient(TestServer(create_app(files_dir=str(tmp_path)))) as client:
        yield client


async def ok(resp: Any, status: int) -> Any:
    text = await resp.text()
    assert resp.status == status, text
    return json.loads(text) if text else None


async def user_refused(resp: Any, status: int, code: str) -> str:
    body = await resp.json()
    assert (resp.status, body["error"]) == (status, code), body
    return str(body["message"])


async def api_refused(resp: Any, status: int, code: str) -> str:
    body = await resp.json()
    assert (resp.status, body["code"]) == (status, code), body
    assert body["detail"].endswith(".")
    return str(body["detail"])


async def user_conversation(client: Client, creator: str, *others: str) -> str:
    resp = await client.post(
        f"/_sandbox/users/{creator}/conversations", json={"with": list(others), "title": "RCP"}
    )
    return str((await ok(resp, 201))["conversation_id"])


async def user_writes(client: Client, author: str, conv: str, **body: Any) -> str:
    resp = await client.post(f"/_sandbox/users/{author}/conversations/{conv}/messages", json=body)
    return str((await ok(resp, 201))["message_id"])


async def user_uploads(client: Client, idnps: str, data: bytes, mime: str, name: str) -> str:
    resp = await client.post(
        f"/_sandbox/users/{idnps}/files",
        data=data,
        headers={"Content-Type": mime, "X-Filename": name},
    )
    return str((await ok(resp, 201))["file_id"])


def api_message(ref: str, **extra: Any) -> dict[str, Any]:
    return {"author_ref": BOB, "author_label": "Bob", "request_ref": ref, **extra}


async def api_writes(client: Client, conv: str, ref: str, **extra: Any) -> int:
    resp = await client.post(
        f"/mp/conversations/{conv}/messages", json=api_message(ref, **extra), headers=KEY
    )
    return int((await ok(resp, 200))["msg"])


async def view(client: Client, idnps: str, conv: str) -> dict[str, Any]:
    return dict(await ok(await client.get(f"/_sandbox/users/{idnps}/conversations/{conv}"), 200))


async def feed(client: Client, after: int = 0, limit: int = 500) -> dict[str, Any]:
    resp = await client.get("/mp/events", params={"after": after, "limit": limit}, headers=KEY)
    return dict(await ok(resp, 200))


def inline(data: bytes, mime: str = "image/png", filename: str = "scan.png") -> dict[str, str]:
    return {"filename": filename, "mime": mime, "data_b64": base64.b64encode(data).decode()}


# --- Bridge → user: inline files, replies ------------------------------------------------------


async def test_api_inline_file_reaches_the_user(sandbox: Client) -> None:
    conv = await user_conversation(sandbox, NATHALIE, PIERRE, BOB)
    question = await user_writes(sandbox, NATHALIE, conv, text="Le scanner ?")
    body = {"body": "", "reply_to": int(question), "attachment": inline(PNG, filename="scan é.png")}
    first = await api_writes(sandbox, conv, "f1", **body)
    again = await api_writes(sandbox, conv, "f1", **body)
    assert again == first
    store = sandbox.app[KERNEL_KEY].files.directory
    assert len(list(store.iterdir())) == 1  # a repeated request_ref stores nothing again

    [shown] = [m for m in (await view(sandbox, PIERRE, conv))["messages"] if m["sender"] == BOB]
    assert shown["message_id"] == str(first)
    assert (shown["text"], shown["reply_to"], shown["kind"]) == ("", question, "text")
    attachment = shown["attachment"]
    assert {k: attachment[k] for k in ("name", "mime_type", "size")} == {
        "name": "scan é.png",
        "mime_type": "image/png",
        "size": len(PNG),
    }
    resp = await sandbox.get(f"/_sandbox/users/{PIERRE}/files/{attachment['file_id']}")
    assert resp.status == 200
    assert await resp.read() == PNG
    assert resp.headers["Content-Type"] == "image/png"
    assert resp.headers["Content-Disposition"].endswith("filename*=UTF-8''scan%20%C3%A9.png")
    resp = await sandbox.get(f"/_sandbox/users/{CHLOE}/files/{attachment['file_id']}")
    await user_refused(resp, 404, "file_not_found")
    # A PDF with a wrapped base64 and MIME parameters is fine too.
    pdf = inline(b"%PDF-1.7\n" * 100, "application/pdf; charset=binary", "cr.pdf")
    pdf["data_b64"] = "\n".join(pdf["data_b64"][i : i + 76] for i in range(0, 1200, 76))
    await api_writes(sandbox, conv, "f2", attachment=pdf)
    assert (await feed(sandbox))["events"][-1]["type"] == "NEW_MSG"  # only the user's message


async def test_api_message_refusals(sandbox: Client) -> None:
    conv = await user_conversation(sandbox, NATHALIE, BOB)
    other = await user_conversation(sandbox, PIERRE, BOB)
    elsewhere = await user_writes(sandbox, PIERRE, other, text="ailleurs")
    path = f"/mp/conversations/{conv}/messages"
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"attachment": inline(b"x" * (MiB + 1))}, 413, "PAYLOAD_TOO_LARGE"),
        ({"attachment": inline(b"hello", "text/plain", "a.txt")}, 415, "UNSUPPORTED_MEDIA_TYPE"),
        ({"attachment": inline(PNG, "image/gif")}, 415, "UNSUPPORTED_MEDIA_TYPE"),
        ({"attachment": {**inline(PNG), "data_b64": "%%%"}}, 400, "BAD_REQUEST"),
        ({"attachment": {"filename": "a.png", "mime": "image/png"}}, 400, "BAD_REQUEST"),
        ({}, 400, "BAD_REQUEST"),
        ({"body": " "}, 400, "BAD_REQUEST"),
        ({"body": "x", "reply_to": 999}, 404, "NOT_FOUND"),
        ({"body": "x", "reply_to": int(elsewhere)}, 404, "NOT_FOUND"),
        ({"body": "x", "reply_to": "1"}, 400, "BAD_REQUEST"),
        ({"body": "x" * (64 * 1024 + 1)}, 413, "PAYLOAD_TOO_LARGE"),
    ]
    for i, (extra, status, code) in enumerate(cases):
        resp = await sandbox.post(path, json=api_message(f"r{i}", **extra), headers=KEY)
        await api_refused(resp, status, code)
    exactly = await api_writes(sandbox, conv, "max", attachment=inline(b"\xff" * MiB, "image/jpeg"))
    assert exactly > 0
    resp = await sandbox.post(
        path,
        data=b'{"author_ref": "@bob:x.y", "author_label": "\xc3", "body": "x", "request_ref": "u"}',
        headers={**KEY, "Content-Type": "application/json"},
    )
    assert "UTF-8" in await api_refused(resp, 400, "BAD_REQUEST")
    # Refused files were never written: only the 1 MiB one is on disk.
    assert len(list(sandbox.app[KERNEL_KEY].files.directory.iterdir())) == 1


# --- User → bridge: the feed ---------------------------------------------------------------------


async def test_user_actions_reach_the_feed_in_order(sandbox: Client) -> None:
    conv = await user_conversation(sandbox, NATHALIE, PIERRE, BOB)
    from_bob = await api_writes(sandbox, conv, "b1", body="Bonjour")
    pdf = b"%PDF-1.4 compte rendu " + bytes(range(256)) * 64
    file_id = await user_uploads(
        sandbox, NATHALIE, pdf, "application/pdf", "CR%20op%C3%A9ratoire.pdf"
    )
    with_file = await user_writes(
        sandbox,
        NATHALIE,
        conv,
        text="Voici le CR @Pierre Roux",
        reply_to=str(from_bob),
        file_id=file_id,
        mentions=[PIERRE],
    )
    assert (
        await sandbox.post(
            f"/_sandbox/users/{PIERRE}/conversations/{conv}/read", json={"up_to": with_file}
        )
    ).status == 204
    assert (
        await sandbox.post(
            f"/_sandbox/users/{PIERRE}/conversations/{conv}/read", json={"up_to": str(from_bob)}
        )
    ).status == 204
    gone = await user_writes(sandbox, PIERRE, conv, text="Oups")
    base = f"/_sandbox/users/{PIERRE}/conversations/{conv}/messages/{gone}"
    assert (await sandbox.delete(base)).status == 204
    assert (await sandbox.delete(base)).status == 204
    # The API client's own actions do not appear.
    resp = await sandbox.post(
        f"/mp/conversations/{conv}/read",
        json={"reader_ref": BOB, "up_to": int(with_file)},
        headers=KEY,
    )
    assert resp.status == 204
    assert (
        await sandbox.delete(f"/mp/conversations/{conv}/messages/{from_bob}", headers=KEY)
    ).status == 204
    assert (
        await sandbox.delete(f"/mp/conversations/{conv}/messages/{from_bob}", headers=KEY)
    ).status == 204

    page = await feed(sandbox)
    events = page["events"]
    assert [e["type"] for e in events] == ["NEW_CONV", "NEW_MSG", "READ", "NEW_MSG", "DEL_MSG"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5] and page["cursor"] == 5
    new_msg = events[1]
    assert new_msg["msg"] == {
        "msg": int(with_file),
        "conv": int(conv),
        "author": NATHALIE,
        "body": "Voici le CR @Pierre Roux",
        "at": new_msg["at"],
        "reply_to": from_bob,
        "attachment": {
            "filename": "CR opératoire.pdf",
            "mime": "application/pdf",
            "size": len(pdf),
            "data_b64": base64.b64encode(pdf).decode(),
        },
    }
    assert events[2]["read"] == {"conv": int(conv), "reader": PIERRE, "up_to": int(with_file)}
    assert events[3]["msg"]["attachment"] is None and events[3]["msg"]["reply_to"] is None
    assert events[4]["msg"] == {"msg": int(gone), "conv": int(conv), "author": PIERRE}
    assert all(isinstance(e["at"], int) for e in events)
    assert events[4]["at"] >= events[3]["at"]

    conversation = await view(sandbox, NATHALIE, conv)
    assert conversation["read_up_to"] == {PIERRE: with_file, BOB: with_file}
    assert conversation["typing"] == []
    shown = {m["message_id"]: m for m in conversation["messages"]}
    assert (shown[str(from_bob)]["deleted"], shown[str(from_bob)]["text"]) == (True, "")
    assert (shown[gone]["deleted"], shown[gone]["text"]) == (True, "")
    assert shown[with_file]["mentions"] == [PIERRE]
    # Pierre can open the file Nathalie sent him.
    resp = await sandbox.get(f"/_sandbox/users/{PIERRE}/files/{file_id}")
    assert resp.status == 200 and await resp.read() == pdf


async def test_delivery_statuses_are_shown_to_the_author(sandbox: Client) -> None:
    conv = await user_conversation(sandbox, CHLOE, PIERRE, BOB)
    mine = await user_writes(sandbox, CHLOE, conv, text="Sortie prévue demain")
    from_bob = await api_writes(sandbox, conv, "b", body="Noté")
    path = f"/mp/conversations/{conv}/messages/{mine}/status"
    for body in ({"status": "delivered"}, {"status": "failed", "detail": "Matrix refused it"}):
        assert (await sandbox.post(path, json=body, headers=KEY)).status == 204
    shown = {m["message_id"]: m for m in (await view(sandbox, CHLOE, conv))["messages"]}
    assert shown[mine]["delivery"] == [
        {"status": "delivered", "detail": ""},
        {"status": "failed", "detail": "Matrix refused it"},
    ]
    assert "delivery" not in shown[str(from_bob)]
    pierre = {m["message_id"]: m for m in (await view(sandbox, PIERRE, conv))["messages"]}
    assert "delivery" not in pierre[mine]

    bad = [
        (path, {"status": "lost"}, 400, "BAD_REQUEST"),
        (
            f"/mp/conversations/{conv}/messages/{from_bob}/status",
            {"status": "delivered"},
            400,
            "BAD_REQUEST",
        ),
        (
            f"/mp/conversations/{conv}/messages/999/status",
            {"status": "delivered"},
            404,
            "NOT_FOUND",
        ),
        (f"/mp/conversations/{conv}/messages/x/status", {"status": "delivered"}, 404, "NOT_FOUND"),
        (f"/mp/conversations/{conv}/read", {"reader_ref": BOB, "up_to": 999}, 404, "NOT_FOUND"),
        (
            f"/mp/conversations/{conv}/read",
            {"reader_ref": PIERRE, "up_to": int(mine)},
            400,
            "BAD_REQUEST",
        ),
        (f"/mp/conversations/{conv}/read", {"reader_ref": BOB, "up_to": "1"}, 400, "BAD_REQUEST"),
        ("/mp/conversations/999/read", {"reader_ref": BOB, "up_to": 1}, 404, "NOT_FOUND"),
    ]
    for url, body, status, code in bad:
        await api_refused(await sandbox.post(url, json=body, headers=KEY), status, code)
    resp = await sandbox.delete(f"/mp/conversations/{conv}/messages/{mine}", headers=KEY)
    await api_refused(resp, 403, "FORBIDDEN")
    resp = await sandbox.delete(f"/mp/conversations/{conv}/messages/999", headers=KEY)
    await api_refused(resp, 404, "NOT_FOUND")


# --- What Medipeps-style lacks, and the vendor's file rules on the user side --------------------


async def test_unsupported_actions_are_501(sandbox: Client) -> None:
    conv = await user_conversation(sandbox, NATHALIE, BOB)
    msg = await user_writes(sandbox, NATHALIE, conv, text="Bonjour")
    base = f"/_sandbox/users/{NATHALIE}/conversations/{conv}"
    calls = [
        ("PATCH", f"{base}/messages/{msg}", {"text": "Bonsoir"}),
        ("POST", f"{base}/messages/{msg}/reactions", {"emoji": "👍"}),
        ("DELETE", f"{base}/messages/{msg}/reactions/1", None),
        ("POST", f"{base}/typing", {"typing": True}),
        ("POST", f"{base}/messages", {"location": {"lat": 45.0, "lon": 4.8}}),
    ]
    for method, url, body in calls:
        resp = await sandbox.request(method, url, json=body)
        assert "Medipeps does not support" in await user_refused(resp, 501, "not_supported")
    # The vendor API has no such endpoints at all.
    resp = await sandbox.patch(f"/mp/conversations/{conv}/messages/{msg}", json={}, headers=KEY)
    await api_refused(resp, 405, "METHOD_NOT_ALLOWED")
    resp = await sandbox.post(f"/mp/conversations/{conv}/typing", json={}, headers=KEY)
    await api_refused(resp, 404, "NOT_FOUND")
    page = await feed(sandbox)
    assert [e["type"] for e in page["events"]] == ["NEW_CONV", "NEW_MSG"]
    assert page["events"][1]["msg"]["body"] == "Bonjour"


async def test_user_files_follow_medipeps_rules(sandbox: Client) -> None:
    conv = await user_conversation(sandbox, NATHALIE, BOB)
    url = f"/_sandbox/users/{NATHALIE}/conversations/{conv}/messages"
    text_file = await user_uploads(sandbox, NATHALIE, b"notes", "text/plain", "notes.txt")
    resp = await sandbox.post(url, json={"file_id": text_file})
    assert "application/pdf" in await user_refused(resp, 415, "unsupported_media_type")
    resp = await sandbox.post(
        f"/_sandbox/users/{NATHALIE}/files",
        data=b"\x00" * (MiB + 1),
        headers={"Content-Type": "image/png", "X-Filename": "big.png"},
    )
    assert "1 MiB" in await user_refused(resp, 413, "file_too_large")
    png = await user_uploads(sandbox, NATHALIE, PNG, "image/png", "ok.png")
    sent = await user_writes(sandbox, NATHALIE, conv, file_id=png)
    [_, event] = (await feed(sandbox))["events"]
    assert event["msg"]["msg"] == int(sent) and event["msg"]["body"] == ""
    assert base64.b64decode(event["msg"]["attachment"]["data_b64"]) == PNG


async def test_feed_pages_with_inline_files_stay_small(
    sandbox: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(medipeps_sandbox, "FEED_PAGE_INLINE_BUDGET", 3 * len(PNG))
    conv = await user_conversation(sandbox, NATHALIE, BOB)
    png = await user_uploads(sandbox, NATHALIE, PNG, "image/png", "ok.png")
    for _ in range(6):
        await user_writes(sandbox, NATHALIE, conv, file_id=png)
    await user_writes(sandbox, NATHALIE, conv, text="fin")
    seqs: list[int] = []
    cursor = 0
    while page := (await feed(sandbox, after=cursor))["events"]:
        assert len(page) < 8
        seqs += [e["seq"] for e in page]
        cursor = page[-1]["seq"]
    assert seqs == list(range(1, 9))
    first = (await feed(sandbox))["events"]
    assert [e["seq"] for e in first] == [1, 2, 3, 4]  # 3 files make the budget; a 4th file waits
    one = await feed(sandbox, after=1, limit=1)
    assert [e["seq"] for e in one["events"]] == [2] and one["cursor"] == 2
