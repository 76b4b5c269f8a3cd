"""The admin room, end to end: an operator (a matrix-nio user on a real Synapse) runs the bridge
from a direct chat with its bot; anyone else gets the help desk, never a command; alerts arrive
grouped."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from mautrix.types import RoomID, UserID

from bridge.db.portal_join import PortalJoinStore
from bridge.devtools.stack import LocalStack
from bridge.secrets import generate_key

from e2e_helpers import (
    app_users_of,
    as_native,
    counter,
    inbox_texts,
    is_redacted,
    portal_of,
    received,
    unique,
    users_of,
)
from helpers import wait_until
from matrix_user import MatrixUser, connect, text_is
from synapse_db import room_holds_text

pytestmark = pytest.mark.e2e

ADMIN = "operator"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    state = Path(tmp_path_factory.mktemp("admin"))
    key = state / "secrets.key"
    key.write_text(generate_key())
    key.chmod(0o600)
    overrides = {
        "secrets": {"key_file": str(key)},
        "admin": {
            "admins": [f"@{ADMIN}:eimis.localhost"],
            "notify_debounce_s": 0.5,
            "stalled_after_s": 60,
        },
    }
    async with LocalStack(state, config_overrides=overrides) as local:
        yield local


async def _user(stack: LocalStack, localpart: str) -> MatrixUser:
    user_id, token = await stack.synapse.register_user(localpart, "correct horse battery")
    return await connect(stack.synapse.url, user_id, token)


@pytest.fixture(scope="module")
async def console(stack: LocalStack) -> AsyncIterator[Console]:
    operator = await _user(stack, ADMIN)
    try:
        room_id = await operator.create_dm(stack.config.bot_mxid)
        await operator.wait_for_message(room_id, _from_bot("admin room"), timeout=30)
        yield Console(operator, room_id, stack.config.bot_mxid)
    finally:
        await operator.close()


def _from_bot(fragment: str, bot: str = "") -> Any:
    def match(event: Any) -> bool:
        return (not bot or event.sender == bot) and fragment in str(getattr(event, "body", ""))

    return match


class Console:
    """The operator typing commands and reading the bot's answers."""

    def __init__(self, user: MatrixUser, room_id: str, bot: str) -> None:
        self.user, self.room_id, self.bot = user, room_id, bot

    async def run(self, command: str, expect: str, timeout: float = 30) -> str:
        """Send a command; return the bot's first answer after it that contains ``expect``."""
        before = {e.event_id for e in self.user.messages(self.room_id)}
        await self.user.send_text(self.room_id, command)

        def answer(event: Any) -> bool:
            return (
                event.event_id not in before
                and event.sender == self.bot
                and expect in str(event.body)
            )

        event = await self.user.wait_for_message(self.room_id, answer, timeout=timeout)
        return str(event.body)


async def test_help_lists_every_command_and_h_explains_one(console: Console) -> None:
    text = await console.run("help", "COMMAND")
    for command in (
        "status", "connectors", "connector", "queue", "dead-letters", "retry", "discard",
        "portals", "portal", "whois", "trust", "directory", "audit", "forget", "version",
    ):  # fmt: skip
        assert command in text, command
    detail = await console.run("discard -h", "usage: discard")
    assert "dead letter id" in detail


async def test_a_wrong_command_says_what_was_wrong(console: Console) -> None:
    text = await console.run("frobnicate", "invalid choice")
    assert "frobnicate" in text and "help" in text
    text = await console.run("retry", "required")
    assert "id" in text
    text = await console.run("whois 123", "Invalid IDNPS")
    assert "starts with '8' (RPPS) or '0' (ADELI)" in text  # the rule that failed


async def test_status_names_the_homeserver_the_database_and_each_connector(
    console: Console,
) -> None:
    text = await console.run("status", "Connectors:")
    assert "Homeserver" in text and "answering" in text
    assert "Database: answering" in text
    assert "Encryption: off" in text  # this stack's bridge does not encrypt
    assert "pandalab" in text and "medipeps" in text
    assert "eimis-bridge" in await console.run("version", "eimis-bridge")


