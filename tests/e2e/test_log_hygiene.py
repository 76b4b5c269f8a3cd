"""Logs never hold message content, tokens or secrets: a full exchange, logged at DEBUG as JSON,
searched for everything it sent and every secret the bridge holds.

Every library's logger the bridge uses is turned up to DEBUG too (mautrix's request lines,
aiohttp, aiosqlite), more than an operator's ``logging.level: DEBUG`` does: what the handler
writes must stay clean even then. The logging pieces on their own: tests/unit/test_log_hygiene.py.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from bridge.devtools.stack import LocalStack
from bridge.logs import (
    setup_logging,
)

from e2e_helpers import app_users_of, counter, inbox_message, portal_of, unique
from helpers import wait_until
from matrix_user import connect

LOUD_PREFIXES = ("eimis", "mau", "mautrix", "aiohttp", "aiosqlite", "asyncpg", "asyncio")
SECRET_WORDS = ("secret", "key", "password", "token")
# The test's own Matrix client (matrix-nio) logs what it syncs: it is not the bridge.
NOT_THE_BRIDGE = ("nio", "peewee")


@pytest.fixture(scope="module")
def captured() -> Iterator[io.StringIO]:
    """Everything logged while the module runs, as the bridge's JSON handler writes it."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    buffer = io.StringIO()
    handler = setup_logging("DEBUG", json_format=True, stream=buffer)
    try:
        yield buffer
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        handler.close()


def turn_up_libraries() -> dict[str, int]:
    """Every already-made logger of the bridge and its libraries at DEBUG; their old levels."""
    saved = {}
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(LOUD_PREFIXES):
            logger = logging.getLogger(name)
            saved[name] = logger.level
            logger.setLevel(logging.DEBUG)
    return saved


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, captured: io.StringIO
) -> AsyncIterator[LocalStack]:
    # Encryption on (the bridge's devices, Olm and Megolm at work), portals plain by default:
    # the encrypted exchange has its own test.
    local = LocalStack(
        Path(tmp_path_factory.mktemp("hygiene")),
        log_level="DEBUG",
        encrypted=True,
        config_overrides={"encryption": {"enabled": True, "default": False}},
    )
    async with local:
        saved = turn_up_libraries()  # after start: the bridge pins some of them when it starts
        try:
            yield local
        finally:
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)


