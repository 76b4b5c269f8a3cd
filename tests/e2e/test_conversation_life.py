"""End to end through a real Synapse: a conversation lives. People are added and removed on either
side, leave, rename it; an old conversation brings its history along when it first crosses; what
a vendor cannot do is said, never faked; a restart of the bridge loses nothing.

Portals are end-to-end encrypted and the native users are matrix-nio with encryption on: a person
added later reads from their invite on (history visibility ``invited``, room keys from that point),
a person removed reads nothing more: checked at the homeserver and on their own Olm machine. One
Synapse for the module; the restarts come last.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from nio import EncryptionError, MegolmEvent

from bridge.cli import main
from bridge.devtools.stack import LocalStack

from e2e_helpers import (
    AppUser,
    app_users_of,
    as_native,
    counter,
    encrypted_native,
    event_as,
    inbox_message,
    inbox_texts,
    member_state,
    portal_of,
    received,
    unique,
)
from helpers import wait_until
from matrix_user import MatrixUser, text_is

pytestmark = pytest.mark.e2e

UNTRUSTED = "evil.localhost"
BACKFILLED = 12
"""Messages an old conversation has when it first crosses (under ``portal.backfill``)."""


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    overrides = {
        "encryption": {"enabled": True, "default": True, "key_wait_s": 20},
        "portal": {"titles_in_room_state": True, "backfill": {"max_messages": 50}},
    }
    async with LocalStack(
        Path(tmp_path_factory.mktemp("life")), encrypted=True, config_overrides=overrides
    ) as local:
        yield local


@pytest.fixture
async def native(stack: LocalStack, tmp_path: Path) -> AsyncIterator[MatrixUser]:
    async with await encrypted_native(stack, tmp_path, "life") as user:
        yield user


@pytest.fixture
async def newcomer(stack: LocalStack, tmp_path: Path) -> AsyncIterator[MatrixUser]:
    """A second native user, added to a conversation after it started."""
    async with await encrypted_native(stack, tmp_path, "newcomer") as user:
        yield user


def ghost(stack: LocalStack, connector: str, user: AppUser) -> str:
    return f"@eimis_{connector}_{user.idnps}:{stack.synapse.server_name}"


async def pick(stack: LocalStack, http: ClientSession, type_name: str, n: int = 1) -> list[AppUser]:
    """``n`` users of a sandbox, taken in turn so that tests rarely share one."""
    users = await app_users_of(stack, http, type_name)
    start = next(counter)
    return [users[(start + i) % len(users)] for i in range(n)]


async def opened(
    stack: LocalStack, starter: AppUser, native: MatrixUser, *others: str
) -> tuple[str, str, str]:
    """``starter`` (PandaLab-style) opens a conversation with ``native`` (and ``others``) and says
    hello; once ``native`` read it: (the conversation, the portal, the hello's event id)."""
    conversation = await starter.start_conversation([native.user_id, *others], unique("Vie"))
    hello = unique("Bonjour")
    await starter.post(conversation, text=hello)
    room_id = await portal_of(stack, "pandalab", conversation)
    await native.accept_invites(room_id, timeout=30)
    event = await native.wait_for_message(room_id, text_is(hello), 30)
    return conversation, room_id, str(event.event_id)


async def visible_event_ids(user: MatrixUser, room_id: str) -> set[str]:
    """Every event of the room's timeline the homeserver lets ``user`` read (back to the start)."""
    found: set[str] = set()
    token: str | None = None
    while True:
        path = f"/rooms/{room_id}/messages?dir=b&limit=100" + (f"&from={token}" if token else "")
        status, page = await as_native(user, "GET", path)
        assert status == 200, (status, page)
        found |= {e["event_id"] for e in page.get("chunk", [])}
        token = page.get("end")
        if not page.get("chunk") or not token:
            return found


async def can_decrypt(user: MatrixUser, holder: MatrixUser, room_id: str, event_id: str) -> bool:
    """Whether ``user``'s device holds the room key of ``event_id`` at its index: the ciphertext
    is fetched by ``holder`` (who may read it) and handed to ``user``'s own Olm machine."""
    raw = await event_as(holder, room_id, event_id)
    event = MegolmEvent.from_dict(raw)
    assert isinstance(event, MegolmEvent), raw.get("type")
    try:
        user.client.decrypt_event(event)
    except EncryptionError:
        return False
    return True


async def membership(user: MatrixUser, room_id: str, member: str) -> str | None:
    return (await member_state(user, room_id, member)).get("membership")


async def until_member(user: MatrixUser, room_id: str, member: str, state: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        content = await member_state(user, room_id, member)
        return content if content.get("membership") == state else None

    return await wait_until(check, 60, f"{member} to be {state} in the portal")


async def conversation_at(user: AppUser, predicate: Any) -> dict[str, Any]:
    """The first conversation in ``user``'s list that matches, once there."""

    async def find() -> dict[str, Any] | None:
        for conversation in await user.conversations():
            if predicate(conversation):
                return conversation
        return None

    return await wait_until(find, 60, f"a conversation at {user.idnps}")


async def messages_in(user: AppUser, conversation_id: str) -> list[str]:
    return [m["text"] for m in await user.inbox() if m["conversation_id"] == conversation_id]


async def cli(stack: LocalStack, *argv: str) -> int:
    """``eimis-bridge ARGV -c <the stack's config>`` as an operator runs it, beside the bridge."""
    config = str(stack.state_dir / "config.yaml")
    return await asyncio.to_thread(main, [argv[0], argv[1], "-c", config, *argv[2:]])


async def kick_when_allowed(user: MatrixUser, room_id: str, member: str, reason: str) -> None:
    """``user`` kicks ``member`` (retried until the bridge has raised the user to member level)."""

    async def kicked() -> bool:
        status, _ = await as_native(
            user, "POST", f"/rooms/{room_id}/kick", {"user_id": member, "reason": reason}
        )
        return status == 200

    await wait_until(kicked, 30, f"{user.user_id} to be allowed to remove {member}")


async def invite(user: MatrixUser, room_id: str, member: str) -> None:
    status, body = await as_native(user, "POST", f"/rooms/{room_id}/invite", {"user_id": member})
    assert status == 200, (status, body)


# --- Vendor side -> Matrix ------------------------------------------------------------------------


async def test_vendor_adds_a_native_user_who_reads_what_follows_and_not_before(
    stack: LocalStack, http: ClientSession, native: MatrixUser, newcomer: MatrixUser
) -> None:
    [alice] = await pick(stack, http, "pandalab")
    conversation, room_id, before_id = await opened(stack, alice, native)

    after = await alice.add(conversation, newcomer.user_id)
    assert newcomer.user_id in after["external"]
    await newcomer.accept_invites(room_id, timeout=60)  # the same portal
    following = unique("Ce qui suit l'ajout")
    await alice.post(conversation, text=following)
    seen = await newcomer.wait_for_message(room_id, text_is(following), 60)
    assert seen.decrypted and seen.sender == ghost(stack, "pandalab", alice)
    await native.wait_for_message(room_id, text_is(following), 30)

    answer = unique("Réponse du nouveau venu")
    await newcomer.send_text(room_id, answer)
    at_alice = await wait_until(lambda: received(alice, answer), 90, "the newcomer's answer")
    assert at_alice["sender"] == newcomer.user_id

    # Nothing from before the invite: not served by the homeserver, no key to read it with.
    assert before_id not in await visible_event_ids(newcomer, room_id)
    assert not any(e.event_id == before_id for e in newcomer.messages(room_id))
    assert not newcomer.undecryptable(room_id), "events it was sent but cannot read"
    assert await can_decrypt(native, native, room_id, before_id), "the check itself works"
    assert not await can_decrypt(newcomer, native, room_id, before_id), "a key from before"


@pytest.mark.parametrize("other", ["medipeps", "webhook"])
async def test_vendor_adds_a_user_of_another_vendor(
    stack: LocalStack, http: ClientSession, native: MatrixUser, other: str
) -> None:
    [alice] = await pick(stack, http, "pandalab")
    [bob] = await pick(stack, http, other)
    conversation, room_id, _ = await opened(stack, alice, native)
    earlier = unique("Avant l'arrivée de Bob")
    await alice.post(conversation, text=earlier)
    await native.wait_for_message(room_id, text_is(earlier), 30)

    await alice.add(conversation, bob.idnps)
    await until_member(native, room_id, ghost(stack, other, bob), "join")
    following = unique("Pour Bob désormais")
    await alice.post(conversation, text=following)
    at_bob = await wait_until(lambda: received(bob, following), 90, f"the message at {other}")
    assert earlier not in await inbox_texts(bob), "history only as the vendor's rules give it"

    reply = unique("Bob répond")
    await bob.post(str(at_bob["conversation_id"]), text=reply)
    await native.wait_for_message(room_id, text_is(reply), 60)
    await wait_until(lambda: received(alice, reply), 90, "Bob's reply at PandaLab")


async def test_vendor_removes_participants_who_then_receive_nothing_new(
    stack: LocalStack, http: ClientSession, native: MatrixUser, newcomer: MatrixUser
) -> None:
    [alice] = await pick(stack, http, "pandalab")
    [bob] = await pick(stack, http, "medipeps")
    conversation, room_id, _ = await opened(stack, alice, native, newcomer.user_id, bob.idnps)
    await newcomer.accept_invites(room_id, timeout=30)
    shared = unique("Pour tous")
    await alice.post(conversation, text=shared)
    await newcomer.wait_for_message(room_id, text_is(shared), 30)
    await wait_until(lambda: received(bob, shared), 90, "the message at Medipeps")

    after = await alice.remove(conversation, bob.idnps, newcomer.user_id)
    assert newcomer.user_id not in after["external"]
    await until_member(native, room_id, ghost(stack, "medipeps", bob), "leave")
    kicked = await until_member(native, room_id, newcomer.user_id, "leave")
    assert kicked.get("reason"), "removed by the portal's admin, with a reason"

    following = unique("Après le retrait")
    await alice.post(conversation, text=following)
    seen_after = await native.wait_for_message(room_id, text_is(following), 30)
    following_id = seen_after.event_id
    seen_before = await native.wait_for_message(room_id, text_is(shared), 30)
    assert seen_after.session_id != seen_before.session_id, "the ghost's session was replaced"
    # Past the removal at every side: a later message from Matrix reached PandaLab.
    marker = unique("Repère")
    await native.send_text(room_id, marker)
    await wait_until(lambda: received(alice, marker), 90, "the marker at PandaLab")
    assert following not in await inbox_texts(bob) and marker not in await inbox_texts(bob)
    await newcomer.sync()
    assert not any(getattr(e, "body", None) == following for e in newcomer.messages(room_id))
    assert following_id not in await visible_event_ids(newcomer, room_id), "nothing after"
    assert not await can_decrypt(newcomer, native, room_id, following_id), "no key after"


async def test_a_vendor_member_leaves_and_the_native_user_leaves(
    stack: LocalStack, http: ClientSession, native: MatrixUser, newcomer: MatrixUser
) -> None:
    alice, dora = await pick(stack, http, "pandalab", 2)
    conversation, room_id, _ = await opened(stack, alice, native, dora.idnps, newcomer.user_id)
    await newcomer.accept_invites(room_id, timeout=30)
    await until_member(native, room_id, ghost(stack, "pandalab", dora), "join")

    # Vendor side: Dora leaves, her ghost follows.
    await dora.leave(conversation)
    await until_member(native, room_id, ghost(stack, "pandalab", dora), "leave")

    # Matrix side: the newcomer leaves, PandaLab's conversation follows.
    status, body = await as_native(newcomer, "POST", f"/rooms/{room_id}/leave", {})
    assert status == 200, body

    async def gone() -> bool:
        return newcomer.user_id not in (await alice.conversation(conversation))["external"]

    await wait_until(gone, 60, "the leaver out of the PandaLab conversation")
    later = unique("Après les départs")
    await native.send_text(room_id, later)
    await wait_until(lambda: received(alice, later), 90, "the next message at PandaLab")
    assert later not in await messages_in(dora, conversation)


async def test_a_medipeps_user_adds_a_pandalab_user_then_leaves(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    [bob] = await pick(stack, http, "medipeps")
    [dora] = await pick(stack, http, "pandalab")
    conversation = await bob.start_conversation([native.user_id], unique("Medipeps"))
    hello = unique("Bonjour depuis Medipeps")
    await bob.post(conversation, text=hello)
    room_id = await portal_of(stack, "medipeps", conversation)
    await native.accept_invites(room_id, timeout=30)
    await native.wait_for_message(room_id, text_is(hello), 30)

    await bob.add(conversation, dora.idnps)  # ADD_PART in the feed
    await until_member(native, room_id, ghost(stack, "pandalab", dora), "join")
    following = unique("Pour Dora aussi")
    await bob.post(conversation, text=following)
    at_dora = await wait_until(lambda: received(dora, following), 90, "the message at PandaLab")
    assert hello not in await inbox_texts(dora)
    reply = unique("Dora répond")
    await dora.post(str(at_dora["conversation_id"]), text=reply)
    await native.wait_for_message(room_id, text_is(reply), 60)
    await wait_until(lambda: received(bob, reply), 90, "Dora's reply at Medipeps")

    await bob.leave(conversation)  # LEAVE in the feed
    await until_member(native, room_id, ghost(stack, "medipeps", bob), "leave")
    later = unique("Après le départ de Bob")
    await native.send_text(room_id, later)
    await wait_until(lambda: received(dora, later), 90, "the next message at PandaLab")
    assert later not in await inbox_texts(bob)


# --- Matrix side -> vendors -----------------------------------------------------------------------


async def test_native_invites_ghosts_of_both_vendors_into_an_existing_portal(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice, dora = await pick(stack, http, "pandalab", 2)
    [bob] = await pick(stack, http, "medipeps")
    conversation, room_id, _ = await opened(stack, alice, native)

    await invite(native, room_id, ghost(stack, "pandalab", dora))
    await invite(native, room_id, ghost(stack, "medipeps", bob))
    await until_member(native, room_id, ghost(stack, "pandalab", dora), "join")
    await until_member(native, room_id, ghost(stack, "medipeps", bob), "join")

    async def dora_is_a_member() -> bool:
        return dora.idnps in (await alice.conversation(conversation))["members"]

    await wait_until(dora_is_a_member, 60, "Dora in the PandaLab conversation")
    following = unique("Bienvenue à vous deux")
    await native.send_text(room_id, following)
    await wait_until(lambda: received(dora, following), 90, "the message at Dora")
    at_bob = await wait_until(lambda: received(bob, following), 90, "the message at Bob")
    from_alice = unique("Alice aussi")
    await alice.post(conversation, text=from_alice)
    await wait_until(lambda: received(bob, from_alice), 90, "Alice's message at Bob")
    reply = unique("Bob répond au portail")
    await bob.post(str(at_bob["conversation_id"]), text=reply)
    await wait_until(lambda: received(alice, reply), 90, "Bob's reply at Alice")


async def test_native_kicks_a_ghost(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice, dora = await pick(stack, http, "pandalab", 2)
    conversation, room_id, _ = await opened(stack, alice, native, dora.idnps)
    await until_member(native, room_id, ghost(stack, "pandalab", dora), "join")

    await kick_when_allowed(native, room_id, ghost(stack, "pandalab", dora), "Fin de garde")

    async def dora_is_out() -> bool:
        return dora.idnps not in (await alice.conversation(conversation))["members"]

    await wait_until(dora_is_out, 60, "Dora out of the PandaLab conversation")
    await wait_until(lambda: _not(dora.in_conversation(conversation)), 30, "Dora's list")
    later = unique("Sans Dora")
    await native.send_text(room_id, later)
    await wait_until(lambda: received(alice, later), 90, "the next message at Alice")
    assert later not in await inbox_texts(dora)


async def test_native_kicks_a_ghost_of_a_webhook_vendor(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    [alice] = await pick(stack, http, "pandalab")
    [wendy] = await pick(stack, http, "webhook")
    conversation, room_id, _ = await opened(stack, alice, native, wendy.idnps)
    shared = unique("Pour Wendy")
    await alice.post(conversation, text=shared)
    at_wendy = await wait_until(lambda: received(wendy, shared), 90, "the message at the vendor")
    wendy_conversation = str(at_wendy["conversation_id"])

    await kick_when_allowed(native, room_id, ghost(stack, "webhook", wendy), "Fin de garde")
    await wait_until(
        lambda: _not(wendy.in_conversation(wendy_conversation)), 60, "Wendy's list without it"
    )
    later = unique("Sans Wendy")
    await native.send_text(room_id, later)
    await wait_until(lambda: received(alice, later), 90, "the next message at Alice")
    assert later not in await inbox_texts(wendy)


async def _not(awaitable: Any) -> bool:
    return not await awaitable


# --- Titles and topics ----------------------------------------------------------------------------


async def test_rename_and_topic_both_ways(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    [alice] = await pick(stack, http, "pandalab")
    [bob] = await pick(stack, http, "medipeps")
    conversation, room_id, _ = await opened(stack, alice, native, bob.idnps)

    async def room_state(event_type: str, key: str) -> Any:
        status, content = await as_native(native, "GET", f"/rooms/{room_id}/state/{event_type}")
        return content.get(key) if status == 200 else None

    # Vendor -> Matrix (titles_in_room_state: the name is room state).
    title = unique("Équipe de nuit")
    await alice.rename(conversation, title=title)
    await wait_until(lambda: _equals(room_state("m.room.name", "name"), title), 60, "m.room.name")
    topic = unique("Suivi post-opératoire")
    await alice.rename(conversation, description=topic)
    await wait_until(
        lambda: _equals(room_state("m.room.topic", "topic"), topic), 60, "m.room.topic"
    )
    # ... and on to the other vendor (Medipeps-style: a subject, no topic).
    await conversation_at(bob, lambda c: c.get("title") == title)

    # Matrix -> vendors.
    renamed = unique("Renommée depuis Matrix")
    status, body = await as_native(
        native, "PUT", f"/rooms/{room_id}/state/m.room.name", {"name": renamed}
    )
    assert status == 200, body
    await wait_until(
        lambda: _equals(_field(alice.conversation(conversation), "title"), renamed),
        60,
        "the title at PandaLab",
    )
    await conversation_at(bob, lambda c: c.get("title") == renamed)
    new_topic = unique("Sujet depuis Matrix")
    status, body = await as_native(
        native, "PUT", f"/rooms/{room_id}/state/m.room.topic", {"topic": new_topic}
    )
    assert status == 200, body
    await wait_until(
        lambda: _equals(_field(alice.conversation(conversation), "description"), new_topic),
        60,
        "the description at PandaLab",
    )
    # No echo: the rename the bridge made is not sent back as a new one.
    marker = unique("Après les renommages")
    await alice.post(conversation, text=marker)
    await native.wait_for_message(room_id, text_is(marker), 30)
    assert await room_state("m.room.name", "name") == renamed
    names = [e for e in native.events(room_id) if e.get("type") == "m.room.name"]
    assert [e["content"].get("name") for e in names][-1:] == [renamed]
    assert sum(1 for e in names if e["content"].get("name") == renamed) == 1


async def test_a_vendor_rename_is_a_notice_when_titles_stay_out_of_room_state(
    stack: LocalStack, http: ClientSession, native: MatrixUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    [alice] = await pick(stack, http, "pandalab")
    conversation, room_id, _ = await opened(stack, alice, native)
    # portal.titles_in_room_state: false (the default), for this test only.
    assert stack.bridge is not None
    homeserver = type(stack.bridge.homeserver)
    monkeypatch.setattr(homeserver, "titles_in_room_state", property(lambda self: False))

    title = unique("Titre discret")
    await alice.rename(conversation, title=title)
    notice = await native.wait_for_message(
        room_id, lambda e: title in (getattr(e, "body", "") or ""), 60
    )
    assert notice.decrypted, "the title travels encrypted, not in the room state"
    assert notice.sender == ghost(stack, "pandalab", alice)
    status, content = await as_native(native, "GET", f"/rooms/{room_id}/state/m.room.name")
    assert status != 200 or content.get("name") != title


async def _equals(awaitable: Any, expected: Any) -> bool:
    return bool(await awaitable == expected)


async def _field(awaitable: Any, key: str) -> Any:
    return (await awaitable).get(key)


# --- History --------------------------------------------------------------------------------------


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


async def old_conversation(alice: AppUser, dora: AppUser, count: int) -> tuple[str, list[str]]:
    """A PandaLab conversation between two PandaLab users (nothing crosses yet) with ``count``
    messages, written in turn: (the conversation, the texts, oldest first)."""
    conversation = await alice.start_conversation([dora.idnps], unique("Ancienne"))
    texts = [unique(f"Historique {i}") for i in range(count)]
    for i, text in enumerate(texts):
        await (alice if i % 2 == 0 else dora).post(conversation, text=text)
    return conversation, texts


async def test_an_old_conversation_crosses_with_its_history(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice, dora = await pick(stack, http, "pandalab", 2)
    conversation, texts = await old_conversation(alice, dora, BACKFILLED)
    written = {m["text"]: m for m in (await alice.conversation(conversation))["messages"]}

    await alice.add(conversation, native.user_id)  # its first external participant
    room_id = await portal_of(stack, "pandalab", conversation)
    await native.accept_invites(room_id, timeout=60)
    new = unique("Nouveau message")
    await alice.post(conversation, text=new)
    await native.wait_for_message(room_id, text_is(new), 90)

    bodies = [(e, getattr(e, "body", None)) for e in native.messages(room_id)]
    shown = [body for _, body in bodies if body in texts or body == new]
    assert shown == [*texts, new], "the history in order, once, before the new message"
    for event, body in bodies:
        if body in texts:
            source = written[body]
            assert event.server_timestamp == ms(source["ts"]), "the original time"
            sender = alice if source["sender"] == alice.idnps else dora
            assert event.sender == ghost(stack, "pandalab", sender)
            assert event.decrypted


# --- Refusals -------------------------------------------------------------------------------------


async def test_untrusted_server_and_blocked_person_are_refused_with_a_reason(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    [alice] = await pick(stack, http, "pandalab")
    [bob] = await pick(stack, http, "medipeps")
    conversation, room_id, _ = await opened(stack, alice, native)

    # A participant on a server outside the trust space, added at the vendor.
    outsider = f"@mallory{next(counter)}:{UNTRUSTED}"
    await alice.add(conversation, outsider)
    notice = await native.wait_for_message(
        room_id, lambda e: outsider in (getattr(e, "body", "") or ""), 60
    )
    assert notice.sender == f"@eimis_bot:{stack.synapse.server_name}"
    assert await membership(native, room_id, outsider) is None

    # A blocked person, invited from Matrix.
    bob_ghost = ghost(stack, "medipeps", bob)
    assert await cli(stack, "permissions", "set", bob.idnps, "block-all") == 0
    try:
        await invite(native, room_id, bob_ghost)
        refused = await until_member(native, room_id, bob_ghost, "leave")
        assert refused.get("reason")
        marker = unique("Sans la personne bloquée")
        await native.send_text(room_id, marker)
        await wait_until(lambda: received(alice, marker), 90, "the marker at PandaLab")
        assert marker not in await inbox_texts(bob)
    finally:
        assert await cli(stack, "permissions", "clear", bob.idnps) == 0


async def test_a_medipeps_user_removed_from_matrix_is_told_and_receives_nothing_more(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    [alice] = await pick(stack, http, "pandalab")
    [bob] = await pick(stack, http, "medipeps")
    conversation, room_id, _ = await opened(stack, alice, native, bob.idnps)
    shared = unique("Pour Bob aussi")
    await alice.post(conversation, text=shared)
    at_bob = await wait_until(lambda: received(bob, shared), 90, "the message at Medipeps")
    bob_conversation = str(at_bob["conversation_id"])
    before = set(await messages_in(bob, bob_conversation))

    # Medipeps-style users cannot be removed by others: the sandbox refuses as the vendor does.
    assert await bob.try_remove(bob_conversation, native.user_id) == 501

    await kick_when_allowed(native, room_id, ghost(stack, "medipeps", bob), "Fin de garde")
    told = await wait_until(
        lambda: inbox_message(
            bob,
            lambda m: m["conversation_id"] == bob_conversation and m["text"] not in before,
        ),
        90,
        "the system message at Medipeps",
    )
    assert told["text"], "a system message, in words"
    later = unique("Après le retrait de Bob")
    await native.send_text(room_id, later)
    await alice.post(conversation, text=unique("Alice continue"))
    await wait_until(lambda: received(alice, later), 90, "the next message at PandaLab")
    assert later not in await inbox_texts(bob)


# --- Restarts (last: they stop and start the module's bridge) -------------------------------------


async def test_a_restart_in_the_middle_of_a_backfill_duplicates_nothing(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice, dora = await pick(stack, http, "pandalab", 2)
    conversation, texts = await old_conversation(alice, dora, 40)
    await alice.add(conversation, native.user_id)
    room_id = await portal_of(stack, "pandalab", conversation)
    await native.accept_invites(room_id, timeout=60)
    await native.wait_for_message(room_id, lambda e: getattr(e, "body", None) in texts, 90)
    await stack.stop_bridge()  # as soon as the first message is in: the rest is underway
    await stack.start_bridge()

    new = unique("Après le redémarrage")
    await alice.post(conversation, text=new)
    await native.wait_for_message(room_id, text_is(new), 90)
    shown = [
        getattr(e, "body", None)
        for e in native.messages(room_id)
        if getattr(e, "body", None) in (*texts, new)
    ]
    assert shown == [*texts, new], "each message once, in order, the history first"


async def test_a_restart_in_the_middle_of_membership_changes_loses_nothing(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice, dora = await pick(stack, http, "pandalab", 2)
    [bob] = await pick(stack, http, "medipeps")
    conversation, room_id, _ = await opened(stack, alice, native)

    await stack.stop_bridge()
    await alice.add(conversation, bob.idnps)  # pushed while the bridge is down
    await invite(native, room_id, ghost(stack, "pandalab", dora))  # held by the homeserver
    await stack.start_bridge()

    await until_member(native, room_id, ghost(stack, "medipeps", bob), "join")
    await until_member(native, room_id, ghost(stack, "pandalab", dora), "join")

    async def dora_is_a_member() -> bool:
        return dora.idnps in (await alice.conversation(conversation))["members"]

    await wait_until(dora_is_a_member, 60, "Dora in the PandaLab conversation")
    following = unique("Tout le monde est là")
    await native.send_text(room_id, following)
    await wait_until(lambda: received(bob, following), 90, "the message at Bob")
    await wait_until(lambda: received(dora, following), 90, "the message at Dora")