async def test_whois_and_portals_after_a_conversation(
    console: Console, stack: LocalStack, http: ClientSession
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[0]
    bob = (await users_of(stack, http, "medipeps"))[0]
    conversation = await alice.start_conversation([bob.idnps], unique("Staff"))
    text = await console.run(f"whois {alice.idnps}", f"IDNPS {alice.idnps}")
    assert f"eimis_pandalab_{alice.idnps}" in text
    room_id = await portal_of(stack, "pandalab", conversation)
    assert room_id in await console.run("portals medipeps", "portal(s) matching")
    assert "No portal matches." in await console.run("portals no-such-thing", "portal")
    detail = await console.run(f"portal {room_id}", "voice")
    assert "pandalab: conversation" in detail and "medipeps: conversation" in detail
    assert "No dead letter." in await console.run("dead-letters", "dead letter")


async def test_trust_remove_asks_for_confirmation_and_only_yes_does_it(
    console: Console, stack: LocalStack
) -> None:
    server = f"hs{next(counter)}.example"
    assert "trusted" in await console.run(f"trust add {server}", server)
    assert server in await console.run("trust list", "Trusted servers")
    prompt = await console.run(f"trust remove {server}", "Answer 'yes'")
    assert server in prompt
    assert "Cancelled" in await console.run("no", "Cancelled")
    assert server in await console.run("trust list", "Trusted servers")
    await console.run(f"trust remove {server}", "Answer 'yes'")
    assert "no longer trusted" in await console.run("yes", "no longer trusted")
    assert server not in await console.run("trust list", "Trusted servers")


async def test_someone_else_gets_the_help_desk_and_no_admin_command(
    console: Console, stack: LocalStack
) -> None:
    stranger = await _user(stack, f"stranger{next(counter)}")
    bot = stack.config.bot_mxid
    try:
        # A user of the homeserver who is no operator: their DM is the bot's help desk (issue
        # 14), where admin commands are refused in French (tests/e2e/test_ask_the_bot.py).
        room_id = await stranger.create_dm(bot)
        await stranger.wait_for_message(room_id, _from_bot("Je trouve", bot), timeout=30)
        await stranger.send_text(room_id, "status")
        await stranger.wait_for_message(
            room_id, _from_bot("réservée aux administrateurs", bot), timeout=30
        )
        # In the admin room itself, a guest the operator invited is refused.
        await console.user.client.room_invite(console.room_id, stranger.user_id)
        await stranger.accept_invites(console.room_id, timeout=30)
        await stranger.send_text(console.room_id, "status")
        answer = await stranger.wait_for_message(
            console.room_id, _from_bot("que des administrateurs de ce pont", bot), timeout=30
        )
        assert "Connectors:" not in str(answer.body)
    finally:
        await stranger.close()


async def test_a_vendor_going_down_and_its_return_are_posted(
    console: Console, stack: LocalStack, http: ClientSession
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[1]
    bob = (await users_of(stack, http, "medipeps"))[1]
    conversation = await alice.start_conversation([bob.idnps], unique("Outage"))
    hello = unique("avant la panne")
    await alice.send(conversation, hello)
    await wait_until(lambda: received(bob, hello), 60, "Bob to get the message")
    sandbox = stack.sandboxes["medipeps"]
    await sandbox.stop()
    try:
        await alice.send(conversation, unique("pendant la panne"))
        await console.user.wait_for_message(
            console.room_id, _from_bot("medipeps is down", console.bot), timeout=60
        )
    finally:
        await sandbox.start()
    await console.user.wait_for_message(
        console.room_id, _from_bot("medipeps is back", console.bot), timeout=90
    )


async def test_a_connector_secret_is_not_shown_in_an_unencrypted_admin_room(
    console: Console, stack: LocalStack
) -> None:
    """Issue 11, point 14: the homeserver stores this room in clear, so a shared secret is not
    posted here; the operator is told to use the CLI (or an encrypted room: shown once there,
    test_e2e_at_rest.py). Nothing is added or rotated half-way."""
    name = f"acme{next(counter)}"
    url = stack.sandboxes["webhook"].url
    added = await console.run(
        f"connector add {name} --type webhook --set base_url={url}", "not end-to-end encrypted"
    )
    assert f"eimis-bridge connector add {name}" in added and "shown this once" not in added
    assert name not in await console.run("connectors", "pandalab")
    assert stack.bridge is not None
    assert await stack.bridge.stores.db.fetch("SELECT 1 FROM connector_secret") == []
    rotated = await console.run("connector rotate-secret pandalab", "not end-to-end encrypted")
    assert "eimis-bridge connector rotate-secret pandalab" in rotated


async def test_directory_import_of_a_secret_file_never_quotes_it_in_the_room(
    console: Console, stack: LocalStack, tmp_path: Path
) -> None:
    """Issue 11, point 14: `directory import` given the bridge's own secrets key, or any file
    whose first line is a secret, says what is wrong by line, column and rule; the content is in
    none of the room's events, as the operator's client or the homeserver's database sees them."""
    key_file = Path(stack.config.secrets.key_file or "")
    key = key_file.read_text().strip()
    token = "sk_live_" + generate_key().replace("+", "x").replace("/", "y").rstrip("=")
    env_file = tmp_path / "vendor.env"
    env_file.write_text(f"VENDOR_API_TOKEN={token}\nOTHER=1\n")
    json_file = tmp_path / "token.json"
    json_file.write_text(f'{{"access_token": "{token}",, "scope": "all"}}')
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"resourceType": token, "entry": []}))
    answers = []
    for path, rule in (
        (key_file, "line 1"),
        (env_file, "line 1"),
        (json_file, "line 1, column"),
        (bundle, "not a FHIR Bundle"),
    ):
        text = await console.run(f"directory import {path}", f"Cannot import {path}")
        assert rule in text, text
        answers.append(text)
    secrets = (key, token, key[:16], token[8:24])
    assert not any(s in a for s in secrets for a in answers)
    await console.user.sync()
    bodies = [str(getattr(e, "body", "")) for e in console.user.messages(console.room_id)]
    assert not any(s in b for s in secrets for b in bodies)
    assert not any(room_holds_text(stack.synapse, console.room_id, s) for s in secrets)


