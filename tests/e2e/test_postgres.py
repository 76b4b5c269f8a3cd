"""The same bridge on PostgreSQL, end to end: a conversation, and a crash after the ack."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession

from bridge.devtools.stack import LocalStack

from e2e_helpers import conversation_titled, received, unique, users_of
from helpers import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
async def pg_stack(tmp_path: Path, postgres_url: str) -> AsyncIterator[LocalStack]:
    async with LocalStack(tmp_path / "stack", database_url=postgres_url) as local:
        yield local


async def test_vendors_talk_through_a_bridge_on_postgresql_and_survive_a_crash(
    pg_stack: LocalStack,
) -> None:
    async with ClientSession() as http:
        alice = (await users_of(pg_stack, http, "pandalab"))[0]
        bob = (await users_of(pg_stack, http, "medipeps"))[0]
        title = unique("PostgreSQL")
        conversation = await alice.start_conversation([bob.idnps], title)
        first = unique("Premier message sur PostgreSQL")
        await alice.send(conversation, first)
        await wait_until(lambda: received(bob, first), 30, "Bob to receive it")
        bob_conversation = await wait_until(
            lambda: conversation_titled(bob, title), 90, "Bob's side"
        )

        # Acknowledged and stored, then the bridge dies before processing.
        await pg_stack.stop_bridge()
        bridge = await pg_stack.start_bridge(paused=True)
        during = [unique("Pendant la panne") for _ in range(3)]
        for text in during:
            await bob.send(bob_conversation, text)

        async def stored() -> bool:
            count = await bridge.db.fetchval("SELECT COUNT(*) FROM inbox WHERE state = 'pending'")
            return int(count) >= len(during)

        await wait_until(stored, 30, "the vendor events stored")
        await pg_stack.stop_bridge()
        await pg_stack.start_bridge()

        async def all_there() -> list[str] | None:
            seen = [m["text"] for m in await alice.inbox() if m["text"] in during]
            return seen if len(seen) == len(during) else None

        assert await wait_until(all_there, 30, "Alice to get all three") == during
