"""Professionals found from any Matrix client (issue 14, point 1), end to end through a real
Synapse (``user_directory.search_all_users``, the ghosts in a non-exclusive namespace): the
bridge publishes the directory's ghosts; a native matrix-nio user with encryption finds a vendor
professional by family name and by IDNPS in the homeserver's user directory, named
"<Given> <FAMILY> - <Profession>", opens an encrypted DM with them and their message reaches the
vendor user; a name change in the directory reaches the search after the next pass.

The first test relies on the bridge's own start pass (the PandaLab connector lists its users,
the bridge records and publishes them); the second changes a person's name the way a later
listing pass records it (``record_listed_users``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from bridge.devtools.stack import LocalStack
from connectors.base import RemoteUser
from connectors.idnps import Idnps

from e2e_helpers import as_native, encrypted_native, received, unique, users_of
from helpers import wait_until
from matrix_user import MatrixUser

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    overrides = {
        "encryption": {"enabled": True, "default": True},
        "directory": {"sync_interval_s": 0.5, "publish_interval_s": 3600},
    }
    async with LocalStack(
        Path(tmp_path_factory.mktemp("discovery")), encrypted=True, config_overrides=overrides
    ) as local:
        yield local


@pytest.fixture(scope="module")
async def clinician(
    stack: LocalStack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[MatrixUser]:
    user = await encrypted_native(stack, Path(tmp_path_factory.mktemp("nio")), "dr.search")
    async with user:
        yield user


async def search(user: MatrixUser, term: str) -> list[dict[str, Any]]:
    status, body = await as_native(
        user, "POST", "/user_directory/search", {"search_term": term, "limit": 20}
    )
    assert status == 200, body
    return list(body["results"])


async def found(user: MatrixUser, term: str, mxid: str, name: str) -> bool:
    return any(
        r["user_id"] == mxid and r.get("display_name") == name for r in await search(user, term)
    )


async def list_in_directory(stack: LocalStack, connector: str, user: RemoteUser) -> None:
    """What a connector's listing pass records for one of its users."""
    assert stack.bridge is not None
    directory = stack.bridge.stores.directory
    await directory.record_listed_users(
        connector,
        [user],
        lambda idnps: stack.bridge.ids.mxid(connector, Idnps(idnps)),  # type: ignore[union-attr]
        await directory.next_stamp(),
    )


async def test_a_vendor_professional_is_found_by_name_and_idnps_and_dmed(
    stack: LocalStack, http: ClientSession, clinician: MatrixUser
) -> None:
    assert stack.bridge is not None
    nurse = (await users_of(stack, http, "pandalab"))[1]
    connector = stack.bridge.connectors.get("pandalab")
    assert connector is not None
    described = await connector.get_user(Idnps(nurse.idnps))
    assert described is not None
    ghost = f"@eimis_pandalab_{nurse.idnps}:{stack.synapse.server_name}"
    name = described.display_name
    assert " - " in name  # "<Given> <FAMILY> - <Profession>"

    # Nothing seeds the directory: the bridge listed the connector's users at start and published
    # them; the homeserver's user directory updates on its own.
    family = described.family_name
    await wait_until(
        lambda: found(clinician, family, ghost, name), 90, "the ghost in the user directory"
    )
    assert await found(clinician, nurse.idnps, ghost, name), "found by IDNPS too"

    room_id = await clinician.create_room(invite=[ghost], is_direct=True, encrypted=True)
    await clinician.wait_for_join(room_id, ghost, timeout=60)
    await wait_until(
        lambda: stack.bridge.stores.portals.get(room_id),  # type: ignore[union-attr]
        60,
        "the portal",
    )
    hello = unique("Bonjour, trouvée depuis la recherche")
    await clinician.send_text(room_id, hello)
    message = await wait_until(lambda: received(nurse, hello), 90, "the nurse to get it")
    assert message["sender"] == clinician.user_id


async def test_a_name_change_reaches_the_search(
    stack: LocalStack, http: ClientSession, clinician: MatrixUser
) -> None:
    assert stack.bridge is not None
    doctor = (await users_of(stack, http, "pandalab"))[2]
    connector = stack.bridge.connectors.get("pandalab")
    assert connector is not None
    described = await connector.get_user(Idnps(doctor.idnps))
    assert described is not None
    ghost = f"@eimis_pandalab_{doctor.idnps}:{stack.synapse.server_name}"
    await list_in_directory(stack, "pandalab", described)
    await wait_until(
        lambda: found(clinician, described.family_name, ghost, described.display_name),
        90,
        "the ghost under its first name",
    )

    renamed = RemoteUser(
        described.idnps, described.given_name, "Zephirin-Marchal", described.profession
    )
    await list_in_directory(stack, "pandalab", renamed)

    await wait_until(
        lambda: found(clinician, "Zephirin", ghost, renamed.display_name),
        90,
        "the ghost under its new name",
    )
