"""End to end through a real Synapse, in encrypted rooms: the bridge decrypts what native users
send before a vendor gets it, encrypts what vendors send before the homeserver sees it, and each
ghost speaks from its own device, cross-signed by its own identity.

The native user is matrix-nio with encryption on (vodozemac underneath); the homeserver's own
database is read to show it holds ciphertext only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession

from bridge.devtools.demo import wait_for
from bridge.devtools.stack import LocalStack

from e2e_helpers import counter, portal_of, received, unique, users_of
from matrix_user import MatrixUser, connect, text_is
from synapse_db import event_types_in_room, room_holds_text

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with LocalStack(Path(tmp_path_factory.mktemp("encrypted")), encrypted=True) as local:
        yield local


@pytest.fixture
async def native(stack: LocalStack, tmp_path: Path) -> AsyncIterator[MatrixUser]:
    localpart = f"enc{next(counter)}"
    user_id, token = await stack.synapse.register_user(localpart, "correct horse battery")
    user = await connect(
        stack.synapse.url, user_id, token, encrypted=True, store_dir=tmp_path / localpart
    )
    try:
        yield user
    finally:
        await user.close()


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
    assert message.sender == f"@eimis_pandalab_{alice.idnps}:{stack.synapse.server_name}"

    reply = unique("Réponse chiffrée depuis Matrix")
    await native.send_text(room_id, reply)
    answer = await wait_for("Alice to receive the Matrix reply", lambda: received(alice, reply), 30)
    assert answer["sender"] == native.user_id

    types = event_types_in_room(stack.synapse, room_id)
    assert "m.room.encrypted" in types and "m.room.message" not in types
    assert not room_holds_text(stack.synapse, room_id, hello)
    assert not room_holds_text(stack.synapse, room_id, reply)