async def _queued_bodies(stack: LocalStack, connector: str, room_id: str) -> dict[str, str]:
    """Body -> sender IDNPS of what waits for ``connector`` in the room (parsed payloads)."""
    assert stack.bridge is not None
    items = await stack.bridge.stores.outbox.waiting(room_id, connector)
    return {
        str(item.payload["content"]["body"]): str(item.payload["sender"].get("idnps"))
        for item in items
        if "content" in item.payload
    }


async def test_forget_erases_a_professional_in_every_portal_and_keeps_a_content_free_record(
    console: Console, stack: LocalStack, http: ClientSession
) -> None:
    assert stack.bridge is not None
    n = next(counter)
    pandalab = await app_users_of(stack, http, "pandalab")
    alice, carol = pandalab[4], pandalab[3]  # no other test of this module uses them
    bob = (await app_users_of(stack, http, "medipeps"))[4]
    ghost = f"@eimis_pandalab_{alice.idnps}:eimis.localhost"
    reader = await _user(stack, f"reader{n}")
    try:
        # Alice (the professional to erase) in two portals the native reader is in: a group
        # with Bob (another vendor) and Carol (hers), and a direct chat.
        group = await alice.start_conversation(
            [bob.idnps, carol.idnps, reader.user_id], unique("Staff")
        )
        direct = await alice.start_conversation([reader.user_id], unique("DM"))
        rooms = [await portal_of(stack, "pandalab", c) for c in (group, direct)]
        for room_id in rooms:
            await reader.accept_invites(room_id, timeout=30)
        # The reader's joins are recorded (who, which portal, when).
        joins = PortalJoinStore(stack.bridge.stores.db)

        async def joined_recorded() -> bool:
            recorded = [j.user_id for room in rooms for j in await joins.of_room(room)]
            return recorded.count(reader.user_id) == 2

        await wait_until(joined_recorded, 30, "the joins recorded")
        said = {unique("Allergie: pénicilline"): rooms[0], unique("RDV demain"): rooms[1]}
        await alice.post(group, text=list(said)[0])
        await alice.post(direct, text=list(said)[1])
        events = {
            text: (await reader.wait_for_message(room_id, text_is(text), timeout=30)).event_id
            for text, room_id in said.items()
        }
        # Her ghost is no longer in the direct chat (removed by the bot, which keeps its power
        # there): what she said there is found in the audit log and redacted by the bot.
        await stack.bridge.homeserver.bot.kick_user(RoomID(rooms[1]), UserID(ghost), "test")
        # Medipeps down: what Alice and Carol say next waits in the outbox for Bob.
        sandbox = stack.sandboxes["medipeps"]
        await sandbox.stop()
        try:
            hers, others = unique("Dose: 2 g"), unique("Vu, merci")
            await alice.post(group, text=hers)
            events[hers] = (
                await reader.wait_for_message(rooms[0], text_is(hers), timeout=30)
            ).event_id
            await carol.post(group, text=others)
            await reader.wait_for_message(rooms[0], text_is(others), timeout=30)

            async def both_queued() -> bool:
                return {hers, others} <= set(await _queued_bodies(stack, "medipeps", rooms[0]))

            await wait_until(both_queued, 30, "both deliveries queued")

            prompt = await console.run(f"forget {alice.idnps}", "Answer 'yes'")
            assert "1 ghost(s)" in prompt
            report = await console.run("yes", "Erased", timeout=60)
            assert "1 room(s) left" in report and "is queued" not in report
            queued = await _queued_bodies(stack, "medipeps", rooms[0])
            assert hers not in queued and queued.get(others) == str(carol.idnps)
        finally:
            await sandbox.start()
        # Bob gets Carol's message, then a later marker; never Alice's erased one.
        marker = unique("fin")
        await carol.post(group, text=marker)
        await wait_until(lambda: received(bob, marker), 90, "the marker at Bob")
        texts = await inbox_texts(bob)
        assert others in texts and hers not in texts
        # Every message of Alice's ghost is redacted, as the native reader reads it.
        for text, event_id in events.items():
            room_id = said.get(text, rooms[0])
            assert await is_redacted(reader, room_id, event_id), text
        # The ghost left both portals; its profile is empty.
        for room_id in rooms:
            status, members = await as_native(reader, "GET", f"/rooms/{room_id}/joined_members")
            assert status == 200 and ghost not in members["joined"]
        status, profile = await as_native(reader, "GET", f"/profile/{ghost}")
        assert status == 404 or not (profile.get("displayname") or profile.get("avatar_url"))
        # Nothing of her is left in the directory; the audit log says who asked, whom, counts.
        assert "not in the directory" in await console.run(f"whois {alice.idnps}", "IDNPS")
        records = [
            r
            for r in await stack.bridge.stores.audit.query(connector="bridge", limit=1000)
            if r.direction == "erasure" and r.recipient == str(alice.idnps)
        ]
        assert len(records) == 1 and records[0].outcome == "done"
        assert records[0].sender == console.user.user_id
        flat = " ".join(str(v) for v in records[0].to_json().values())
        assert all(text not in flat for text in events)
    finally:
        await reader.close()


