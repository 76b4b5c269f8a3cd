"""The trust space on one real Synapse: room policy of new portals, the trust list applied to
running portals, per-person permissions refusing invites, untrusted senders never delivered."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from mautrix.types import EventType, PaginationDirection, RoomID, UserID
from nio import ErrorResponse

from bridge.cli import main
from bridge.devtools.stack import LocalStack

from e2e_helpers import counter, inbox_texts, portal_of, received, unique, users_of
from helpers import wait_until
from matrix_user import MatrixUser, connect

pytestmark = pytest.mark.e2e

TRUSTED = "hs2.eimis.localhost"
UNTRUSTED = "evil.localhost"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    overrides = {"trust": {"servers": [f"{TRUSTED}:8448"], "poll_interval_s": 0.5}}
    async with LocalStack(
        Path(tmp_path_factory.mktemp("trust")), config_overrides=overrides
    ) as local:
        yield local


@pytest.fixture
async def native(stack: LocalStack) -> AsyncIterator[MatrixUser]:
    localpart = f"trustnative{next(counter)}"
    user_id, token = await stack.synapse.register_user(localpart, "correct horse battery")
    user = await connect(stack.synapse.url, user_id, token)
    try:
        yield user
    finally:
        await user.close()


async def cli(stack: LocalStack, *argv: str) -> int:
    """``eimis-bridge ARGV -c <the stack's config>`` as an operator runs it, beside the bridge."""
    config = str(stack.state_dir / "config.yaml")
    return await asyncio.to_thread(main, [argv[0], argv[1], "-c", config, *argv[2:]])


async def state(stack: LocalStack, room_id: str, event_type: str, key: str = "") -> Any:
    assert stack.bridge is not None
    bot = stack.bridge.homeserver.bot
    return (await bot.get_state_event(RoomID(room_id), EventType.find(event_type), key)).serialize()


async def test_new_direct_portal_carries_the_room_policy(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    assert stack.bridge is not None
    alice = (await users_of(stack, http, "pandalab"))[0]
    conversation = await alice.start_conversation([native.user_id], unique("Policy"))
    room_id = await portal_of(stack, "pandalab", conversation)
    domain = stack.synapse.server_name

    assert await state(stack, room_id, "m.room.server_acl") == {
        "allow": sorted([domain, TRUSTED]),
        "deny": [],
        "allow_ip_literals": False,
    }
    assert (await state(stack, room_id, "m.room.join_rules"))["join_rule"] == "invite"
    assert (await state(stack, room_id, "m.room.history_visibility")) == {
        "history_visibility": "invited"
    }
    assert (await state(stack, room_id, "m.room.guest_access")) == {"guest_access": "forbidden"}
    levels = await state(stack, room_id, "m.room.power_levels")
    # The bot created the room: 100 (or, from room version 12, a creator's unbounded power,
    # and then it must not be listed); nobody else has a level of their own.
    assert levels.get("users", {}) in ({stack.bridge.ids.bot_mxid: 100}, {})
    assert levels["users_default"] == 0 and levels["events_default"] == 0
    for event_type in (
        "m.room.server_acl",
        "m.room.encryption",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
    ):
        assert levels["events"][event_type] == 100, event_type
    for event_type in ("m.room.message", "m.reaction", "m.room.redaction"):
        assert levels["events"][event_type] == 0, event_type

    # Direct: the invite says so, the ghost's m.direct lists the room, and it is not published.
    invite = await state(stack, room_id, "m.room.member", native.user_id)
    assert invite["membership"] == "invite" and invite["is_direct"] is True
    ghost = f"@eimis_pandalab_{alice.idnps}:{domain}"
    direct = await stack.bridge.homeserver.intent(ghost).get_account_data("m.direct")
    assert room_id in direct[native.user_id]
    visibility = await stack.bridge.homeserver.bot.get_room_directory_visibility(RoomID(room_id))
    assert str(visibility.value if hasattr(visibility, "value") else visibility) == "private"
    assert (await stack.bridge.stores.portals.get(room_id)).is_direct  # type: ignore[union-attr]

    # A native member talks, but cannot change the ACL or the encryption.
    await native.accept_invites(room_id, timeout=30)
    text = unique("Le membre parle")
    await native.send_text(room_id, text)
    await wait_until(lambda: received(alice, text), 30, "the native message at PandaLab")
    for event_type, content in (
        ("m.room.server_acl", {"allow": ["*"], "deny": [], "allow_ip_literals": True}),
        ("m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"}),
    ):
        answer = await native.client.room_put_state(room_id, event_type, content)
        assert isinstance(answer, ErrorResponse) and answer.status_code == "M_FORBIDDEN"


