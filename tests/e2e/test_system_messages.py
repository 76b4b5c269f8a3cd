"""System messages to vendor users, through one real Synapse (issue 14 point 4): a vendor user
who starts a conversation with nobody the bridge can reach gets the conversation with a French
system message in it, not a silent void; a vendor without system messages gets it from
"EIMIS"."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from bridge.devtools.demo import SandboxUser
from bridge.devtools.stack import LocalStack
from connectors.idnps import luhn_check_digit

from e2e_helpers import counter, inbox_message, portal_of, unique, users_of
from helpers import wait_until

pytestmark = pytest.mark.e2e

UNTRUSTED = "evil.localhost"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with LocalStack(Path(tmp_path_factory.mktemp("system-messages"))) as local:
        yield local


def nobody() -> str:
    """A valid IDNPS that no directory entry and no vendor has."""
    rpps = f"90000{next(counter):05d}"
    return f"8{rpps}{luhn_check_digit(rpps)}"


async def note_in(user: SandboxUser, conversation: str, words: str) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        return await inbox_message(
            user,
            lambda m: m["conversation_id"] == conversation and words in m["text"],
        )

    return dict(await wait_until(found, 60, f"a note with {words!r} at {user.idnps}"))


async def test_a_pandalab_user_asking_for_nobody_reachable_gets_a_system_message(
    stack: LocalStack, http: ClientSession
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[3]
    missing, outsider = nobody(), f"@mallory:{UNTRUSTED}"
    conversation = await alice.start_conversation([missing, outsider], unique("Personne"))
    await portal_of(stack, "pandalab", conversation)

    note = await note_in(alice, conversation, missing)
    assert note["kind"] == "system" and note["sender_name"] == "EIMIS"
    assert note["text"].startswith("Impossible d'ajouter à cette conversation")
    refusal = await note_in(alice, conversation, outsider)
    assert refusal["kind"] == "system"
    assert refusal["text"].startswith("Impossible d'ajouter à cette conversation")
    # The conversation view shows them too, once each.
    async with alice.http.get(f"{alice.base}/conversations/{conversation}") as view:
        messages = (await view.json())["messages"]
    assert [m["kind"] for m in messages] == ["system", "system"]


async def test_a_medipeps_user_gets_the_same_from_eimis(
    stack: LocalStack, http: ClientSession
) -> None:
    bob = (await users_of(stack, http, "medipeps"))[3]
    missing = nobody()
    conversation = await bob.start_conversation([missing], unique("Personne non plus"))
    await portal_of(stack, "medipeps", conversation)

    note = await note_in(bob, conversation, missing)
    assert note["sender_name"] == "EIMIS" and note["kind"] != "system"
    assert note["text"].startswith("Impossible d'ajouter à cette conversation")
