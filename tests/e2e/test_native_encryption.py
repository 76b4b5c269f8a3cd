"""Native Matrix users in end-to-end encrypted rooms, through a real Synapse.

Groundwork for the bridge's encryption: the test suite's native user (matrix_user, nio backed by
vodozemac) must be able to talk in encrypted rooms, send and read encrypted files, and ask for a
room key it missed; and the homeserver must be shown to hold ciphertext only (read from its own
database, synapse_db), which is what the bridged encrypted rooms will be checked against.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from nio import RoomEncryptedFile, RoomMessageText

from bridge.devtools.synapse import LocalSynapse

from matrix_user import MatrixUser, connect, login, text_is
from synapse_db import event_types_in_room, room_holds_text

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple"
_counter = itertools.count(1)


@pytest.fixture(scope="module")
async def synapse(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalSynapse]:
    """One homeserver for the module: users are unique per test, so tests do not interfere."""
    async with LocalSynapse(Path(tmp_path_factory.mktemp("synapse"))) as homeserver:
        yield homeserver


async def encrypted_user(synapse: LocalSynapse, name: str, store: Path) -> MatrixUser:
    """A freshly registered user on its first device, keys uploaded."""
    user_id, token = await synapse.register_user(f"{name}{next(_counter)}", PASSWORD)
    return await connect(synapse.url, user_id, token, encrypted=True, store_dir=store)


async def encrypted_dm(alice: MatrixUser, bob: MatrixUser) -> str:
    """Alice opens an encrypted DM with Bob; returns once both see each other joined, so the
    first room key goes to Bob's device."""
    room_id = await alice.create_encrypted_room(invite=[bob.user_id], is_direct=True)
    await bob.accept_invites(room_id)
    await alice.wait_for_join(room_id, bob.user_id)
    await bob.wait_for_join(room_id, alice.user_id)
    return room_id


async def test_homeserver_config_enables_what_an_e2ee_appservice_needs(
    synapse: LocalSynapse,
) -> None:
    """To-device messages pushed to appservices (MSC2409) and device lists / one-time key
    counts in transactions (MSC3202) are off by default in Synapse."""
    config = yaml.safe_load(synapse.config_path.read_text())
    assert config["experimental_features"]["msc2409_to_device_messages_enabled"] is True
    assert config["experimental_features"]["msc3202_transaction_extensions"] is True
    assert synapse.running


async def test_encrypted_dm_texts_and_file_both_ways_homeserver_holds_ciphertext_only(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    alice = await encrypted_user(synapse, "alice", tmp_path / "alice")
    bob = await encrypted_user(synapse, "bob", tmp_path / "bob")
    async with alice, bob:
        room_id = await encrypted_dm(alice, bob)

        to_bob = "Bonjour Bob, le patient de la chambre 12 est sorti"
        await alice.send_text(room_id, to_bob)
        seen_by_bob = await bob.wait_for_message(room_id, text_is(to_bob))
        assert isinstance(seen_by_bob, RoomMessageText)
        assert seen_by_bob.decrypted and seen_by_bob.sender == alice.user_id

        to_alice = "Merci Alice, bien noté pour la chambre 12"
        await bob.send_text(room_id, to_alice)
        seen_by_alice = await alice.wait_for_message(room_id, text_is(to_alice))
        assert seen_by_alice.decrypted and seen_by_alice.sender == bob.user_id

        report = b"%PDF-1.4 compte rendu confidentiel " + bytes(range(256))
        await bob.send_file(room_id, report, "compte-rendu.pdf", "application/pdf")
        file_event = await alice.wait_for_message(
            room_id, lambda e: getattr(e, "body", None) == "compte-rendu.pdf"
        )
        assert isinstance(file_event, RoomEncryptedFile)
        assert file_event.decrypted and file_event.mimetype == "application/pdf"
        assert await alice.download_file(file_event) == report
        # The media repository only ever saw ciphertext.
        assert await alice.download(file_event.url) != report

        assert alice.undecryptable(room_id) == []
        assert bob.undecryptable(room_id) == []

        types = event_types_in_room(synapse, room_id)
        assert "m.room.encryption" in types
        assert types.count("m.room.encrypted") >= 3
        assert "m.room.message" not in types
        for clear in (to_bob, to_alice, "compte-rendu.pdf", "chambre 12"):
            assert not room_holds_text(synapse, room_id, clear), clear


async def test_synapse_db_sees_clear_text_of_an_unencrypted_room(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    """The control for the test above: the same helpers do find a message sent in clear, so
    their "not there" is a finding, not a blind spot."""
    alice = await encrypted_user(synapse, "alice", tmp_path / "alice")
    async with alice:
        room_id = await alice.create_room(name="en clair")
        text = "Message en clair, visible du serveur"
        accented = "Fièvre à 39,5 °C, résultats reçus"  # stored JSON-escaped: found all the same
        await alice.send_text(room_id, text)
        await alice.send_text(room_id, accented)
        assert "m.room.message" in event_types_in_room(synapse, room_id)
        assert room_holds_text(synapse, room_id, text)
        assert room_holds_text(synapse, room_id, accented)


async def test_second_device_gets_an_old_room_key_from_the_first_device(
    synapse: LocalSynapse, tmp_path: Path
) -> None:
    """A device logged in after a message was sent cannot decrypt it (no room key) until it
    asks for the key. nio sends key requests to the user's own devices only, answers them only
    for an own device it has verified (share_keys_on_request approves), and imports the
    forwarded key only from an own verified device (verify_own_devices): Bob's first device
    answers his second one."""
    alice = await encrypted_user(synapse, "alice", tmp_path / "alice")
    bob = await encrypted_user(synapse, "bob", tmp_path / "bob")
    async with alice, bob:
        room_id = await encrypted_dm(alice, bob)
        old = "Résultats de la biologie: avant la nouvelle session de Bob"
        await alice.send_text(room_id, old)
        await bob.wait_for_message(room_id, text_is(old))

        async with await login(
            synapse.url, bob.user_id, PASSWORD, encrypted=True, store_dir=tmp_path / "bob2"
        ) as bob2:
            assert bob2.device_id != bob.device_id
            # The login already synced: the old message came, undecryptable.
            missing = [e for e in bob2.undecryptable(room_id) if e.sender == alice.user_id]
            assert len(missing) == 1
            assert bob2.messages(room_id) == []

            bob.share_keys_on_request()
            # nio drops a key request from a device it has not queried yet, and a forwarded
            # key from a device it does not know as verified.
            await bob.wait_for_device(bob.user_id, bob2.device_id)
            await bob2.wait_for_device(bob.user_id, bob.device_id)
            assert bob2.verify_own_devices() == [bob.device_id]
            await bob2.request_room_key(missing[0])
            async with bob.syncing(), alice.syncing():
                recovered = await bob2.wait_for_message(room_id, text_is(old), timeout=30)
            assert recovered.decrypted and recovered.sender == alice.user_id
            assert bob2.undecryptable(room_id) == []