def secrets_of(value: Any, key: str = "") -> list[str]:
    """String values under secret-sounding keys, anywhere in a config tree."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in secrets_of(v, str(k))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in secrets_of(v, key)]
    if isinstance(value, str) and any(word in key.lower() for word in SECRET_WORDS):
        return [value]
    return []


@pytest.mark.e2e
async def test_a_full_exchange_logs_no_content_token_or_secret(
    stack: LocalStack, http: ClientSession, captured: io.StringIO
) -> None:
    n = next(counter)
    password = f"correct horse battery {n}"
    user_id, token = await stack.synapse.register_user(f"hygiene{n}", password)
    native = await connect(stack.synapse.url, user_id, token)
    sent: list[str] = []
    try:
        alice = (await app_users_of(stack, http, "pandalab"))[0]
        bob = (await app_users_of(stack, http, "medipeps"))[0]
        conversation = await alice.start_conversation([bob.idnps, native.user_id], unique("Hyg"))

        # Vendor -> vendor and vendor -> native.
        first = unique("CONTENTALPHA tension 14/9 chambre 7")
        sent.append(first)
        await alice.post(conversation, text=first)
        room_id = await portal_of(stack, "pandalab", conversation)
        await native.accept_invites(room_id, timeout=30)
        at_bob = await wait_until(
            lambda: inbox_message(bob, lambda m: m["text"] == first), 30, "Bob's copy"
        )
        await native.wait_for_message(room_id, lambda m: m.body == first, timeout=30)

        # Vendor -> vendor, the other way.
        second = unique("CONTENTBRAVO je passe voir le patient")
        sent.append(second)
        await bob.post(str(at_bob["conversation_id"]), text=second)
        await wait_until(
            lambda: inbox_message(alice, lambda m: m["text"] == second), 30, "Alice's copy"
        )

        # Native -> vendors: a text and a file.
        third = unique("CONTENTCHARLIE résultats normaux")
        sent.append(third)
        await native.send_text(room_id, third)
        await wait_until(
            lambda: inbox_message(alice, lambda m: m["text"] == third), 30, "the native text"
        )
        secret_bytes = f"%PDF-1.4 CONTENTDELTA-FILE-{n} compte rendu opératoire".encode()
        name = f"cr-CONTENTECHO-{n}.pdf"
        mxc = await native.upload(secret_bytes, "application/pdf", name)
        await native.send(
            room_id,
            "m.room.message",
            {
                "msgtype": "m.file",
                "body": name,
                "url": mxc,
                "info": {"mimetype": "application/pdf", "size": len(secret_bytes)},
            },
        )
        at_alice = await wait_until(
            lambda: inbox_message(alice, lambda m: (m.get("attachment") or {}).get("name") == name),
            30,
            "the native file at PandaLab",
        )
        assert await alice.download(at_alice["attachment"]["file_id"]) == secret_bytes
        # Vendor -> Matrix, a file.
        vendor_bytes = f"%PDF-1.4 CONTENTFOXTROT-{n}".encode()
        vendor_name = f"ecg-CONTENTGOLF-{n}.pdf"
        file_id = await alice.upload(vendor_bytes, "application/pdf", vendor_name)
        await alice.post(conversation, text="", file_id=file_id)
        await native.wait_for_message(room_id, lambda m: m.body == vendor_name, timeout=30)
    finally:
        await native.close()

    registration = stack.registration
    forbidden = {
        **{f"message {i}": text for i, text in enumerate(sent)},
        "file content": f"CONTENTDELTA-FILE-{n}",
        "file name": f"CONTENTECHO-{n}",
        "vendor file content": f"CONTENTFOXTROT-{n}",
        "vendor file name": f"CONTENTGOLF-{n}",
        "as_token": registration["as_token"],
        "hs_token": registration["hs_token"],
        "native password": password,
        "native access token": token,
        **crypto_secrets(stack),
        **{
            f"connector secret {i}": secret
            for i, secret in enumerate(secrets_of(stack.raw_config["connectors"]))
        },
    }
    records = [json.loads(line) for line in captured.getvalue().splitlines() if line.strip()]
    bridge_records = [r for r in records if not str(r["logger"]).startswith(NOT_THE_BRIDGE)]
    assert len(bridge_records) > 50, "the run must have logged plenty at DEBUG"
    loggers = {r["logger"] for r in bridge_records}
    assert any(name.startswith("eimis.matrix.api") for name in loggers), "request lines on"
    assert any(
        name.startswith("eimis.connector") or name.startswith("eimis.delivery") for name in loggers
    )

    leaks = [
        (what, record)
        for record in bridge_records
        for what, secret in forbidden.items()
        if secret and secret in json.dumps(record, ensure_ascii=False)
    ]
    assert not leaks, f"{len(leaks)} leak(s), first: {leaks[0]}"
    for word in ("Bearer ", "access_token="):
        assert not [r for r in bridge_records if word in json.dumps(r)], word

    # Records carry their context: the item, the connector, the room, the transaction.
    assert any({"outbox", "connector", "room"} <= set(r) for r in bridge_records)
    assert any({"inbox", "connector", "conversation"} <= set(r) for r in bridge_records)
    assert any({"txn", "request", "path"} <= set(r) for r in bridge_records)


def crypto_secrets(stack: LocalStack) -> dict[str, str]:
    """The secrets key and the crypto pickle key, in the encodings they could leak in."""
    assert stack.bridge is not None and stack.bridge.crypto is not None
    raw = stack.bridge.crypto.devices.pickle_key.raw
    return {
        "secrets key": (stack.state_dir / "secrets.key").read_text().strip(),
        "pickle key": base64.b64encode(raw).decode(),
        "pickle key (hex)": raw.hex(),
    }


@pytest.mark.e2e
async def test_an_encrypted_exchange_logs_no_content_or_key(
    stack: LocalStack, http: ClientSession, captured: io.StringIO, tmp_path: Path
) -> None:
    n = next(counter)
    user_id, token = await stack.synapse.register_user(f"hygienic{n}", "correct horse battery")
    native = await connect(
        stack.synapse.url, user_id, token, encrypted=True, store_dir=tmp_path / "native"
    )
    start = len(captured.getvalue())
    alice = (await app_users_of(stack, http, "pandalab"))[1]
    ghost = f"@eimis_pandalab_{alice.idnps}:{stack.synapse.server_name}"
    sent = [unique("CONTENTHOTEL glycémie 2,1 g/l"), unique("CONTENTINDIA à jeun")]
    try:
        room_id = await native.create_room(invite=[ghost], is_direct=True, encrypted=True)
        await native.wait_for_join(room_id, ghost, timeout=30)
        await native.send_text(room_id, sent[0])
        at_alice = await wait_until(
            lambda: inbox_message(alice, lambda m: m["text"] == sent[0]),
            30,
            "the encrypted text at PandaLab",
        )
        await alice.post(str(at_alice["conversation_id"]), text=sent[1])
        got = await native.wait_for_message(room_id, lambda m: m.body == sent[1], timeout=30)
        assert got.decrypted
    finally:
        await native.close()
    records = [
        json.loads(line) for line in captured.getvalue()[start:].splitlines() if line.strip()
    ]
    bridge_records = [r for r in records if not str(r["logger"]).startswith(NOT_THE_BRIDGE)]
    # The bridge's own key traffic went through the logged client (request lines, no bodies).
    assert any("sendToDevice" in json.dumps(r) for r in bridge_records), "crypto at work"
    forbidden = {**{f"message {i}": t for i, t in enumerate(sent)}, **crypto_secrets(stack)}
    leaks = [
        (what, record)
        for record in bridge_records
        for what, secret in forbidden.items()
        if secret in json.dumps(record, ensure_ascii=False)
    ]
    assert not leaks, f"{len(leaks)} leak(s), first: {leaks[0]}"
