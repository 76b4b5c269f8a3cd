"""PandaLab-style sandbox v2: files (streamed), replies, kinds, mentions, locations, edits,
deletions, reactions, read markers, typing and delivery statuses, on both sides."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.pandalab.sandbox import CLIENT_ID, CLIENT_SECRET, USERS, create_app
from connectors.sandbox import KERNEL_KEY

CAMILLE, JULIEN, SOPHIE = (str(u.idnps) for u in USERS[:3])
ALICE = "@alice:matrix.example.org"
BOB = "@bob:matrix.example.org"
SECRET = "v2-receiver-secret"
MiB = 1024 * 1024
Client = TestClient[Any, Any]


# --- Fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Client]:
    app = create_app(retry_initial=0.01, retry_max=0.05, files_dir=str(tmp_path))
    async with TestClient(TestServer(app)) as client:
        yield client


class Receiver:
    """A tiny webhook receiver: checks the signature, keeps the events in arrival order."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        timestamp = request.headers["X-PandaLab-Timestamp"]
        expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + raw, hashlib.sha256)
        if request.headers["X-PandaLab-Signature"] != "sha256=" + expected.hexdigest():
            return web.Response(status=401)
        async with self._changed:
            self.events.append(json.loads(raw))
            self._changed.notify_all()
        return web.Response(status=204)

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        async with self._changed:
            async with asyncio.timeout(10):
                await self._changed.wait_for(lambda: len(self.events) >= count)
        return list(self.events)

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


@pytest.fixture
async def receiver(sandbox: Client) -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = TestServer(app)
    await server.start_server()
    resp = await sandbox.put(
        "/api/v1/webhook",
        json={"url": str(server.make_url("/hook")), "secret": SECRET},
        headers=await auth(sandbox),
    )
    assert resp.status == 200
    yield receiver
    await server.close()


async def auth(client: Client) -> dict[str, str]:
    resp = await client.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )
    return {"Authorization": f"Bearer {(await resp.json())['access_token']}"}


async def ok(resp: Any, status: int) -> Any:
    """The JSON body (None for an empty one) after checking the status."""
    text = await resp.text()
    assert resp.status == status, text
    return json.loads(text) if text else None


async def refused(resp: Any, status: int, code: str) -> str:
    body = await resp.json()
    assert (resp.status, body["error"]) == (status, code), body
    assert body["message"].endswith(".")
    return str(body["message"])


async def user_conversation(client: Client, creator: str, *others: str) -> str:
    resp = await client.post(
        f"/_sandbox/users/{creator}/conversations", json={"with": list(others), "title": "Suivi"}
    )
    return str((await ok(resp, 201))["conversation_id"])


async def api_conversation(client: Client, headers: dict[str, str], *members: str) -> str:
    resp = await client.post(
        "/api/v1/conversations",
        json={
            "members": list(members),
            "external_participants": [{"ref": ALICE, "display_name": "Alice Durand"}],
        },
        headers={**headers, "Idempotency-Key": f"conv-{'-'.join(members)}"},
    )
    return str((await ok(resp, 201))["id"])


async def user_writes(client: Client, author: str, conv: str, **body: Any) -> str:
    resp = await client.post(f"/_sandbox/users/{author}/conversations/{conv}/messages", json=body)
    return str((await ok(resp, 201))["message_id"])


async def api_writes(
    client: Client, headers: dict[str, str], conv: str, key: str, **body: Any
) -> str:
    body.setdefault("sender", {"ref": ALICE, "display_name": "Alice Durand"})
    resp = await client.post(
        f"/api/v1/conversations/{conv}/messages",
        json=body,
        headers={**headers, "Idempotency-Key": key},
    )
    return str((await ok(resp, 201))["id"])


async def view(client: Client, idnps: str, conv: str) -> dict[str, Any]:
    resp = await client.get(f"/_sandbox/users/{idnps}/conversations/{conv}")
    return dict(await ok(resp, 200))


def by_id(conversation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["message_id"]: m for m in conversation["messages"]}


def block(i: int) -> bytes:
    """256 KiB of deterministic, incompressible-looking bytes."""
    return hashlib.sha256(i.to_bytes(8, "big")).digest() * 8192


async def generated(size: int, digest: Any) -> AsyncIterator[bytes]:
    """``size`` bytes produced chunk by chunk (never whole in memory), hashed as they go."""
    sent, i = 0, 0
    while sent < size:
        chunk = block(i)[: size - sent]
        digest.update(chunk)
        sent += len(chunk)
        i += 1
        yield chunk


