"""Erasure from the bridge's host (``eimis-bridge forget IDNPS``), end to end, in encrypted
portals: the database part runs even when the homeserver is unreachable and the Matrix part
waits for it (the running bridge finishes it); with the homeserver up, the command does it all.
The admin room's ``forget`` is tested in test_e2e_admin.py."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from aiohttp import ClientSession

from bridge.devtools.ports import free_port
from bridge.devtools.stack import LocalStack

from e2e_helpers import (
    app_users_of,
    as_native,
    encrypted_native,
    is_redacted,
    member_state,
    portal_of,
    unique,
)
from helpers import wait_until
from matrix_user import MatrixUser, text_is

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with LocalStack(Path(tmp_path_factory.mktemp("erasure")), encrypted=True) as local:
        yield local


@pytest.fixture
async def native(stack: LocalStack, tmp_path: Path) -> AsyncIterator[MatrixUser]:
    async with await encrypted_native(stack, tmp_path, "reader") as user:
        yield user


def forget(config: Path, idnps: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", "forget", "-c", str(config), idnps, "--yes"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )


def homeserver_unreachable(stack: LocalStack) -> Path:
    """The bridge's config, but with a homeserver URL nothing answers on."""
    raw = yaml.safe_load((stack.state_dir / "config.yaml").read_text(encoding="utf-8"))
    raw["homeserver"]["url"] = f"http://127.0.0.1:{free_port()}"
    path = stack.state_dir / "config-homeserver-down.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


async def test_cli_forget_without_the_homeserver_erases_the_database_part_and_the_rest_follows(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    assert stack.bridge is not None
    alice, dave = (await app_users_of(stack, http, "pandalab"))[:2]
    ghost = f"@eimis_pandalab_{alice.idnps}:{stack.synapse.server_name}"
    conversation = await alice.start_conversation([dave.idnps, native.user_id], unique("Chiffré"))
    first = unique("Allergie: pénicilline")
    await alice.post(conversation, text=first)
    room_id = await portal_of(stack, "pandalab", conversation)
    await native.accept_invites(room_id, timeout=30)
    event = await native.wait_for_message(room_id, text_is(first), timeout=60)
    assert native.client.rooms[room_id].encrypted
    db = stack.bridge.stores.db
    devices = "SELECT COUNT(*) FROM crypto_device WHERE user_id = $1"
    assert await db.fetchval(devices, ghost) == 1  # its device, keys and sessions

    # The bridge stores what comes but processes nothing: Alice's and Dave's next messages wait
    # in the inbox.
    await stack.stop_bridge()
    await stack.start_bridge(paused=True)
    hers, his = unique("Dose: 2 g"), unique("Vu, merci")
    await alice.post(conversation, text=hers)
    await dave.post(conversation, text=his)

    async def waiting_texts() -> set[str]:
        assert stack.bridge is not None
        return {
            str(item.payload.get("text")) async for item in stack.bridge.stores.inbox.unprocessed()
        }

    async def both_waiting() -> bool:
        return {hers, his} <= await waiting_texts()

    await wait_until(both_waiting, 30, "both messages in the inbox")

    done = await asyncio.to_thread(forget, homeserver_unreachable(stack), str(alice.idnps))
    assert done.returncode == 3, done.stdout + done.stderr
    # Her message waits in the inbox, and so may other events of hers, by timing (her vendor's
    # read marker, her ghost's echoes Synapse delivers again to the restarted bridge): at least
    # one, and none of Dave's (below).
    erased = re.search(r"(\d+) inbox item\(s\) of theirs", done.stdout)
    assert erased is not None and int(erased.group(1)) >= 1, done.stdout
    assert f"the Matrix part for {ghost} (1 more redaction(s)) is queued" in done.stdout
    waiting = await waiting_texts()
    assert hers not in waiting and his in waiting
    db = stack.bridge.stores.db
    assert await db.fetchval(devices, ghost) == 0
    assert await db.fetchval("SELECT COUNT(*) FROM ghost WHERE mxid = $1", ghost) == 0
    told = "SELECT COUNT(*) FROM portal_participant WHERE user_id = $1"
    assert await db.fetchval(told, ghost) == 0  # which vendor sides had her: forgotten too
    records = [
        r
        for r in await stack.bridge.stores.audit.query(connector="bridge", limit=1000)
        if r.direction == "erasure"
    ]
    assert [(r.recipient, r.outcome) for r in records] == [(str(alice.idnps), "partial")]
    assert records[0].sender and records[0].sender.startswith("cli:")
    assert all(text not in str(records[0].to_json()) for text in (first, hers))

    # The bridge at work again: it finishes the Matrix part, and Dave's message arrives, never
    # Alice's (it came before his, in the same conversation).
    await stack.stop_bridge()
    await stack.start_bridge()
    await native.wait_for_message(room_id, text_is(his), timeout=60)
    assert hers not in {getattr(e, "body", None) for e in native.messages(room_id)}

    async def completed() -> bool:
        assert stack.bridge is not None
        rows = await stack.bridge.stores.audit.query(connector="bridge", limit=1000)
        return any(r.direction == "erasure" and r.outcome == "completed" for r in rows)

    await wait_until(completed, 60, "the Matrix part done by the bridge")
    assert await is_redacted(native, room_id, event.event_id)
    left = await member_state(native, room_id, ghost)
    assert left.get("membership") == "leave" and "effacement" in str(left.get("reason"))
    # Her ghost leaving is the bridge forgetting her, not her leaving: no vendor is told.
    removals = (
        "SELECT COUNT(*) FROM outbox WHERE operation = 'remove_participants' AND room_id = $1"
    )
    assert await stack.bridge.stores.db.fetchval(removals, room_id) == 0
    assert not left.get("displayname")
    status, profile = await as_native(native, "GET", f"/profile/{ghost}")
    assert status == 404 or not (profile.get("displayname") or profile.get("avatar_url"))

    # With the homeserver up, the command does the Matrix part itself.
    his_event = next(e for e in native.messages(room_id) if getattr(e, "body", None) == his)
    done = await asyncio.to_thread(forget, stack.state_dir / "config.yaml", str(dave.idnps))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 room(s) left" in done.stdout
    assert await is_redacted(native, room_id, his_event.event_id)
    dave_ghost = f"@eimis_pandalab_{dave.idnps}:{stack.synapse.server_name}"
    assert (await member_state(native, room_id, dave_ghost)).get("membership") == "leave"
