"""``encryption.require`` (TI-Messenger forbids unencrypted rooms), end to end through a real
Synapse, with the bridge on PostgreSQL (its crypto store too): a room that is not encrypted is
refused with a notice; an encrypted one is bridged; the portals the bridge opens are encrypted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession

from bridge.devtools.stack import LocalStack

from e2e_helpers import encrypted_native, portal_of, received, unique, users_of
from helpers import wait_until
from matrix_user import MatrixUser, text_is
from synapse_db import event_types_in_room, room_holds_text

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


@pytest.fixture
async def stack(tmp_path: Path, postgres_url: str) -> AsyncIterator[LocalStack]:
    overrides = {"encryption": {"enabled": True, "default": False, "require": True}}
    async with LocalStack(
        tmp_path / "stack", database_url=postgres_url, encrypted=True, config_overrides=overrides
    ) as local:
        yield local


@pytest.fixture
async def native(stack: LocalStack, tmp_path: Path) -> AsyncIterator[MatrixUser]:
    async with await encrypted_native(stack, tmp_path, "policy") as user:
        yield user


async def test_require_refuses_plain_rooms_and_bridges_encrypted_ones(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[0]
    ghost = f"@eimis_pandalab_{alice.idnps}:{stack.synapse.server_name}"

    plain = await native.create_room(invite=[ghost], is_direct=True)
    refusal = await native.wait_for_message(
        plain, lambda e: "salles chiffrées de bout en bout" in e.body, timeout=30
    )
    assert refusal.sender == ghost

    async def ghost_left() -> bool:
        await native.sync()
        room = native.client.rooms.get(plain)
        return room is not None and ghost not in room.users

    await wait_until(ghost_left, 30, "the ghost to leave the plain room")
    assert await stack.bridge.stores.portals.get(plain) is None  # type: ignore[union-attr]

    secret = await native.create_room(invite=[ghost], is_direct=True, encrypted=True)
    await native.wait_for_join(secret, ghost, timeout=30)
    text = unique("Chiffré, donc transmis")
    await native.send_text(secret, text)
    answer = await wait_until(lambda: received(alice, text), 30, "Alice to get the message")
    assert answer["sender"] == native.user_id
    assert not room_holds_text(stack.synapse, secret, text)


async def test_portals_opened_by_vendors_are_encrypted_when_required(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[1]
    conversation = await alice.start_conversation([native.user_id], unique("Exigé"))
    hello = unique("Bonjour")
    await alice.send(conversation, hello)
    room_id = await portal_of(stack, "pandalab", conversation)
    await native.accept_invites(room_id, timeout=30)
    message = await native.wait_for_message(room_id, text_is(hello), timeout=30)
    assert message.decrypted
    assert "m.room.message" not in event_types_in_room(stack.synapse, room_id)