async def download_digest(client: Client, url: str, headers: dict[str, str]) -> tuple[str, Any]:
    """The sha256 of a download read chunk by chunk, and the response."""
    digest = hashlib.sha256()
    async with client.session.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        async for chunk in resp.content.iter_chunked(256 * 1024):
            digest.update(chunk)
    return digest.hexdigest(), resp


# --- Files: user → bridge and bridge → user ---------------------------------------------------


async def test_user_file_reaches_the_bridge_by_url(sandbox: Client, receiver: Receiver) -> None:
    """A 20 MB file a user sends is announced with a URL the API client downloads, identical."""
    headers = await auth(sandbox)
    conv = await user_conversation(sandbox, CAMILLE, ALICE)
    sent = hashlib.sha256()
    size = 20 * MiB + 12345
    resp = await sandbox.post(
        f"/_sandbox/users/{CAMILLE}/files",
        data=generated(size, sent),
        headers={
            "Content-Type": "application/pdf",
            "X-Filename": "compte%20rendu%20%C3%A9t%C3%A9.pdf",
        },
    )
    uploaded = await ok(resp, 201)
    assert uploaded["name"] == "compte rendu été.pdf"
    assert (uploaded["mime_type"], uploaded["size"]) == ("application/pdf", size)
    message = await user_writes(sandbox, CAMILLE, conv, text="", file_id=uploaded["file_id"])

    _, event = await receiver.wait_for(2)
    assert event["type"] == "message.created"
    attachment = event["data"]["message"]["attachment"]
    assert event["data"]["message"]["id"] == message
    assert event["data"]["message"]["markdown"] == ""
    assert attachment == {
        "file_id": uploaded["file_id"],
        "name": "compte rendu été.pdf",
        "mime_type": "application/pdf",
        "size": size,
        "url": str(sandbox.make_url(f"/api/v1/files/{uploaded['file_id']}")),
    }
    got, resp = await download_digest(sandbox, attachment["url"], headers)
    assert got == sent.hexdigest()
    assert resp.headers["Content-Type"] == "application/pdf"
    assert resp.headers["Content-Length"] == str(size)
    assert resp.headers["Content-Disposition"] == (
        'attachment; filename="compte rendu _t_.pdf"; '
        "filename*=UTF-8''compte%20rendu%20%C3%A9t%C3%A9.pdf"
    )
    # The bearer token is needed; the user's own copy is the same file.
    assert (await sandbox.session.get(attachment["url"])).status == 401
    got, _ = await download_digest(
        sandbox, str(sandbox.make_url(f"/_sandbox/users/{CAMILLE}/files/{uploaded['file_id']}")), {}
    )
    assert got == sent.hexdigest()