async def test_trust_add_while_running_updates_every_portal_acl(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[1]
    bob = (await users_of(stack, http, "medipeps"))[1]
    first = await portal_of(
        stack, "pandalab", await alice.start_conversation([native.user_id], unique("ACL 1"))
    )
    second = await portal_of(
        stack, "pandalab", await alice.start_conversation([bob.idnps], unique("ACL 2"))
    )
    added = "hs3.eimis.localhost"

    async def allows(room_id: str, host: str) -> bool:
        return host in (await state(stack, room_id, "m.room.server_acl"))["allow"]

    assert not await allows(first, added)
    assert await cli(stack, "trust", "add", added) == 0
    try:
        for room_id in (first, second):
            await wait_until(lambda r=room_id: allows(r, added), 5, "the new server in the ACL")
        assert stack.bridge is not None and stack.bridge.homeserver.trust.is_trusted(f"@x:{added}")
        # A portal opened now carries it from its first state.
        third = await portal_of(
            stack, "pandalab", await alice.start_conversation([native.user_id], unique("ACL 3"))
        )
        assert await allows(third, added)
    finally:
        assert await cli(stack, "trust", "remove", added) == 0
    await wait_until(lambda: _not(allows(first, added)), 5, "the server out of the ACL")
    assert await allows(first, TRUSTED), "the config's servers stay"


async def _not(check: Any) -> bool:
    return not await check


async def test_blocked_vendor_users_ghost_refuses_a_native_invite_with_a_reason(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    assert stack.bridge is not None
    bob = (await users_of(stack, http, "medipeps"))[2]
    ghost = f"@eimis_medipeps_{bob.idnps}:{stack.synapse.server_name}"
    assert await cli(stack, "permissions", "set", bob.idnps, "block-all") == 0
    try:
        room_id = await native.create_dm(ghost)

        async def refused() -> dict[str, Any] | None:
            answer = await native.client.room_get_state_event(room_id, "m.room.member", ghost)
            content = getattr(answer, "content", {})
            return content if content.get("membership") == "leave" else None

        left = await wait_until(refused, 30, "the ghost to refuse the invite")
        assert left["reason"] == "this professional does not accept invitations"
        assert await stack.bridge.stores.portals.get(room_id) is None

        # Allowing the inviter's server opens the way.
        assert (
            await cli(
                stack, "permissions", "allow", bob.idnps, "--server", stack.synapse.server_name
            )
            == 0
        )
        room_id = await native.create_dm(ghost)
        text = unique("Autorisé maintenant")
        await native.send_text(room_id, text)
        await wait_until(lambda: received(bob, text), 30, "the message at Medipeps")
    finally:
        assert await cli(stack, "permissions", "clear", bob.idnps) == 0


async def test_event_from_an_untrusted_server_is_never_delivered(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    assert stack.bridge is not None
    bob = (await users_of(stack, http, "medipeps"))[3]
    ghost = f"@eimis_medipeps_{bob.idnps}:{stack.synapse.server_name}"
    room_id = await native.create_dm(ghost)
    opener = unique("Ouverture")
    await native.send_text(room_id, opener)
    await wait_until(lambda: received(bob, opener), 30, "the opener at Medipeps")

    dropped_before = stack.bridge.router.from_matrix.untrusted_dropped
    forged = unique("Venu d'un serveur hors de l'espace de confiance")
    sentinel = unique("Sentinelle de confiance")
    events = [
        {
            "event_id": f"$untrusted-{next(counter)}",
            "room_id": room_id,
            "type": "m.room.message",
            "sender": f"@mallory:{UNTRUSTED}",
            "origin_server_ts": 1_700_000_000_000,
            "content": {"msgtype": "m.text", "body": forged},
        },
        {
            "event_id": f"$trusted-{next(counter)}",
            "room_id": room_id,
            "type": "m.room.message",
            "sender": native.user_id,
            "origin_server_ts": 1_700_000_000_001,
            "content": {"msgtype": "m.text", "body": sentinel},
        },
    ]
    url = f"{stack.bridge_url}/_matrix/app/v1/transactions/untrusted-{next(counter)}"
    headers = {"Authorization": f"Bearer {stack.registration['hs_token']}"}
    async with http.put(url, data=json.dumps({"events": events}), headers=headers) as resp:
        assert resp.status == 200
    await wait_until(lambda: received(bob, sentinel), 30, "the trusted sentinel at Medipeps")
    assert forged not in await inbox_texts(bob)
    assert stack.bridge.router.from_matrix.untrusted_dropped == dropped_before + 1


async def test_vendor_user_asking_for_an_untrusted_matrix_id_is_told_no(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    assert stack.bridge is not None
    alice = (await users_of(stack, http, "pandalab"))[2]
    outsider = f"@mallory:{UNTRUSTED}"
    conversation = await alice.start_conversation(
        [native.user_id, outsider], unique("Avec un serveur inconnu")
    )
    room_id = await portal_of(stack, "pandalab", conversation)
    bot = stack.bridge.homeserver.bot

    async def notice() -> str | None:
        page = await bot.get_messages(RoomID(room_id), PaginationDirection.BACKWARD, limit=50)
        for event in page.events:
            body = getattr(event.content, "body", "") or ""
            if "n'appartient pas à l'espace de confiance EIMIS" in body:
                return str(body)
        return None

    body = await wait_until(notice, 30, "the refusal notice")
    assert outsider in body and body.startswith("Impossible d'ajouter à cette conversation")
    members = await bot.get_members(RoomID(room_id))
    assert UserID(outsider) not in {m.state_key for m in members}
    assert native.user_id in {m.state_key for m in members}
