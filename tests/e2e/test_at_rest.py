"""Secrets and content at rest, end to end (issue 11, points 14 and 15) on an encrypted stack:
a real Synapse, the bridge, the sandboxes, matrix-nio users that encrypt.

- A connector's shared secret is shown in an encrypted admin room (once), where the homeserver
  holds ciphertext only (the unencrypted case: test_e2e_admin.py).
- A portal's title stays out of the homeserver's room state (``portal.titles_in_room_state``
  off), and the vendors still get it.
- What waits for a vendor is sealed in the bridge's database; once delivered it is in neither
  the database file nor its write-ahead log.
- The stack's files holding content or secrets are the owner's only.
"""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from bridge.devtools.stack import LocalStack

from e2e_helpers import (
    NATIVE_PASSWORD,
    app_users_of,
    conversation_titled,
    counter,
    portal_of,
    received,
    unique,
    vendor_dm,
)
from helpers import wait_until
from matrix_user import MatrixUser, connect
from synapse_db import room_holds_text

pytestmark = pytest.mark.e2e

ADMIN = "securite"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    state = Path(tmp_path_factory.mktemp("at-rest"))
    overrides = {
        "database": {"url": f"sqlite:{state / 'bridge.db'}", "wal_truncate_interval_s": 0.2},
        "admin": {"admins": [f"@{ADMIN}:eimis.localhost"]},
    }
    async with LocalStack(state, config_overrides=overrides, encrypted=True) as local:
        yield local


@pytest.fixture(scope="module")
async def operator(
    stack: LocalStack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[MatrixUser, str]]:
    """The operator, on a device that encrypts, in an encrypted direct chat with the bot."""
    user_id, token = await stack.synapse.register_user(ADMIN, NATIVE_PASSWORD)
    store = Path(tmp_path_factory.mktemp("operator-device"))
    user = await connect(stack.synapse.url, user_id, token, encrypted=True, store_dir=store)
    try:
        assert stack.config.bot_mxid == BOT
        room_id = await user.create_room(invite=[BOT], is_direct=True, encrypted=True)
        await user.wait_for_message(room_id, _body_has("admin room"), timeout=60)
        yield user, room_id
    finally:
        await user.close()


BOT = "@eimis_bot:eimis.localhost"


def _body_has(fragment: str, before: set[str] | None = None) -> Any:
    """An answer of the bot's (after ``before``) that says ``fragment``."""

    def match(event: Any) -> bool:
        return (
            event.sender == BOT
            and fragment in str(getattr(event, "body", ""))
            and (before is None or event.event_id not in before)
        )

    return match


async def run(operator: tuple[MatrixUser, str], command: str, expect: str) -> str:
    user, room_id = operator
    before = {e.event_id for e in user.messages(room_id)}
    await user.send_text(room_id, command)
    event = await user.wait_for_message(room_id, _body_has(expect, before), timeout=60)
    assert getattr(event, "decrypted", False), "the bot's answer was not encrypted"
    return str(event.body)


async def test_a_connector_secret_is_shown_once_in_an_encrypted_admin_room(
    stack: LocalStack, operator: tuple[MatrixUser, str]
) -> None:
    name = f"acme{next(counter)}"
    url = stack.sandboxes["webhook"].url
    added = await run(operator, f"connector add {name} --type webhook --set base_url={url}", name)
    assert "shown this once" in added, added
    secret = added.strip().splitlines()[-1]
    assert len(secret) >= 32 and " " not in secret
    listed = await run(operator, "connectors", name)
    assert secret not in listed  # never shown again
    await run(operator, f"connector rotate-secret {name} --grace 1", "Answer 'yes'")
    new_secret = (await run(operator, "yes", "New shared secret")).strip().splitlines()[-1]
    assert new_secret != secret and len(new_secret) >= 32
    # The homeserver stored ciphertext; the bridge's database holds both secrets sealed.
    room_id = operator[1]
    assert not room_holds_text(stack.synapse, room_id, secret)
    assert not room_holds_text(stack.synapse, room_id, new_secret)
    assert stack.bridge is not None
    rows = await stack.bridge.stores.db.fetch("SELECT sealed FROM connector_secret")
    assert rows and all(s not in str(r["sealed"]) for r in rows for s in (secret, new_secret))
    await run(operator, f"connector remove {name} --force", "Answer 'yes'")
    await run(operator, "yes", "removed")