async def test_bridge_file_reaches_the_user_streamed(sandbox: Client, tmp_path: Path) -> None:
    """The API client uploads 20 MB by upload URL; members download the same bytes. Neither
    side holds the file in memory."""
    headers = await auth(sandbox)
    conv = await api_conversation(sandbox, headers, CAMILLE, JULIEN)
    size = 20 * MiB
    body = {"name": "IRM genou.png", "mime_type": "image/png", "size": size}
    upload = {**headers, "Idempotency-Key": "upload-1"}
    created = await ok(await sandbox.post("/api/v1/uploads", json=body, headers=upload), 201)
    again = await ok(await sandbox.post("/api/v1/uploads", json=body, headers=upload), 200)
    assert again == created
    assert created["upload_url"] == str(sandbox.make_url(f"/api/v1/uploads/{created['file_id']}"))

    sent = hashlib.sha256()
    tracemalloc.start()
    try:
        resp = await sandbox.session.put(
            created["upload_url"], data=generated(size, sent), headers=headers
        )
        assert resp.status == 204, await resp.text()
        message = await api_writes(
            sandbox,
            headers,
            conv,
            "m-file",
            markdown="Voici l'IRM",
            attachment={"file_id": created["file_id"]},
        )
        url = str(sandbox.make_url(f"/_sandbox/users/{JULIEN}/files/{created['file_id']}"))
        got, resp = await download_digest(sandbox, url, {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == sent.hexdigest()
    assert peak < 8 * MiB, f"{peak} bytes traced: the file went through memory"
    assert resp.headers["Content-Type"] == "image/png"
    assert "filename*=UTF-8''IRM%20genou.png" in resp.headers["Content-Disposition"]

    [shown] = (await view(sandbox, JULIEN, conv))["messages"]
    assert shown["message_id"] == message
    assert shown["attachment"] == {
        "file_id": created["file_id"],
        "name": "IRM genou.png",
        "mime_type": "image/png",
        "size": size,
    }
    # Files live in the app's own directory, under their id only.
    directory = sandbox.app[KERNEL_KEY].files.directory
    assert directory.parent == tmp_path
    assert [p.name for p in directory.iterdir()] == [created["file_id"]]
    # The API client may read back its own upload; a non-member may not see it.
    api_url = str(sandbox.make_url(f"/api/v1/files/{created['file_id']}"))
    assert (await download_digest(sandbox, api_url, headers))[0] == sent.hexdigest()
    resp = await sandbox.get(f"/_sandbox/users/{SOPHIE}/files/{created['file_id']}")
    await refused(resp, 404, "file_not_found")


async def test_upload_refusals(sandbox: Client) -> None:
    headers = await auth(sandbox)
    body = {"name": "a.bin", "mime_type": "application/octet-stream", "size": 10}
    resp = await sandbox.post(
        "/api/v1/uploads", json={**body, "size": 512 * MiB + 1}, headers=headers
    )
    assert "512 MiB" in await refused(resp, 413, "file_too_large")
    resp = await sandbox.post("/api/v1/uploads", json={**body, "mime_type": "pdf"}, headers=headers)
    await refused(resp, 400, "invalid_request")
    resp = await sandbox.post("/api/v1/uploads", json={**body, "size": -1}, headers=headers)
    await refused(resp, 400, "invalid_request")

    created = await ok(await sandbox.post("/api/v1/uploads", json=body, headers=headers), 201)
    url = created["upload_url"]
    conv = await api_conversation(sandbox, headers, CAMILLE)
    # Not uploaded yet: it cannot be attached or downloaded.
    resp = await sandbox.post(
        f"/api/v1/conversations/{conv}/messages",
        json={"sender": {"ref": ALICE, "display_name": "A"}, "attachment": created},
        headers={**headers, "Idempotency-Key": "early"},
    )
    await refused(resp, 404, "file_not_found")
    resp = await sandbox.get(f"/api/v1/files/{created['file_id']}", headers=headers)
    await refused(resp, 404, "file_not_found")

    async def stream(data: bytes) -> AsyncIterator[bytes]:
        yield data  # chunked: no Content-Length, the size is checked while streaming

    for data in (b"x" * 11, b"x" * 9):
        resp = await sandbox.session.put(url, data=stream(data), headers=headers)
        await refused(resp, 400, "size_mismatch")
    resp = await sandbox.session.put(url, data=b"x" * 11, headers=headers)
    await refused(resp, 400, "size_mismatch")
    assert list(sandbox.app[KERNEL_KEY].files.directory.iterdir()) == []
    assert (await sandbox.session.put(url, data=b"0123456789", headers=headers)).status == 204
    resp = await sandbox.session.put(url, data=b"0123456789", headers=headers)
    await refused(resp, 409, "upload_conflict")
    resp = await sandbox.put("/api/v1/uploads/nope", data=b"x", headers=headers)
    await refused(resp, 404, "file_not_found")
    resp = await sandbox.put(f"/api/v1/uploads/{created['file_id']}", data=b"x")
    await refused(resp, 401, "invalid_token")


async def test_user_upload_limit_is_enforced_while_streaming(tmp_path: Path) -> None:
    app = create_app(max_file_bytes=MiB, files_dir=str(tmp_path))
    async with TestClient(TestServer(app)) as client:
        path = f"/_sandbox/users/{CAMILLE}/files"
        headers = {"Content-Type": "image/png", "X-Filename": "big.png"}
        resp = await client.post(path, data=generated(3 * MiB, hashlib.sha256()), headers=headers)
        assert "1 MiB" in await refused(resp, 413, "file_too_large")
        resp = await client.post(path, data=b"x" * (MiB + 1), headers=headers)
        await refused(resp, 413, "file_too_large")
        store = client.app[KERNEL_KEY].files.directory
        assert list(store.iterdir()) == []
        resp = await client.post(path, data=b"x", headers={"Content-Type": "image/png"})
        assert "X-Filename" in await refused(resp, 400, "invalid_request")
        resp = await client.post(path, data=b"x", headers={**headers, "Content-Type": "png"})
        await refused(resp, 400, "invalid_request")
        resp = await client.post(path, data=b"x", headers={**headers, "X-Filename": "%ff.png"})
        await refused(resp, 400, "invalid_request")
        resp = await client.post(
            path, data=b"x", headers={**headers, "X-Filename": "..%2F..%2Fetc%2Fpasswd%0D%0AX: y"}
        )
        stored = await ok(resp, 201)
        assert stored["name"] == ".._.._etc_passwdX: y"
        resp = await client.get(f"{path}/{stored['file_id']}")
        assert resp.headers["Content-Disposition"] == (
            'attachment; filename=".._.._etc_passwdX: y"; '
            "filename*=UTF-8''.._.._etc_passwdX%3A%20y"
        )
        assert (await resp.read()) == b"x"
    assert not store.exists()  # the app's cleanup removed its directory
    assert list(tmp_path.iterdir()) == []


# --- Rich messages from the API client ----------------------------------------------------------


async def test_api_message_fields_and_idempotent_actions(sandbox: Client) -> None:
    headers = await auth(sandbox)
    conv = await user_conversation(sandbox, CAMILLE, JULIEN, ALICE)
    question = await user_writes(sandbox, CAMILLE, conv, text="Des nouvelles ?")
    answer = await api_writes(
        sandbox,
        headers,
        conv,
        "a1",
        markdown="Oui @[Camille Martin](810000001916), voir",
        kind="notice",
        reply_to=question,
        mentions=[{"ref": CAMILLE, "display_name": "Camille Martin"}],
        location={"lat": 48.8566, "lon": 2.3522, "label": "Cabinet"},
    )
    shown = by_id(await view(sandbox, JULIEN, conv))[answer]
    assert shown == {
        "conversation_id": conv,
        "message_id": answer,
        "sender": ALICE,
        "sender_name": "Alice Durand",
        "text": "Oui @[Camille Martin](810000001916), voir",
        "ts": shown["ts"],
        "kind": "notice",
        "reply_to": question,
        "mentions": [CAMILLE],
        "attachment": None,
        "location": {"lat": 48.8566, "lon": 2.3522, "label": "Cabinet"},
        "edited": False,
        "deleted": False,
        "reactions": [],
    }
    located = await api_writes(sandbox, headers, conv, "a2", location={"lat": 0, "lon": 0})
    msg_path = f"/api/v1/conversations/{conv}/messages"

    # Edits: a repeated key does not apply twice.
    edit = {**headers, "Idempotency-Key": "e1"}
    first = await ok(
        await sandbox.patch(f"{msg_path}/{answer}", json={"markdown": "Corrigé"}, headers=edit),
        200,
    )
    again = await ok(
        await sandbox.patch(f"{msg_path}/{answer}", json={"markdown": "Encore"}, headers=edit),
        200,
    )
    assert first == again and first["id"] == answer and first["edited_at"].endswith("+00:00")
    shown = by_id(await view(sandbox, CAMILLE, conv))[answer]
    assert (shown["text"], shown["edited"], shown["mentions"]) == ("Corrigé", True, [])
    resp = await sandbox.patch(
        f"{msg_path}/{question}",
        json={"markdown": "x"},
        headers={**headers, "Idempotency-Key": "e2"},
    )
    await refused(resp, 403, "not_author")

    # Reactions: a repeated key or the same emoji again gives the same reaction.
    react = f"{msg_path}/{question}/reactions"
    thumbs = {"sender": {"ref": ALICE, "display_name": "Alice"}, "emoji": "👍"}
    r1 = await ok(
        await sandbox.post(react, json=thumbs, headers={**headers, "Idempotency-Key": "r1"}), 201
    )
    for key in ("r1", "r2"):
        r = await ok(
            await sandbox.post(react, json=thumbs, headers={**headers, "Idempotency-Key": key}),
            200,
        )
        assert r == r1
    heart = {"sender": {"ref": BOB, "display_name": "Bob"}, "emoji": "❤️"}
    r3 = await ok(
        await sandbox.post(react, json=heart, headers={**headers, "Idempotency-Key": "r3"}), 201
    )
    shown = by_id(await view(sandbox, CAMILLE, conv))[question]
    assert shown["reactions"] == [
        {"reaction_id": r1["id"], "sender": ALICE, "emoji": "👍"},
        {"reaction_id": r3["id"], "sender": BOB, "emoji": "❤️"},
    ]
    assert (await sandbox.delete(f"{react}/{r1['id']}", headers=headers)).status == 204
    assert (await sandbox.delete(f"{react}/{r1['id']}", headers=headers)).status == 204
    await refused(await sandbox.delete(f"{react}/nope", headers=headers), 404, "reaction_not_found")
    assert [
        r["emoji"] for r in by_id(await view(sandbox, CAMILLE, conv))[question]["reactions"]
    ] == ["❤️"]

    # Deletions are idempotent; a deleted message cannot be edited or reacted to.
    assert (await sandbox.delete(f"{msg_path}/{located}", headers=headers)).status == 204
    assert (await sandbox.delete(f"{msg_path}/{located}", headers=headers)).status == 204
    shown = by_id(await view(sandbox, JULIEN, conv))[located]
    assert (shown["deleted"], shown["text"], shown["location"]) == (True, "", None)
    resp = await sandbox.patch(
        f"{msg_path}/{located}",
        json={"markdown": "x"},
        headers={**headers, "Idempotency-Key": "e3"},
    )
    await refused(resp, 409, "message_deleted")
    resp = await sandbox.post(
        f"{msg_path}/{located}/reactions", json=thumbs, headers={**headers, "Idempotency-Key": "r4"}
    )
    await refused(resp, 409, "message_deleted")
    await refused(
        await sandbox.delete(f"{msg_path}/{question}", headers=headers), 403, "not_author"
    )

    # Read markers (never backwards), typing, delivery statuses shown to the author only.
    read = f"/api/v1/conversations/{conv}/read"
    alice = {"ref": ALICE, "display_name": "Alice"}
    for up_to in (answer, question):
        resp = await sandbox.post(read, json={"reader": alice, "up_to": up_to}, headers=headers)
        assert resp.status == 204
    typing = f"/api/v1/conversations/{conv}/typing"
    for who in (alice, {"ref": BOB, "display_name": "Bob"}):
        resp = await sandbox.post(typing, json={"who": who, "typing": True}, headers=headers)
        assert resp.status == 204
    conversation = await view(sandbox, CAMILLE, conv)
    assert conversation["read_up_to"] == {ALICE: answer}
    assert conversation["typing"] == [ALICE, BOB]
    await api_writes(sandbox, headers, conv, "a3", markdown="Fini")  # Alice stops typing
    resp = await sandbox.post(
        typing, json={"who": {"ref": BOB, "display_name": "B"}, "typing": False}, headers=headers
    )
    assert resp.status == 204
    assert (await view(sandbox, CAMILLE, conv))["typing"] == []

    delivery = f"{msg_path}/{question}/delivery"
    for status in ("delivered", "degraded"):
        resp = await sandbox.post(
            delivery, json={"status": status, "detail": f"{status} to Matrix"}, headers=headers
        )
        assert resp.status == 204
    mine = by_id(await view(sandbox, CAMILLE, conv))[question]
    assert mine["delivery"] == [
        {"status": "delivered", "detail": "delivered to Matrix"},
        {"status": "degraded", "detail": "degraded to Matrix"},
    ]
    assert "delivery" not in by_id(await view(sandbox, JULIEN, conv))[question]
    resp = await sandbox.post(
        f"{msg_path}/{answer}/delivery", json={"status": "failed"}, headers=headers
    )
    await refused(resp, 400, "invalid_request")
    resp = await sandbox.post(delivery, json={"status": "lost"}, headers=headers)
    await refused(resp, 400, "invalid_request")


async def test_api_message_refusals(sandbox: Client) -> None:
    headers = await auth(sandbox)
    conv = await api_conversation(sandbox, headers, CAMILLE)
    other = await api_conversation(sandbox, headers, JULIEN)
    elsewhere = await api_writes(sandbox, headers, other, "x", markdown="ailleurs")
    path = f"/api/v1/conversations/{conv}/messages"
    sender = {"ref": ALICE, "display_name": "Alice"}
    cases: list[tuple[Any, int, str]] = [
        ({"sender": sender}, 400, "invalid_request"),
        ({"sender": sender, "markdown": "  "}, 400, "invalid_request"),
        ({"sender": sender, "markdown": "x", "reply_to": "nope"}, 404, "message_not_found"),
        ({"sender": sender, "markdown": "x", "reply_to": elsewhere}, 404, "message_not_found"),
        ({"sender": sender, "markdown": "x", "kind": "shout"}, 400, "invalid_request"),
        ({"sender": sender, "location": {"lat": 91, "lon": 0}}, 400, "invalid_request"),
        ({"sender": sender, "location": {"lat": "1", "lon": 0}}, 400, "invalid_request"),
        ({"sender": sender, "attachment": {"file_id": "nope"}}, 404, "file_not_found"),
        ({"sender": sender, "markdown": "x", "mentions": [{"ref": "bad"}]}, 400, "invalid_request"),
        ({"sender": sender, "markdown": "é" * 40000}, 413, "text_too_large"),
    ]
    for i, (body, status, code) in enumerate(cases):
        resp = await sandbox.post(path, json=body, headers={**headers, "Idempotency-Key": f"k{i}"})
        await refused(resp, status, code)
    resp = await sandbox.post(
        path,
        data=b'{"sender": {"ref": "@a:b.c", "display_name": "\xff"}, "markdown": "x"}',
        headers={**headers, "Idempotency-Key": "utf8", "Content-Type": "application/json"},
    )
    assert "UTF-8" in await refused(resp, 400, "invalid_request")
    for method, suffix in (("PATCH", "/nope"), ("DELETE", "/nope"), ("POST", "/nope/delivery")):
        resp = await sandbox.request(
            method,
            path + suffix,
            json={"markdown": "x", "status": "failed"},
            headers={**headers, "Idempotency-Key": "z"},
        )
        await refused(resp, 404, "message_not_found")
    resp = await sandbox.post(
        f"/api/v1/conversations/{conv}/read",
        json={"reader": {"ref": CAMILLE, "display_name": "C"}, "up_to": elsewhere},
        headers=headers,
    )
    await refused(resp, 400, "invalid_request")  # a PandaLab user is not read through the API
    resp = await sandbox.post(
        f"/api/v1/conversations/{conv}/typing",
        json={"who": {"ref": ALICE, "display_name": "A"}, "typing": "yes"},
        headers=headers,
    )
    await refused(resp, 400, "invalid_request")


# --- User-side actions are pushed, API actions are not --------------------------------------------


async def test_user_actions_are_pushed_in_order_and_api_actions_are_not(
    sandbox: Client, receiver: Receiver
) -> None:
    headers = await auth(sandbox)
    conv = await user_conversation(sandbox, CAMILLE, JULIEN, ALICE)
    base = f"/_sandbox/users/{CAMILLE}/conversations/{conv}"
    api = f"/api/v1/conversations/{conv}"
    alice = {"ref": ALICE, "display_name": "Alice"}

    first = await user_writes(
        sandbox,
        CAMILLE,
        conv,
        text="Bonjour @Julien Bernard et @" + ALICE,
        mentions=[JULIEN, ALICE],
    )
    from_alice = await api_writes(sandbox, headers, conv, "k1", markdown="Bonjour", reply_to=first)
    assert (await sandbox.post(f"{base}/typing", json={"typing": True})).status == 204
    second = await user_writes(sandbox, CAMILLE, conv, text="Réponse", reply_to=from_alice)
    edited = await ok(
        await sandbox.patch(
            f"{base}/messages/{first}",
            json={"text": "Bonjour @Julien Bernard", "mentions": [JULIEN]},
        ),
        200,
    )
    reaction = await ok(
        await sandbox.post(f"{base}/messages/{from_alice}/reactions", json={"emoji": "👍"}), 201
    )
    again = await ok(
        await sandbox.post(f"{base}/messages/{from_alice}/reactions", json={"emoji": "👍"}), 200
    )
    assert again == reaction
    resp = await sandbox.delete(f"{base}/messages/{from_alice}/reactions/{reaction['reaction_id']}")
    assert resp.status == 204
    assert (await sandbox.post(f"{base}/read", json={"up_to": from_alice})).status == 204
    assert (await sandbox.post(f"{base}/read", json={"up_to": first})).status == 204  # backwards
    assert (await sandbox.delete(f"{base}/messages/{second}")).status == 204
    assert (await sandbox.delete(f"{base}/messages/{second}")).status == 204
    # Things the API client does: none of them comes back.
    await sandbox.post(f"{api}/typing", json={"who": alice, "typing": True}, headers=headers)
    await sandbox.post(f"{api}/read", json={"reader": alice, "up_to": first}, headers=headers)
    await sandbox.post(
        f"{api}/messages/{first}/reactions",
        json={"sender": alice, "emoji": "🎉"},
        headers={**headers, "Idempotency-Key": "r"},
    )
    await sandbox.patch(
        f"{api}/messages/{from_alice}",
        json={"markdown": "Bonjour !"},
        headers={**headers, "Idempotency-Key": "e"},
    )
    await sandbox.delete(f"{api}/messages/{from_alice}", headers=headers)
    assert (
        await sandbox.post(f"{base}/typing", json={"typing": False})
    ).status == 204  # not typing
    assert (await sandbox.post(f"{base}/typing", json={"typing": True})).status == 204
    assert (await sandbox.post(f"{base}/typing", json={"typing": False})).status == 204
    last = await user_writes(sandbox, CAMILLE, conv, text="Fin")

    events = await receiver.wait_for(13)
    assert [e["type"] for e in events] == [
        "conversation.created",
        "message.created",
        "conversation.typing",
        "conversation.typing",
        "message.created",
        "message.edited",
        "reaction.added",
        "reaction.removed",
        "conversation.read",
        "message.deleted",
        "conversation.typing",
        "conversation.typing",
        "message.created",
    ]
    data = [e["data"] for e in events]
    assert data[1]["message"] == {
        "id": first,
        "conversation_id": conv,
        "author": CAMILLE,
        "markdown": f"Bonjour @[Julien Bernard]({JULIEN}) et @[{ALICE}]({ALICE})",
        "created_at": data[1]["message"]["created_at"],
        "kind": "text",
        "reply_to": None,
        "mentions": [
            {"ref": JULIEN, "display_name": "Julien Bernard"},
            {"ref": ALICE, "display_name": ALICE},
        ],
        "attachment": None,
        "location": None,
    }
    assert [d["typing"]["typing"] for d in (data[2], data[3], data[10], data[11])] == [
        True,
        False,
        True,
        False,
    ]
    assert data[3]["typing"] == {
        "conversation_id": conv,
        "who": CAMILLE,
        "typing": False,
        "at": data[4]["message"]["created_at"],
    }
    assert (data[4]["message"]["id"], data[4]["message"]["reply_to"]) == (second, from_alice)
    assert data[5]["message"] == {
        "id": first,
        "conversation_id": conv,
        "author": CAMILLE,
        "markdown": f"Bonjour @[Julien Bernard]({JULIEN})",
        "mentions": [{"ref": JULIEN, "display_name": "Julien Bernard"}],
        "edited_at": edited["edited_at"],
    }
    added, removed = data[6]["reaction"], data[7]["reaction"]
    assert added == {
        "id": reaction["reaction_id"],
        "message_id": from_alice,
        "conversation_id": conv,
        "author": CAMILLE,
        "emoji": "👍",
        "created_at": added["created_at"],
    }
    assert removed == {**added, "created_at": removed["created_at"]}
    assert removed["created_at"] >= added["created_at"]
    assert data[8]["read"] == {
        "conversation_id": conv,
        "reader": CAMILLE,
        "up_to": from_alice,
        "at": data[8]["read"]["at"],
    }
    assert data[9]["message"] == {
        "id": second,
        "conversation_id": conv,
        "author": CAMILLE,
        "deleted_at": data[9]["message"]["deleted_at"],
    }
    assert data[12]["message"]["id"] == last
    assert len({e["id"] for e in events}) == 13

    # What Julien's app shows: edits, deletions, reactions, markers.
    conversation = await view(sandbox, JULIEN, conv)
    messages = by_id(conversation)
    assert (messages[first]["text"], messages[first]["edited"]) == ("Bonjour @Julien Bernard", True)
    assert (messages[second]["deleted"], messages[second]["text"]) == (True, "")
    assert (messages[from_alice]["deleted"], messages[from_alice]["reactions"]) == (True, [])
    assert [r["emoji"] for r in messages[first]["reactions"]] == ["🎉"]
    assert conversation["read_up_to"] == {CAMILLE: from_alice, ALICE: first}
    assert conversation["typing"] == [ALICE]
    inbox = (await ok(await sandbox.get(f"/_sandbox/users/{JULIEN}/inbox"), 200))["messages"]
    assert [m["message_id"] for m in inbox] == [first, from_alice, second, last]
    assert inbox[0]["mentions"] == [JULIEN]


async def test_user_side_refusals(sandbox: Client) -> None:
    headers = await auth(sandbox)
    conv = await user_conversation(sandbox, CAMILLE, JULIEN, ALICE)
    mine = await user_writes(sandbox, CAMILLE, conv, text="à moi")
    theirs = await api_writes(sandbox, headers, conv, "t", markdown="à Alice")
    julien = f"/_sandbox/users/{JULIEN}/conversations/{conv}"
    camille = f"/_sandbox/users/{CAMILLE}/conversations/{conv}"

    await refused(
        await sandbox.patch(f"{julien}/messages/{mine}", json={"text": "x"}), 403, "not_author"
    )
    await refused(
        await sandbox.patch(f"{camille}/messages/{theirs}", json={"text": "x"}), 403, "not_author"
    )
    await refused(await sandbox.delete(f"{julien}/messages/{mine}"), 403, "not_author")
    await refused(
        await sandbox.patch(f"{camille}/messages/nope", json={"text": "x"}),
        404,
        "message_not_found",
    )
    reaction = await ok(
        await sandbox.post(f"{camille}/messages/{theirs}/reactions", json={"emoji": "👍"}), 201
    )
    resp = await sandbox.delete(f"{julien}/messages/{theirs}/reactions/{reaction['reaction_id']}")
    await refused(resp, 403, "not_author")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"text": "x", "reply_to": "nope"}, 404, "message_not_found"),
        ({"text": ""}, 400, "invalid_request"),
        ({"text": "x", "file_id": "nope"}, 404, "file_not_found"),
        ({"text": "x", "mentions": ["not-a-ref"]}, 400, "invalid_request"),
        ({"location": {"lat": 0, "lon": 181}}, 400, "invalid_request"),
        ({"text": "a" * (64 * 1024 + 1)}, 413, "text_too_large"),
    ]
    for body, status, code in cases:
        await refused(await sandbox.post(f"{camille}/messages", json=body), status, code)
    resp = await sandbox.post(
        f"{camille}/messages",
        data=b'{"text": "\xe9"}',
        headers={"Content-Type": "application/json"},
    )
    assert "UTF-8" in await refused(resp, 400, "invalid_request")
    await refused(
        await sandbox.post(f"{camille}/read", json={"up_to": "nope"}), 404, "message_not_found"
    )
    await refused(
        await sandbox.post(f"{camille}/typing", json={"typing": 1}), 400, "invalid_request"
    )
    await refused(
        await sandbox.get(f"/_sandbox/users/{SOPHIE}/conversations/{conv}"), 403, "not_a_member"
    )
    await refused(
        await sandbox.get(f"/_sandbox/users/{CAMILLE}/conversations/nope"),
        404,
        "conversation_not_found",
    )
    assert (await sandbox.delete(f"{camille}/messages/{mine}")).status == 204
    await refused(
        await sandbox.patch(f"{camille}/messages/{mine}", json={"text": "x"}),
        409,
        "message_deleted",
    )
    await refused(
        await sandbox.post(f"{camille}/messages/{mine}/reactions", json={"emoji": "👍"}),
        409,
        "message_deleted",
    )
    await refused(
        await sandbox.post(f"{camille}/messages/{theirs}/reactions", json={"emoji": ""}),
        400,
        "invalid_request",
    )

    # Another user's upload is not visible until it is attached in a shared conversation.
    resp = await sandbox.post(
        f"/_sandbox/users/{SOPHIE}/files", data=b"%PDF", headers={"X-Filename": "s.pdf"}
    )
    sophies = (await ok(resp, 201))["file_id"]
    await refused(
        await sandbox.post(f"{camille}/messages", json={"file_id": sophies}), 404, "file_not_found"
    )
    await refused(
        await sandbox.get(f"/_sandbox/users/{CAMILLE}/files/{sophies}"), 404, "file_not_found"
    )
    await refused(
        await sandbox.get(f"/api/v1/files/{sophies}", headers=headers), 404, "file_not_found"
    )