def _host_cli(stack: LocalStack, *argv: str) -> str:
    """``eimis-bridge ARGV -c <the stack's config>`` on the bridge's host: its output."""
    config = str(stack.state_dir / "config.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "bridge", argv[0], "-c", config, *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.rstrip("\n")


def _steady(queue: str) -> str:
    """A ``queue`` answer without what moves while the vendor is down: ages and tries."""
    return re.sub(r"^( *\d+) +\d+ (s|min|h|d) +\d+ ", r"\1 AGE TRIES ", queue, flags=re.M)


async def test_whois_and_queue_say_the_same_in_the_room_and_on_the_host(
    console: Console, stack: LocalStack, http: ClientSession
) -> None:
    """One formatting for both front ends: what the room answers is what the CLI prints from
    the bridge's host (which reads the database only, and works when Matrix is down)."""
    alice = (await users_of(stack, http, "pandalab"))[2]
    bob = (await users_of(stack, http, "medipeps"))[2]
    conversation = await alice.start_conversation([bob.idnps], unique("Same"))
    await portal_of(stack, "pandalab", conversation)  # her ghost exists from now on
    assert stack.bridge is not None
    ghosts = stack.bridge.stores.ghosts

    async def ghost_recorded() -> bool:
        return bool(await ghosts.of_professional(str(alice.idnps)))

    await wait_until(ghost_recorded, 30, "her ghost recorded")
    room_text = await console.run(f"whois {alice.idnps}", f"IDNPS {alice.idnps}")
    host_text = await asyncio.to_thread(_host_cli, stack, "whois", str(alice.idnps))
    assert room_text == host_text and f"eimis_pandalab_{alice.idnps}" in host_text

    reports = stack.bridge.stores.reports
    sandbox = stack.sandboxes["medipeps"]
    await sandbox.stop()
    try:
        await alice.send(conversation, unique("en attente"))

        async def queued() -> bool:
            return bool(await reports.queue("medipeps"))

        await wait_until(queued, 60, "a delivery waiting for medipeps")
        room_text = await console.run("queue medipeps", "operation")
        host_text = await asyncio.to_thread(_host_cli, stack, "queue", "medipeps")
    finally:
        await sandbox.start()
    assert _steady(room_text) == _steady(host_text)
    assert "AGE TRIES" in _steady(host_text) and "tries" in host_text


async def test_trust_add_of_our_own_or_a_config_server_stores_nothing(
    console: Console, stack: LocalStack
) -> None:
    """The room used to store such a server; now it answers as the CLI does."""
    text = await console.run("trust add eimis.localhost", "eimis.localhost")
    assert text == "eimis.localhost is already trusted (config)."
    assert stack.bridge is not None
    assert "eimis.localhost" not in [
        s.server_name for s in await stack.bridge.stores.trusted_servers.list()
    ]
