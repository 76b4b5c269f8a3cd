"""End to end through a real Synapse: vendor users and native Matrix users talk, once, in order."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession

from bridge.devtools.demo import SandboxUser
from bridge.devtools.stack import LocalStack

from e2e_helpers import (
    conversation_titled,
    counter,
    inbox_texts,
    portal_of,
    received,
    unique,
    users_of,
)
from helpers import wait_until
from matrix_user import MatrixUser, connect, text_is

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with LocalStack(Path(tmp_path_factory.mktemp("stack"))) as local:
        yield local


@pytest.fixture
async def native(stack: LocalStack) -> AsyncIterator[MatrixUser]:
    localpart = f"native{next(counter)}"
    user_id, token = await stack.synapse.register_user(localpart, "correct horse battery")
    user = await connect(stack.synapse.url, user_id, token)
    try:
        yield user
    finally:
        await user.close()


async def test_pandalab_user_reaches_medipeps_user_and_back(
    stack: LocalStack, http: ClientSession
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[0]
    bob = (await users_of(stack, http, "medipeps"))[0]
    title = unique("PandaLab to Medipeps")
    conversation = await alice.start_conversation([bob.idnps], title)
    first = unique("Bonjour, besoin d'un avis pour la chambre 4")
    await alice.send(conversation, first)

    seen = await wait_until(lambda: received(bob, first), 30, "Bob to receive Alice's message")
    assert seen["sender"] == alice.idnps
    assert seen["sender_name"].startswith(alice.bridged_name) and " - " in seen["sender_name"]

    bob_conversation = await wait_until(
        lambda: conversation_titled(bob, title), 30, "Bob's side of the conversation"
    )
    reply = unique("Je passe dans 10 minutes")
    await bob.send(bob_conversation, reply)
    answer = await wait_until(lambda: received(alice, reply), 30, "Alice to receive Bob's reply")
    assert answer["sender"] == bob.idnps
    assert answer["conversation_id"] == conversation


async def test_medipeps_user_reaches_pandalab_user_and_back(
    stack: LocalStack, http: ClientSession
) -> None:
    bob = (await users_of(stack, http, "medipeps"))[1]
    alice = (await users_of(stack, http, "pandalab"))[1]
    title = unique("Medipeps to PandaLab")
    conversation = await bob.start_conversation([alice.idnps], title)
    texts = [unique(f"Message {i} de Medipeps") for i in range(5)]
    for text in texts:
        await bob.send(conversation, text)

    async def all_arrived() -> list[str] | None:
        mine = [t for t in await inbox_texts(alice) if t in texts]
        return mine if len(mine) == len(texts) else None

    arrived = await wait_until(all_arrived, 30, "all five messages at PandaLab")
    assert arrived == texts, "messages must arrive once each, in the order they were written"

    alice_conversation = await wait_until(
        lambda: conversation_titled(alice, title), 90, "Alice's side"
    )
    reply = unique("Bien reçu")
    await alice.send(alice_conversation, reply)
    answer = await wait_until(lambda: received(bob, reply), 30, "Bob to receive the reply")
    assert answer["sender"] == alice.idnps


async def test_vendor_user_and_native_matrix_user_talk(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[2]
    title = unique("PandaLab and Matrix")
    conversation = await alice.start_conversation([native.user_id], title)
    hello = unique("Bonjour depuis PandaLab")
    await alice.send(conversation, hello)

    room_id = await portal_of(stack, "pandalab", conversation)
    await native.accept_invites(room_id, timeout=30)
    message = await native.wait_for_message(room_id, text_is(hello), timeout=30)
    ghost = f"@eimis_pandalab_{alice.idnps}:{stack.synapse.server_name}"
    assert message.sender == ghost
    profile = await native.client.get_displayname(ghost)
    assert profile.displayname.startswith(alice.bridged_name + " - ")

    reply = unique("Bonjour depuis Matrix")
    await native.send_text(room_id, reply)
    answer = await wait_until(
        lambda: received(alice, reply), 30, "Alice to receive the Matrix reply"
    )
    assert answer["sender"] == native.user_id


async def test_native_user_inviting_a_ghost_opens_a_vendor_conversation(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    bob = (await users_of(stack, http, "medipeps"))[2]
    ghost = f"@eimis_medipeps_{bob.idnps}:{stack.synapse.server_name}"
    room_id = await native.create_dm(ghost)
    text = unique("Question posée depuis Matrix")
    await native.send_text(room_id, text)

    message = await wait_until(lambda: received(bob, text), 30, "Bob to receive the Matrix message")
    assert message["sender"] == native.user_id
    reply = unique("Réponse depuis Medipeps")
    await bob.send(message["conversation_id"], reply)
    seen = await native.wait_for_message(room_id, text_is(reply), timeout=30)
    assert seen.sender == ghost


async def test_invite_to_a_ghost_of_an_unknown_professional_is_refused(
    stack: LocalStack, native: MatrixUser
) -> None:
    # Luhn-valid, but no sandbox has this professional: the homeserver asks the bridge, which
    # says the user does not exist, so no ghost and no portal are created.
    ghost = f"@eimis_pandalab_810000000009:{stack.synapse.server_name}"
    response = await native.client.room_create(invite=[ghost], is_direct=True)
    assert stack.bridge is not None
    if hasattr(response, "room_id"):
        assert await stack.bridge.stores.portals.get(response.room_id) is None
    assert await stack.bridge.stores.ghosts.get(ghost) is None


async def test_messages_of_a_connectors_ghost_are_not_echoed_back_to_it(
    stack: LocalStack, http: ClientSession
) -> None:
    pandalab = await users_of(stack, http, "pandalab")
    alice, carol = pandalab[3], pandalab[4]
    bob = (await users_of(stack, http, "medipeps"))[3]
    title = unique("Echo check")
    conversation = await alice.start_conversation([carol.idnps, bob.idnps], title)
    text = unique("Un seul exemplaire, s'il vous plaît")
    await alice.send(conversation, text)
    await wait_until(lambda: received(bob, text), 30, "Bob to receive it")

    # A later message from Bob proves the bridge has handled everything before it in the room.
    bob_conversation = await wait_until(lambda: conversation_titled(bob, title), 90, "Bob's side")
    sentinel = unique("Sentinelle")
    await bob.send(bob_conversation, sentinel)
    await wait_until(lambda: received(carol, sentinel), 30, "the sentinel at Carol's")

    assert (await inbox_texts(carol)).count(text) == 1, "Carol saw Alice's message twice"
    assert (await inbox_texts(bob)).count(text) == 1
    assert sentinel not in await inbox_texts(bob), "Bob's own message came back to him"
    assert len([c for c in await alice.conversations() if c.get("title") == title]) == 1


async def test_bad_hs_token_is_refused_and_nothing_is_stored(
    stack: LocalStack, http: ClientSession
) -> None:
    assert stack.bridge is not None
    before = await stack.bridge.db.fetchval("SELECT COUNT(*) FROM inbox")
    event = {
        "event_id": "$forged",
        "room_id": "!r:x",
        "type": "m.room.message",
        "sender": "@mallory:evil.example",
        "content": {"msgtype": "m.text", "body": "x"},
    }
    url = f"{stack.bridge_url}/_matrix/app/v1/transactions/forged-1"
    async with http.put(
        url, json={"events": [event]}, headers={"Authorization": "Bearer not-the-token"}
    ) as resp:
        assert resp.status == 403
        assert (await resp.json())["errcode"] == "M_FORBIDDEN"
    async with http.put(url, json={"events": [event]}) as resp:
        assert resp.status == 401
    token = stack.registration["hs_token"]
    async with http.put(f"{url}?access_token={token}", json={"events": [event]}) as resp:
        assert resp.status == 401, "a token in the query string must not be accepted"
    assert await stack.bridge.db.fetchval("SELECT COUNT(*) FROM inbox") == before


async def _open_portal_with_native(
    stack: LocalStack, http: ClientSession, native: MatrixUser, bob: SandboxUser
) -> tuple[str, str]:
    """A DM between the native user and a Medipeps user; returns (room id, conversation id)."""
    ghost = f"@eimis_medipeps_{bob.idnps}:{stack.synapse.server_name}"
    room_id = await native.create_dm(ghost)
    opener = unique("Ouverture")
    await native.send_text(room_id, opener)
    message = await wait_until(lambda: received(bob, opener), 30, "the opener at Medipeps")
    return room_id, str(message["conversation_id"])


async def test_replayed_transaction_is_processed_once_also_after_restart(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    bob = (await users_of(stack, http, "medipeps"))[4]
    room_id, _ = await _open_portal_with_native(stack, http, native, bob)
    text = unique("Transaction rejouée")
    event = {
        "event_id": f"$replayed-{next(counter)}",
        "room_id": room_id,
        "type": "m.room.message",
        "sender": native.user_id,
        "origin_server_ts": 1_700_000_000_000,
        "content": {"msgtype": "m.text", "body": text},
    }
    txn_url = f"{stack.bridge_url}/_matrix/app/v1/transactions/replay-{next(counter)}"
    headers = {"Authorization": f"Bearer {stack.registration['hs_token']}"}

    async def put() -> None:
        async with http.put(txn_url, data=json.dumps({"events": [event]}), headers=headers) as resp:
            assert resp.status == 200

    await put()
    await wait_until(lambda: received(bob, text), 30, "the replayed message at Medipeps")
    await put()
    await stack.stop_bridge()
    await stack.start_bridge()
    await put()

    sentinel = unique("Après le rejeu")
    await native.send_text(room_id, sentinel)
    await wait_until(lambda: received(bob, sentinel), 30, "the sentinel at Medipeps")
    assert (await inbox_texts(bob)).count(text) == 1


async def test_restart_between_ack_and_processing_loses_nothing(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    bob = (await users_of(stack, http, "medipeps"))[0]
    room_id, bob_conversation = await _open_portal_with_native(stack, http, native, bob)

    # The bridge acknowledges and stores, but dies before processing anything.
    await stack.stop_bridge()
    bridge = await stack.start_bridge(paused=True)
    from_matrix = unique("Écrit pendant la panne, côté Matrix")
    await native.send_text(room_id, from_matrix)
    from_vendor = unique("Écrit pendant la panne, côté Medipeps")
    await bob.send(bob_conversation, from_vendor)

    async def both_stored() -> bool:
        rows = await bridge.db.fetch("SELECT payload FROM inbox WHERE state = 'pending'")
        payloads = " ".join(r["payload"] or "" for r in rows)
        return (
            json.dumps(from_matrix)[1:-1] in payloads and json.dumps(from_vendor)[1:-1] in payloads
        )

    await wait_until(both_stored, 30, "both messages acknowledged and stored")
    assert await received(bob, from_matrix) is None
    await stack.stop_bridge()  # the crash: acknowledged, stored, not processed

    await stack.start_bridge()
    await wait_until(
        lambda: received(bob, from_matrix), 30, "the Matrix message at Medipeps after restart"
    )
    await native.wait_for_message(room_id, text_is(from_vendor), timeout=30)
    assert (await inbox_texts(bob)).count(from_matrix) == 1


async def test_message_content_and_tokens_never_reach_the_logs(
    stack: LocalStack, http: ClientSession, native: MatrixUser, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    alice = (await users_of(stack, http, "pandalab"))[1]
    title = unique("Logs check")
    conversation = await alice.start_conversation([native.user_id], title)
    secret_text = unique("Contenu clinique confidentiel")
    await alice.send(conversation, secret_text)
    room_id = await portal_of(stack, "pandalab", conversation)
    await native.accept_invites(room_id, timeout=30)
    await native.wait_for_message(room_id, text_is(secret_text), timeout=30)
    reply = unique("Réponse confidentielle")
    await native.send_text(room_id, reply)
    await wait_until(lambda: received(alice, reply), 30, "the reply at PandaLab")

    logged = "\n".join(
        record.getMessage() + " " + str(record.__dict__.get("matrix_http_request", ""))
        for record in caplog.records
        if not record.name.startswith("nio")  # the test's own Matrix client, not the bridge
    )
    assert any(r.name.startswith("eimis") for r in caplog.records), "no bridge logs captured"
    for forbidden in (
        secret_text,
        reply,
        title,
        stack.registration["as_token"],
        stack.registration["hs_token"],
    ):
        assert forbidden not in logged