async def test_a_portal_has_no_title_in_room_state_and_vendors_still_get_it(
    stack: LocalStack, http: ClientSession, tmp_path: Path
) -> None:
    assert stack.config.portal.titles_in_room_state is False  # the default
    alice = (await app_users_of(stack, http, "pandalab"))[0]
    bob = (await app_users_of(stack, http, "medipeps"))[0]
    user_id, token = await stack.synapse.register_user(f"doc{next(counter)}", NATIVE_PASSWORD)
    native = await connect(
        stack.synapse.url, user_id, token, encrypted=True, store_dir=tmp_path / "doc"
    )
    async with native:
        title = unique("Suivi de M. Dupont, chambre 12")
        conversation = await alice.start_conversation([bob.idnps, native.user_id], title)
        hello = unique("Bonjour")
        await alice.post(conversation, text=hello)
        room_id = await portal_of(stack, "pandalab", conversation)
        await wait_until(lambda: received(bob, hello), 60, "Bob to get the message")
        assert await conversation_titled(bob, title) is not None  # the vendor got the title
        # The Matrix members read it end-to-end encrypted, from the bot.
        await native.accept_invites(room_id, timeout=30)
        notice = await native.wait_for_message(
            room_id, lambda m: getattr(m, "body", None) == f"Conversation : {title}", 60
        )
        assert notice.sender == BOT and notice.decrypted
    assert stack.bridge is not None
    assert await stack.bridge.homeserver.get_state(BOT, room_id, "m.room.name") is None
    assert await stack.bridge.homeserver.get_state(BOT, room_id, "m.room.topic") is None
    assert not room_holds_text(stack.synapse, room_id, title)  # in no event, state or not
    assert not room_holds_text(stack.synapse, room_id, "M. Dupont")


def bridge_files(stack: LocalStack) -> bytes:
    """The bridge's database file and its write-ahead log, as on disk."""
    path = stack.state_dir / "bridge.db"
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


async def test_queued_content_is_sealed_and_delivered_content_leaves_the_files(
    stack: LocalStack, http: ClientSession, tmp_path: Path
) -> None:
    assert stack.bridge is not None
    db = stack.bridge.stores.db
    alice = (await app_users_of(stack, http, "pandalab"))[1]
    user_id, token = await stack.synapse.register_user(f"nurse{next(counter)}", NATIVE_PASSWORD)
    native = await connect(
        stack.synapse.url, user_id, token, encrypted=True, store_dir=tmp_path / "nurse"
    )
    async with native:
        hello = unique("Patient transfere en cardiologie")
        conversation, room_id = await vendor_dm(stack, alice, "pandalab", native, hello)
        sandbox = stack.sandboxes["pandalab"]
        await sandbox.stop()  # the vendor is down: what the nurse says waits in the outbox
        try:
            waiting = unique("Allergie: penicilline, ne pas administrer")
            await native.send_text(room_id, waiting)

            async def queued() -> Any:
                return await db.fetch(
                    "SELECT * FROM outbox WHERE room_id = $1 AND state IN ('pending', 'dead')",
                    room_id,
                )

            rows = await wait_until(queued, 60, "the message queued for the vendor")
            stored = json.dumps([[str(v) for v in tuple(r)] for r in rows])
            assert "penicilline" not in stored and str(rows[0]["payload"]).startswith("v1:")
            assert b"penicilline" not in bridge_files(stack)
        finally:
            await sandbox.start()
        await wait_until(lambda: received(alice, waiting), 120, "the vendor to get it")
        # The vendor's own message went through the inbox in clear; once processed and the log
        # emptied (every 0.2 s here), neither it nor the nurse's message is on disk.
        reply = unique("Bien recu, merci pour la cardiologie")
        await alice.post(conversation, text=reply)
        await native.wait_for_message(room_id, lambda m: getattr(m, "body", None) == reply, 60)
        needles = [t.encode() for t in (hello, waiting, reply)]

        async def gone() -> bool:
            files = bridge_files(stack)
            return not any(n in files for n in needles)

        await wait_until(gone, 30, "the delivered content to leave the bridge's files")


def test_the_stack_files_holding_content_or_secrets_are_the_owners_only(
    stack: LocalStack,
) -> None:
    state = stack.state_dir

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(state) == 0o700
    for name in ("secrets.key", "config.yaml", "registration.yaml", "bridge.db", "bridge.db-shm"):
        assert mode(state / name) == 0o600, name
    wal = state / "bridge.db-wal"
    assert not wal.exists() or mode(wal) == 0o600
    assert mode(stack.synapse.state_dir) == 0o700
