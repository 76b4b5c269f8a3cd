"""End to end through a real Synapse, in encrypted rooms: the bridge decrypts what native users
send before a vendor gets it, encrypts what vendors send before the homeserver sees it, and each
ghost speaks from its own device, cross-signed by its own identity.

The native users are matrix-nio with encryption on (vodozemac underneath); the homeserver's own
database is read to show it holds ciphertext only.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import vodozemac
from aiohttp import ClientSession
from canonicaljson import encode_canonical_json
from nio import ErrorResponse, RoomEncryptedMedia

from bridge.devtools.stack import LocalStack

from e2e_helpers import (
    NATIVE_PASSWORD,
    PNG,
    app_users_of,
    counter,
    encrypted_native,
    file_named,
    inbox_message,
    portal_of,
    received,
    unique,
    users_of,
    vendor_copy,
    vendor_dm,
)
from helpers import wait_until
from matrix_user import MatrixUser, login, text_is
from synapse_db import event_types_in_room, room_holds_text

pytestmark = pytest.mark.e2e

KEY_WAIT_S = 8  # long enough for a slow machine, short for the test that waits it out


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    overrides = {
        "encryption": {"enabled": True, "default": True, "key_wait_s": KEY_WAIT_S},
        "delivery": {"success_statuses": True},
    }
    async with LocalStack(
        Path(tmp_path_factory.mktemp("encrypted")), encrypted=True, config_overrides=overrides
    ) as local:
        yield local


@pytest.fixture
async def native(stack: LocalStack, tmp_path: Path) -> AsyncIterator[MatrixUser]:
    async with await encrypted_native(stack, tmp_path, "enc") as user:
        yield user


def ghost_of(stack: LocalStack, connector: str, idnps: str) -> str:
    return f"@eimis_{connector}_{idnps}:{stack.synapse.server_name}"


def assert_only_ciphertext(stack: LocalStack, room_id: str, *texts: str) -> None:
    """The homeserver's database holds the room's messages as m.room.encrypted only."""
    types = event_types_in_room(stack.synapse, room_id)
    assert "m.room.encrypted" in types
    assert "m.room.message" not in types and "m.reaction" not in types
    for text in texts:
        assert not room_holds_text(stack.synapse, room_id, text), "plaintext on the homeserver"


async def test_vendor_and_native_user_talk_in_an_encrypted_dm(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[0]
    conversation = await alice.start_conversation([native.user_id], unique("Chiffré"))
    hello = unique("Bonjour, message chiffré depuis PandaLab")
    await alice.send(conversation, hello)

    room_id = await portal_of(stack, "pandalab", conversation)
    await native.accept_invites(room_id, timeout=30)
    message = await native.wait_for_message(room_id, text_is(hello), timeout=30)
    assert message.sender == ghost_of(stack, "pandalab", alice.idnps)

    replies = [unique(f"Réponse chiffrée {i}") for i in range(3)]
    for reply in replies:
        await native.send_text(room_id, reply)
    for reply in replies:
        answer = await wait_until(
            lambda r=reply: received(alice, r), 90, "Alice to get the Matrix reply"
        )
        assert answer["sender"] == native.user_id
    texts = [m["text"] for m in await alice.inbox() if m["text"] in replies]
    assert texts == replies, "once each, in order"
    assert_only_ciphertext(stack, room_id, hello, *replies)

    # Operators see it in the metrics.
    assert stack.bridge is not None and stack.bridge.metrics.port
    async with http.get(f"http://127.0.0.1:{stack.bridge.metrics.port}/metrics") as resp:
        scraped = await resp.text()
    for outcome in ("decrypted", "encrypted", "room_keys"):
        line = f'eimis_encryption_events_total{{outcome="{outcome}"}}'
        [value] = [float(x.split()[-1]) for x in scraped.splitlines() if x.startswith(line)]
        assert value >= 1, outcome


async def test_the_ghost_speaks_from_its_own_cross_signed_device(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[1]
    hello = unique("Qui parle ?")
    _, room_id = await vendor_dm(stack, alice, "pandalab", native, hello)
    message = await native.wait_for_message(room_id, text_is(hello), timeout=30)
    assert message.decrypted, "the bridge sent it encrypted"

    ghost = ghost_of(stack, "pandalab", alice.idnps)
    keys = await native.device_keys_of(ghost)
    # The device that encrypted it: the one whose identity key sent the room key.
    [device_id] = [
        d
        for d, k in keys["device_keys"].items()
        if k["keys"][f"curve25519:{d}"] == message.sender_key
    ]
    device = keys["device_keys"][device_id]
    master = keys["master_keys"]
    self_signing = keys["self_signing_keys"]
    # Checked here with vodozemac and canonicaljson, not with the bridge's own code.
    master_key = single_key(master)
    ssk = single_key(self_signing)
    assert master["usage"] == ["master"] and self_signing["usage"] == ["self_signing"]
    assert signed_by(master, ghost, master_key), "master key self-signed"
    assert signed_by(self_signing, ghost, master_key), "self-signing key signed by master"
    assert signed_by(device, ghost, ssk), "the ghost's device signed by its self-signing key"
    device_ed = device["keys"][f"ed25519:{device_id}"]
    assert signed_by(device, ghost, device_ed, key_id=device_id), "device keys self-signed"
    # Its own device, not the bot's: one identity per professional.
    bot = f"@eimis_bot:{stack.synapse.server_name}"
    bot_devices = (await native.device_keys_of(bot))["device_keys"]
    assert device_id not in bot_devices


def single_key(cross_signing_key: dict[str, Any]) -> str:
    [(key_id, value)] = cross_signing_key["keys"].items()
    assert key_id == f"ed25519:{value}"
    return str(value)


def signed_by(obj: dict[str, Any], user_id: str, public: str, *, key_id: str | None = None) -> bool:
    signature = obj.get("signatures", {}).get(user_id, {}).get(f"ed25519:{key_id or public}")
    if signature is None:
        return False
    message = encode_canonical_json(
        {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
    )
    try:
        vodozemac.Ed25519PublicKey.from_base64(public).verify_signature(
            message, vodozemac.Ed25519Signature.from_base64(signature)
        )
    except vodozemac.SignatureException:
        return False
    return True


async def test_a_group_with_two_vendors_and_files_both_ways(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    paul = (await app_users_of(stack, http, "pandalab"))[2]
    bob = (await users_of(stack, http, "medipeps"))[2]
    title = unique("Groupe chiffré")
    paul_conv = await paul.start_conversation([bob.idnps, native.user_id], title)
    hello = unique("Bonjour à tous")
    await paul.post(paul_conv, text=hello)
    room_id = await portal_of(stack, "pandalab", paul_conv)
    await native.accept_invites(room_id, timeout=30)
    await native.wait_for_message(room_id, text_is(hello), timeout=30)
    await wait_until(lambda: received(bob, hello), 90, "Bob to get Paul's message")

    # Native -> vendors: an encrypted file, decrypted by the bridge on its way.
    name = f"ecg-{next(counter)}.pdf"
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 400
    await native.send_file(room_id, pdf, name, "application/pdf")
    at_paul = await vendor_copy(paul, file_named(name))
    assert await paul.download(at_paul["attachment"]["file_id"]) == pdf

    # Vendor -> native: the bridge encrypts the file before the homeserver gets it.
    photo = f"plaie-{next(counter)}.png"
    file_id = await paul.upload(PNG, "image/png", photo)
    await paul.post(paul_conv, text="", file_id=file_id)
    event = await native.wait_for_message(room_id, lambda e: e.body == photo, timeout=30)
    assert isinstance(event, RoomEncryptedMedia), "sent as an encrypted file"
    assert await native.download_file(event) == PNG
    assert not room_holds_text(stack.synapse, room_id, photo), "file name in clear"
    assert_only_ciphertext(stack, room_id, hello, name)


async def test_nothing_is_lost_across_a_bridge_restart(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[3]
    before = unique("Avant le redémarrage")
    conversation, room_id = await vendor_dm(stack, alice, "pandalab", native, before)

    await stack.stop_bridge()
    while_down = unique("Pendant que le pont est arrêté")
    await native.send_text(room_id, while_down)  # its room key waits at the homeserver too
    await stack.start_bridge()
    await wait_until(
        lambda: received(alice, while_down), 90, "Alice to get the message sent while down"
    )
    # Synapse replays what the bridge missed without its to-device messages (catch-up
    # transactions carry room events only): the room key came from the ghost's device inbox.
    assert stack.bridge is not None and stack.bridge.crypto is not None
    assert stack.bridge.crypto.caught_up_messages >= 1

    after = unique("Après le redémarrage")
    await alice.send(conversation, after)  # sessions restored from the database
    await native.wait_for_message(room_id, text_is(after), timeout=30)
    assert_only_ciphertext(stack, room_id, before, while_down, after)


async def test_a_second_device_reads_the_history_it_is_entitled_to(
    stack: LocalStack, http: ClientSession, native: MatrixUser, tmp_path: Path
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[4]
    conversation = await alice.start_conversation([native.user_id], unique("Deux appareils"))
    history = [unique(f"Historique {i}") for i in range(2)]
    for text in history:
        await alice.send(conversation, text)
    room_id = await portal_of(stack, "pandalab", conversation)
    await native.accept_invites(room_id, timeout=30)
    for text in history:
        await native.wait_for_message(room_id, text_is(text), timeout=30)

    second = await login(
        stack.synapse.url,
        native.user_id,
        NATIVE_PASSWORD,
        encrypted=True,
        store_dir=tmp_path / "second",
    )
    try:
        # The bridge hears of the new device and gives it the ghost's sessions of this room.
        for text in history:
            await second.wait_for_message(room_id, text_is(text), timeout=30)
    finally:
        await second.close()


async def test_an_event_that_never_decrypts_is_reported_and_nothing_garbled_is_sent(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[0]
    _, room_id = await vendor_dm(stack, alice, "pandalab", native, unique("Bonjour"))

    undecryptable_before = stack.bridge.crypto.counts()["undecryptable"]  # type: ignore[union-attr]
    # An encrypted event whose room key nobody ever shares (a client bug, a lost key).
    orphan = vodozemac.GroupSession()
    content = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "sender_key": base64.b64encode(bytes(32)).decode().rstrip("="),
        "ciphertext": orphan.encrypt(b'{"type":"m.room.message"}').to_base64(),
        "session_id": orphan.session_id,
        "device_id": native.device_id,
    }
    # Sent as is (nio would encrypt it again): a plain client-server PUT.
    url = (
        f"{stack.synapse.url}/_matrix/client/v3/rooms/{room_id}/send/m.room.encrypted/"
        f"orphan{next(counter)}"
    )
    headers = {"Authorization": f"Bearer {native.client.access_token}"}
    async with http.put(url, json=content, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        lost = str((await resp.json())["event_id"])

    def failed_status(event: dict[str, Any]) -> bool:
        content = event.get("content", {})
        return (
            event.get("type") == "com.beeper.message_send_status"
            and content.get("m.relates_to", {}).get("event_id") == lost
            and content.get("status") == "FAIL_PERMANENT"
        )

    status = await native.wait_for_event(room_id, failed_status, KEY_WAIT_S + 30)
    assert stack.bridge.crypto.counts()["undecryptable"] > undecryptable_before  # type: ignore[union-attr]
    assert "déchiffrer" in status["content"]["message"]
    notice = await native.wait_for_message(
        room_id, lambda e: "n'a pas pu le déchiffrer" in e.body, timeout=30
    )
    assert notice.sender == f"@eimis_bot:{stack.synapse.server_name}"  # the portal's voice
    assert notice.decrypted, "the notice is encrypted too"
    later = unique("Et ensuite")
    await native.send_text(room_id, later)  # the conversation goes on
    await wait_until(lambda: received(alice, later), 90, "the next message at PandaLab")
    assert (
        await inbox_message(
            alice, lambda m: m["text"] not in (later,) and m["sender"] == native.user_id
        )
        is None
    )


async def test_a_native_user_turning_encryption_on_is_followed(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[1]
    ghost = ghost_of(stack, "pandalab", alice.idnps)
    room_id = await native.create_room(invite=[ghost], is_direct=True)
    await native.wait_for_join(room_id, ghost, timeout=30)
    plain = unique("En clair d'abord")
    await native.send_text(room_id, plain)
    await wait_until(lambda: received(alice, plain), 90, "Alice to get the plain message")

    resp = await native.client.room_put_state(
        room_id, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"}
    )
    assert not isinstance(resp, ErrorResponse), resp
    await native.wait_until_encrypted(room_id)  # as a client does before its next message
    secret = unique("Chiffré ensuite")
    await native.send_text(room_id, secret)
    await wait_until(lambda: received(alice, secret), 90, "Alice to get the encrypted message")
    conversation = await wait_until(
        lambda: _conversation_with(alice, native), 90, "Alice's conversation"
    )
    answer = unique("Réponse chiffrée")
    await alice.send(conversation, answer)
    received_answer = await native.wait_for_message(room_id, text_is(answer), timeout=30)
    assert received_answer.decrypted, "the ghost encrypts once the room is encrypted"
    assert not room_holds_text(stack.synapse, room_id, secret)
    assert not room_holds_text(stack.synapse, room_id, answer)


async def _conversation_with(user: Any, native: MatrixUser) -> str | None:
    for conversation in await user.conversations():
        if native.user_id in str(conversation):
            return str(conversation["conversation_id"])
    return None


async def test_medipeps_user_and_native_user_talk_in_an_encrypted_dm(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    nora = (await users_of(stack, http, "medipeps"))[3]
    hello = unique("Bonjour depuis Medipeps")
    _, room_id = await vendor_dm(stack, nora, "medipeps", native, hello)
    message = await native.wait_for_message(room_id, text_is(hello), timeout=30)
    assert message.decrypted and message.sender == ghost_of(stack, "medipeps", nora.idnps)
    reply = unique("Réponse vers Medipeps")
    await native.send_text(room_id, reply)
    answer = await wait_until(lambda: received(nora, reply), 90, "Nora to get the reply")
    assert answer["sender"] == native.user_id
    assert_only_ciphertext(stack, room_id, hello, reply)