async def test_nothing_private_is_logged(
    sandbox: Client, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    conv = await user_conversation(sandbox, CAMILLE, ALICE)
    resp = await sandbox.post(
        f"/_sandbox/users/{CAMILLE}/files",
        data=b"secret bytes",
        headers={"X-Filename": "dossier-patient-Dupont.pdf", "Content-Type": "application/pdf"},
    )
    file_id = (await ok(resp, 201))["file_id"]
    await user_writes(sandbox, CAMILLE, conv, text="Diagnostic confidentiel", file_id=file_id)
    await receiver.wait_for(2)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for private in ("Dupont", "confidentiel", "secret bytes", SECRET, CLIENT_SECRET):
        assert private not in logged


# --- Unit checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("rapport.pdf", "rapport.pdf"),
        ("../../etc/passwd", ".._.._etc_passwd"),
        ("a\r\nb\x00c\u202egpj.exe", "abcgpj.exe"),
        ("  ..  ", "file"),
        ("", "file"),
        ("é" * 300, "é" * 255),
    ],
)
def test_file_names_are_sanitised(given: str, expected: str) -> None:
    from connectors.sandbox.files import sanitize_name

    assert sanitize_name(given) == expected


def test_content_disposition_is_header_safe() -> None:
    from connectors.sandbox.files import content_disposition

    value = content_disposition('été "x"; y\\.pdf')
    assert value == (
        'attachment; filename="_t_ _x_; y_.pdf"; '
        "filename*=UTF-8''%C3%A9t%C3%A9%20%22x%22%3B%20y%5C.pdf"
    )
    assert value.isascii()
