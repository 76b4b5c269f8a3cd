"""What a ghost sends reaches the room's other vendors without the homeserver's push.

Synapse pushes every room event to the bridge in appservice transactions, the ghosts' own
events included, and can lose or delay such a push around its restarts. The bridge relays what a
ghost sent to the room's other connectors itself, in the commit that records the send. Here a
filter between Synapse and the bridge removes every event of PandaLab ghosts from the pushes:
Bob, on Medipeps, must still get each of Alice's messages, once, in order.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession, web

from bridge.devtools.ports import free_port
from bridge.devtools.stack import LocalStack

from e2e_helpers import Proxy, inbox_texts, unique, users_of
from helpers import wait_until

pytestmark = pytest.mark.e2e

GHOSTS_FILTERED = "@eimis_pandalab_"


class PushFilter(Proxy):
    """Forwards Synapse's calls to the bridge, minus the events of one connector's ghosts."""

    def __init__(self, bridge_url: str, http: ClientSession) -> None:
        super().__init__(free_port())
        self.bridge_url = bridge_url
        self.http = http
        self.dropped: list[str] = []
        """Bodies of the messages removed from the pushes."""

    async def forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "PUT" and "/transactions/" in request.path:
            transaction = json.loads(body)
            kept = []
            for event in transaction.get("events", []):
                if str(event.get("sender", "")).startswith(GHOSTS_FILTERED):
                    self.dropped.append(str((event.get("content") or {}).get("body", "")))
                else:
                    kept.append(event)
            body = json.dumps({**transaction, "events": kept}).encode()
        # The vendors' webhooks come this way too (the bridge's public address): keep their
        # signature headers.
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "content-length", "transfer-encoding")
        }
        async with self.http.request(
            request.method, self.bridge_url + request.path_qs, data=body, headers=headers
        ) as resp:
            return web.Response(
                status=resp.status, body=await resp.read(), content_type=resp.content_type
            )


@pytest.fixture
async def filtered_stack(
    tmp_path: Path, http: ClientSession
) -> AsyncIterator[tuple[LocalStack, PushFilter]]:
    bridge_port = free_port()
    push_filter = PushFilter(f"http://127.0.0.1:{bridge_port}", http)
    state = (tmp_path / "stack").resolve()
    stack = LocalStack(
        state,
        config_overrides={
            "appservice": {
                "id": "eimis-bridge",
                "address": push_filter.url,  # what Synapse calls
                "hostname": "127.0.0.1",
                "port": bridge_port,  # where the bridge listens
                "registration": str(state / "registration.yaml"),
            },
            # No periodic timeline sweep: the messages must come through the relay alone.
            "reconcile": {"interval_s": 0},
        },
    )
    stack.bridge_port = bridge_port
    await push_filter.start()
    try:
        async with stack:
            yield stack, push_filter
    finally:
        await push_filter.stop()


async def test_a_ghosts_messages_reach_the_other_vendor_without_the_homeservers_push(
    filtered_stack: tuple[LocalStack, PushFilter], http: ClientSession
) -> None:
    stack, push_filter = filtered_stack
    alice = (await users_of(stack, http, "pandalab"))[0]
    bob = (await users_of(stack, http, "medipeps"))[0]
    conversation = await alice.start_conversation([bob.idnps], unique("relay"))
    texts = [unique(f"relayed {n}") for n in range(5)]
    for text in texts:
        await alice.send(conversation, text)

    async def all_arrived() -> list[str] | None:
        seen = [t for t in await inbox_texts(bob) if t in texts]
        return seen if len(seen) >= len(texts) else None

    seen = await wait_until(all_arrived, 60, "Bob to receive Alice's messages")
    assert seen == texts, "not exactly once, in order"

    async def pushes_filtered() -> bool:
        return all(text in push_filter.dropped for text in texts)

    # The test proves something only if Synapse did push those events and the filter took them.
    await wait_until(pushes_filtered, 30, "Synapse's pushes of Alice's messages")
    assert [t for t in await inbox_texts(bob) if t in texts] == texts
