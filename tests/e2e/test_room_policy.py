"""Rooms a ghost may be in, end to end: never one that anybody can join or read. A ghost refuses
an invite to a public or world-readable room with a reason, and leaves a portal made public
later with a notice; joins to portals are recorded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from nio import RoomCreateResponse, RoomPreset, RoomPutStateResponse

from bridge.db.portal_join import PortalJoinStore
from bridge.devtools.stack import LocalStack

from e2e_helpers import NATIVE_PASSWORD, app_users_of, counter, member_state, unique
from helpers import wait_until
from matrix_user import MatrixUser, connect

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with LocalStack(Path(tmp_path_factory.mktemp("room-policy"))) as local:
        yield local


async def new_native(stack: LocalStack, prefix: str) -> MatrixUser:
    user_id, token = await stack.synapse.register_user(f"{prefix}{next(counter)}", NATIVE_PASSWORD)
    return await connect(stack.synapse.url, user_id, token)


@pytest.fixture
async def native(stack: LocalStack) -> AsyncIterator[MatrixUser]:
    user = await new_native(stack, "policy")
    try:
        yield user
    finally:
        await user.close()


async def ghost_of(stack: LocalStack, http: ClientSession, index: int) -> tuple[Any, str]:
    user = (await app_users_of(stack, http, "pandalab"))[index]
    return user, f"@eimis_pandalab_{user.idnps}:{stack.synapse.server_name}"


async def create(native: MatrixUser, invite: str, **options: Any) -> str:
    answer = await native.client.room_create(invite=[invite], **options)
    assert isinstance(answer, RoomCreateResponse), answer
    return str(answer.room_id)


async def left_with_reason(native: MatrixUser, room_id: str, ghost: str) -> str:
    async def reason() -> str | None:
        state = await member_state(native, room_id, ghost)
        return str(state.get("reason")) if state.get("membership") == "leave" else None

    return str(await wait_until(reason, 30, f"{ghost} to leave"))


async def test_a_ghost_refuses_an_invite_to_a_public_room_and_says_why(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    _, ghost = await ghost_of(stack, http, 0)
    room_id = await create(native, ghost, preset=RoomPreset.public_chat)
    reason = await left_with_reason(native, room_id, ghost)
    assert "publique" in reason and "n'importe qui" in reason
    assert stack.bridge is not None
    assert await stack.bridge.stores.portals.get(room_id) is None  # nothing bridged


async def test_a_ghost_leaves_a_world_readable_room_with_a_notice(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    _, ghost = await ghost_of(stack, http, 1)
    world_readable = {
        "type": "m.room.history_visibility",
        "state_key": "",
        "content": {"history_visibility": "world_readable"},
    }
    room_id = await create(
        native, ghost, preset=RoomPreset.private_chat, initial_state=[world_readable]
    )
    reason = await left_with_reason(native, room_id, ghost)
    assert "lisible par tout le monde" in reason
    notice = await native.wait_for_message(
        room_id, lambda e: e.sender == ghost and "non relayée" in str(e.body), timeout=30
    )
    assert "lisible par tout le monde" in str(notice.body)


async def test_a_portal_made_public_later_is_left_with_a_notice_and_joins_are_recorded(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    assert stack.bridge is not None
    alice, ghost = await ghost_of(stack, http, 2)
    room_id = await native.create_dm(ghost)
    await native.wait_for_join(room_id, ghost, timeout=30)
    stores = stack.bridge.stores

    async def conversation() -> str | None:
        link = await stores.portals.link(room_id, "pandalab")
        return link.conversation_id if link else None

    conversation_id = str(await wait_until(conversation, 30, "the vendor conversation"))
    # Someone joining the portal is recorded: who, which portal, when.
    guest = await new_native(stack, "joiner")
    try:
        await native.client.room_invite(room_id, guest.user_id)
        await guest.accept_invites(room_id, timeout=30)

        async def recorded() -> bool:
            joins = await PortalJoinStore(stores.db).of_room(room_id)
            return any(j.user_id == guest.user_id and j.at > 0 for j in joins)

        await wait_until(recorded, 30, "the join recorded")
    finally:
        await guest.close()

    answer = await native.client.room_put_state(
        room_id, "m.room.join_rules", {"join_rule": "public"}
    )
    assert isinstance(answer, RoomPutStateResponse), answer
    reason = await left_with_reason(native, room_id, ghost)
    assert "publique" in reason
    notice = await native.wait_for_message(
        room_id, lambda e: e.sender == ghost and "non relayée" in str(e.body), timeout=30
    )
    assert "publique" in str(notice.body)
    rows = await stores.audit.query(portal=room_id, limit=100)
    assert any(r.direction == "room_policy" and r.outcome == "refused" for r in rows)

    # The vendor user writes on: the ghost does not come back to the public room.
    text = unique("Encore une question")  # ASCII: matched in the stored JSON
    await alice.post(conversation_id, text=text)

    async def refused() -> bool:
        row = await stores.db.fetchrow(
            "SELECT state FROM inbox WHERE origin = 'pandalab' AND payload LIKE $1",
            f"%{text}%",
        )
        return row is not None and row["state"] == "failed"

    await wait_until(refused, 30, "the vendor message refused")
    assert (await member_state(native, room_id, ghost)).get("membership") == "leave"
