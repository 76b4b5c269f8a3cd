"""Without the homeserver's experimental appservice extensions (MSC2409 to-device events and
MSC3202 device lists in transactions, both behind flags in Synapse 1.163), encrypted rooms still
work: room keys are read from the ghosts' device inboxes (a /sync as the device) when an event
cannot be decrypted. Shown against a real Synapse with both flags off."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession

from bridge.devtools.stack import LocalStack

from e2e_helpers import encrypted_native, received, unique, users_of, vendor_dm
from helpers import wait_until
from matrix_user import MatrixUser

pytestmark = pytest.mark.e2e

FLAGS_OFF = {
    "msc2409_to_device_messages_enabled": False,
    "msc3202_transaction_extensions": False,
}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    async with LocalStack(
        tmp_path / "stack",
        encrypted=True,
        synapse_options={"extra_config": {"experimental_features": FLAGS_OFF}},
    ) as local:
        yield local


@pytest.fixture
async def native(stack: LocalStack, tmp_path: Path) -> AsyncIterator[MatrixUser]:
    async with await encrypted_native(stack, tmp_path, "fallback") as user:
        yield user


async def test_room_keys_come_from_the_device_inbox_when_not_pushed(
    stack: LocalStack, http: ClientSession, native: MatrixUser
) -> None:
    alice = (await users_of(stack, http, "pandalab"))[0]
    _, room_id = await vendor_dm(stack, alice, "pandalab", native, unique("Bonjour"))

    texts = [unique(f"Chiffré sans push {i}") for i in range(3)]
    for text in texts:
        await native.send_text(room_id, text)
    for text in texts:
        await wait_until(lambda t=text: received(alice, t), 60, "Alice to get it")
    assert [m["text"] for m in await alice.inbox() if m["text"] in texts] == texts
    assert stack.bridge is not None and stack.bridge.crypto is not None
    assert stack.bridge.crypto.caught_up_messages >= 1, "the keys came from the inbox"
