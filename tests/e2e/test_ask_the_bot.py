"""Ask the bot (issue 14, point 2), end to end through a real Synapse: a user of the homeserver
who is no operator DMs the bridge bot, finds a vendor professional by family name, opens a
portal with ``dm <IDNPS>`` and talks with them; admin commands are refused in French; the
homeserver's third-party user lookup returns the professional's ghost."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import ClientSession

from bridge.devtools.stack import LocalStack
from connectors.idnps import Idnps

from e2e_helpers import NATIVE_PASSWORD, as_native, received, unique, users_of
from helpers import wait_until
from matrix_user import MatrixUser, connect, text_is

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with LocalStack(Path(tmp_path_factory.mktemp("ask"))) as local:
        yield local


@pytest.fixture(scope="module")
async def clinician(stack: LocalStack) -> AsyncIterator[MatrixUser]:
    user_id, token = await stack.synapse.register_user("dr.martin", NATIVE_PASSWORD)
    user = await connect(stack.synapse.url, user_id, token)
    try:
        yield user
    finally:
        await user.close()


class Desk:
    """The clinician's DM with the bot: a line typed, the bot's answer read."""

    def __init__(self, user: MatrixUser, room_id: str, bot: str) -> None:
        self.user, self.room_id, self.bot = user, room_id, bot

    async def ask(self, line: str, expect: str) -> str:
        before = {e.event_id for e in self.user.messages(self.room_id)}
        await self.user.send_text(self.room_id, line)

        def answer(event: Any) -> bool:
            return (
                event.event_id not in before
                and event.sender == self.bot
                and expect in str(getattr(event, "body", ""))
            )

        event = await self.user.wait_for_message(self.room_id, answer, timeout=30)
        return str(event.body)


@pytest.fixture(scope="module")
async def desk(stack: LocalStack, clinician: MatrixUser) -> Desk:
    bot = stack.config.bot_mxid
    room_id = await clinician.create_dm(bot)
    await clinician.wait_for_message(
        room_id, lambda e: e.sender == bot and "find" in str(getattr(e, "body", "")), timeout=30
    )
    return Desk(clinician, room_id, bot)


async def test_find_dm_and_a_conversation_with_a_vendor_user(
    stack: LocalStack, http: ClientSession, desk: Desk, clinician: MatrixUser
) -> None:
    assert stack.bridge is not None
    nurse = (await users_of(stack, http, "pandalab"))[1]
    given, family = nurse.name.split(" ", 1)
    # What the bridge does whenever it meets a vendor user: the directory lists them and
    # their ghost (an import would list their name; the ghost comes with the vendor).
    await stack.bridge.portals.ghost("pandalab", Idnps(nurse.idnps))
    ghost = f"@eimis_pandalab_{nurse.idnps}:{stack.synapse.server_name}"

    found = await desk.ask(f"find {family.upper()}", "trouvé")
    assert nurse.bridged_name in found  # "Given FAMILY", as the bridge names people
    assert f"https://matrix.to/#/{ghost}" in found and "joignable via pandalab" in found

    assert (await desk.ask("find Zzyzzx", "Aucun professionnel")).startswith("Aucun")

    opened = await desk.ask(f"dm {nurse.idnps}", "Conversation ouverte")
    room_id = opened.rsplit("/", 1)[1]
    await clinician.accept_invites(room_id, timeout=30)
    hello = unique("Bonjour, pouvez-vous passer voir M. Durand ?")
    await clinician.send_text(room_id, hello)
    message = await wait_until(lambda: received(nurse, hello), 60, "the nurse to get it")
    assert message["sender"] == clinician.user_id

    conversation = str(message["conversation_id"])
    reply = unique("Oui, à 15 h")
    await nurse.send(conversation, reply)
    answer = await clinician.wait_for_message(room_id, text_is(reply), timeout=30)
    assert answer.sender == ghost

    again = await desk.ask(f"dm {nurse.idnps[1:]}", "déjà une conversation")  # the RPPS
    assert again.endswith(f"https://matrix.to/#/{room_id}")


async def test_admin_commands_are_refused_in_french(desk: Desk) -> None:
    refused = await desk.ask("status", "réservée aux administrateurs")
    assert "Connectors:" not in refused
    assert "find" in await desk.ask("aide", "find <nom")


async def test_the_homeservers_third_party_lookup_finds_the_ghost(
    stack: LocalStack, http: ClientSession, clinician: MatrixUser
) -> None:
    assert stack.bridge is not None
    doctor = (await users_of(stack, http, "pandalab"))[2]
    await stack.bridge.portals.ghost("pandalab", Idnps(doctor.idnps))
    ghost = f"@eimis_pandalab_{doctor.idnps}:{stack.synapse.server_name}"

    status, protocols = await as_native(clinician, "GET", "/thirdparty/protocols")
    assert status == 200 and "eimis" in protocols
    assert protocols["eimis"]["user_fields"] == ["idnps", "name"]

    status, users = await as_native(
        clinician, "GET", f"/thirdparty/user/eimis?idnps={quote(doctor.idnps)}"
    )
    assert status == 200, users
    assert [u["userid"] for u in users] == [ghost]
    family = doctor.name.split(" ", 1)[1]
    status, users = await as_native(
        clinician, "GET", f"/thirdparty/user/eimis?name={quote(family)}"
    )
    assert status == 200 and ghost in [u["userid"] for u in users]
