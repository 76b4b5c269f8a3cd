"""Dead letters and vendor outages, end to end: order before delivery, and nothing silently lost.

A Medipeps-style sandbox that answers 503 to messages carrying a marker (while a switch is on)
makes one delivery spend its retry budget; a stopped sandbox makes the vendor unreachable.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from bridge.devtools.stack import LocalStack
from connectors.medipeps.sandbox import create_app
from connectors.sandbox.errors import SandboxError
from connectors.sandbox.webtools import KERNEL_KEY

from e2e_helpers import AppUser, app_users_of, counter, inbox_message, unique
from helpers import wait_until
from matrix_user import MatrixUser, connect

pytestmark = pytest.mark.e2e

MARKER = "FAIL503"
faults = {"on": True}


def faulty_medipeps() -> web.Application:
    """The Medipeps-style sandbox, answering 503 to marked messages while ``faults["on"]``."""
    app = create_app()
    kernel = app[KERNEL_KEY]
    writes = kernel.api_writes

    def api_writes(key: str, conversation_id: str, sender: Any, text: str, **kw: Any) -> Any:
        if faults["on"] and MARKER in text:
            raise SandboxError(503, "unavailable", "try again later")
        return writes(key, conversation_id, sender, text, **kw)

    kernel.api_writes = api_writes
    return app


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    local = LocalStack(
        Path(tmp_path_factory.mktemp("dead")),
        config_overrides={"delivery": {"max_attempts": 3}},
    )
    local.sandboxes["medipeps"].app_factory = faulty_medipeps
    async with local:
        yield local


@pytest.fixture
async def dm(stack: LocalStack) -> AsyncIterator[tuple[MatrixUser, AppUser, str]]:
    """A native user's DM with a Medipeps-style user, opened and proven to work."""
    faults["on"] = True
    n = next(counter)
    user_id, token = await stack.synapse.register_user(f"dead{n}", "correct horse battery")
    native = await connect(stack.synapse.url, user_id, token)
    async with ClientSession() as http:
        bob = (await app_users_of(stack, http, "medipeps"))[n % 5]
        ghost = f"@eimis_medipeps_{bob.idnps}:{stack.synapse.server_name}"
        room_id = await native.create_dm(ghost)
        opener = unique("Ouverture")
        await native.send_text(room_id, opener)
        await wait_until(
            lambda: inbox_message(bob, lambda m: m["text"] == opener), 90, "the opener"
        )
        try:
            yield native, bob, room_id
        finally:
            await native.close()


async def cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    """The host's command beside the running bridge, in a thread: the bridge runs on this event
    loop, and a command waiting for a database lock the bridge holds must not stop it."""
    config = str(stack.state_dir / "config.yaml")
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bridge", args[0], "-c", config, *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )


async def texts_of(user: AppUser, needles: list[str]) -> list[str]:
    return [m["text"] for m in await user.inbox() if m["text"] in needles]


async def failed_status(native: MatrixUser, room_id: str, event_id: str) -> dict[str, Any]:
    event = await native.wait_for_event(
        room_id,
        lambda e: (
            e.get("type") == "com.beeper.message_send_status"
            and (e["content"].get("m.relates_to") or {}).get("event_id") == event_id
            and e["content"].get("status") == "FAIL_PERMANENT"
        ),
        60,
    )
    return dict(event["content"])


async def test_a_dead_letter_holds_its_conversation_until_retried_then_all_arrive_in_order(
    stack: LocalStack, dm: tuple[MatrixUser, AppUser, str]
) -> None:
    native, bob, room_id = dm
    first = unique(f"{MARKER} dose")
    later = [unique("suite 1"), unique("suite 2")]
    first_id = await native.send_text(room_id, first)
    for text in later:
        await native.send_text(room_id, text)

    status = await failed_status(native, room_id, first_id)
    assert "opérateur" in status["message"]
    assert stack.bridge is not None
    letters = await wait_until(
        lambda: _held(stack, 2), 30, "the dead letter to hold both later messages"
    )
    assert await texts_of(bob, [first, *later]) == [], "nothing may overtake a dead letter"

    listed = await cli(stack, "dead-letters")
    assert listed.returncode == 0 and str(letters[0].seq) in listed.stdout
    faults["on"] = False
    retried = await cli(stack, "retry", "all")
    assert retried.returncode == 0, retried.stderr

    async def all_three() -> list[str] | None:
        got = await texts_of(bob, [first, *later])
        return got if len(got) == 3 else None

    assert await wait_until(all_three, 60, "the conversation to flow again") == [first, *later]


async def test_a_discarded_dead_letter_is_never_delivered_and_releases_the_rest(
    stack: LocalStack, dm: tuple[MatrixUser, AppUser, str]
) -> None:
    native, bob, room_id = dm
    doomed = unique(f"{MARKER} erreur")
    after = unique("message suivant")
    doomed_id = await native.send_text(room_id, doomed)
    await native.send_text(room_id, after)
    await failed_status(native, room_id, doomed_id)
    letters = await wait_until(lambda: _held(stack, 1), 30, "the dead letter")

    refused = await cli(stack, "discard", str(letters[0].seq), "--yes")
    assert refused.returncode == 0, refused.stderr
    await wait_until(
        lambda: inbox_message(bob, lambda m: m["text"] == after), 60, "the later message"
    )
    assert doomed not in [m["text"] for m in await bob.inbox()]
    assert (await cli(stack, "discard", str(letters[0].seq), "--yes")).returncode == 1


async def test_an_unreachable_vendor_spends_no_retry_budget_and_catches_up_in_order(
    stack: LocalStack, dm: tuple[MatrixUser, AppUser, str]
) -> None:
    native, bob, room_id = dm
    assert stack.bridge is not None
    sandbox = stack.sandboxes["medipeps"]
    await sandbox.stop()
    texts = [unique(f"pendant la panne {i}") for i in range(5)]
    try:
        for text in texts:
            await native.send_text(room_id, text)

        async def down_long_enough() -> bool:
            assert stack.bridge is not None
            attempts = await stack.bridge.db.fetchval(
                "SELECT MAX(attempts) FROM outbox WHERE state = 'pending' AND connector = $1",
                "medipeps",
            )
            # More failed attempts than the budget: had they counted, it would be dead.
            return stack.bridge.delivery.health.state("medipeps") == "DOWN" and (attempts or 0) > 3

        await wait_until(down_long_enough, 90, "the vendor seen down for longer than the budget")
    finally:
        await sandbox.start()

    async def caught_up() -> list[str] | None:
        got = await texts_of(bob, texts)
        return got if len(got) == len(texts) else None

    assert await wait_until(caught_up, 90, "catch-up after the outage") == texts
    assert stack.bridge.delivery.health.state("medipeps") == "CONNECTED"
    assert await stack.bridge.stores.dead_letters.list("medipeps") == []


async def _held(stack: LocalStack, count: int) -> list[Any] | None:
    assert stack.bridge is not None
    letters = await stack.bridge.stores.dead_letters.list("medipeps")
    return letters if letters and letters[-1].held >= count else None
