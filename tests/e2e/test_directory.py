"""The directory end to end, through a real Synapse: a vendor user reaches, by IDNPS, a
professional the bridge knows only from an imported directory (a native Matrix account), and a
ghost's display name follows a directory import."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession

from bridge.cli import main
from bridge.devtools.stack import LocalStack
from bridge.directory.sample import HEADER, extract_line

from e2e_helpers import portal_of, practitioner_bundle, received, unique, users_of
from helpers import wait_until
from matrix_user import MatrixUser, connect, text_is

pytestmark = pytest.mark.e2e

DIRECTORY_ONLY = "810099000050"  # on no vendor: only the directory knows them


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    overrides = {"directory": {"sync_interval_s": 0.5}}
    async with LocalStack(
        Path(tmp_path_factory.mktemp("stack")), config_overrides=overrides
    ) as local:
        yield local


async def native_user(stack: LocalStack, localpart: str) -> MatrixUser:
    user_id, token = await stack.synapse.register_user(localpart, "correct horse battery")
    return await connect(stack.synapse.url, user_id, token)


async def directory_cli(stack: LocalStack, *args: str) -> int:
    """The operator's command, against the running stack's config and database."""
    config = stack.state_dir / "config.yaml"
    action, *rest = args
    return await asyncio.to_thread(main, ["directory", action, "-c", str(config), *rest])


async def test_vendor_user_reaches_by_idnps_a_native_account_known_only_to_the_directory(
    stack: LocalStack, http: ClientSession, tmp_path: Path
) -> None:
    native = await native_user(stack, "claire.petit")
    try:
        bundle = tmp_path / "directory.json"
        bundle.write_text(
            json.dumps(
                practitioner_bundle(
                    DIRECTORY_ONLY, "Petit", "Claire", native.user_id, profession="50"
                )
            ),
            encoding="utf-8",
        )
        assert await directory_cli(stack, "import", str(bundle)) == 0

        alice = (await users_of(stack, http, "pandalab"))[0]
        title = unique("PandaLab to a directory entry")
        conversation = await alice.start_conversation([DIRECTORY_ONLY], title)
        hello = unique("Bonjour, avis obstétrical ?")
        await alice.send(conversation, hello)

        room_id = await portal_of(stack, "pandalab", conversation)
        await native.accept_invites(room_id, timeout=30)
        message = await native.wait_for_message(room_id, text_is(hello), timeout=30)
        assert message.sender == f"@eimis_pandalab_{alice.idnps}:{stack.synapse.server_name}"

        reply = unique("Oui, j'arrive")
        await native.send_text(room_id, reply)
        answer = await wait_until(lambda: received(alice, reply), 30, "Alice to get the reply")
        assert answer["sender"] == native.user_id
    finally:
        await native.close()


async def test_a_ghosts_display_name_follows_a_directory_import(
    stack: LocalStack, http: ClientSession, tmp_path: Path
) -> None:
    thomas = (await users_of(stack, http, "pandalab"))[4]
    ghost = f"@eimis_pandalab_{thomas.idnps}:{stack.synapse.server_name}"
    native = await native_user(stack, "observer")
    try:
        conversation = await thomas.start_conversation([native.user_id], unique("Names"))
        hello = unique("Bonjour")
        await thomas.send(conversation, hello)
        room_id = await portal_of(stack, "pandalab", conversation)
        await native.accept_invites(room_id, timeout=30)
        await native.wait_for_message(room_id, text_is(hello), timeout=30)
        before = (await native.client.get_displayname(ghost)).displayname
        assert before == "Thomas LEFÈVRE - Masseur-kinésithérapeute"  # the vendor's, until now

        extract = tmp_path / "PS_LibreAcces_Personne_activite.txt"
        line = extract_line(thomas.idnps, "LEFÈVRE", "THOMAS", "70", "Masseur-Kinésithérapeute")
        extract.write_text(f"{HEADER}\n{line}\n", encoding="utf-8")
        assert await directory_cli(stack, "import", str(extract)) == 0

        wanted = "Thomas LEFÈVRE - Masseur-Kinésithérapeute"

        async def renamed() -> bool:
            return (await native.client.get_displayname(ghost)).displayname == wanted

        await wait_until(renamed, 30, "the ghost's new display name")
        assert stack.bridge is not None
        bridge = stack.bridge

        async def recorded() -> bool:  # the bridge renames on the homeserver, then records it
            row = await bridge.stores.ghosts.get(ghost)
            return row is not None and row.display_name == wanted

        await wait_until(recorded, 30, "the ghost's new name in the bridge's table")
    finally:
        await native.close()
