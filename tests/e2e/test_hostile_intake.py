"""End to end (Synapse, the running bridge, the three sandboxes): the issue's hostile vendor
uploads, thirty unauthenticated 15 MB bodies that stall, to the bridge's own webhooks while a
conversation goes on.

Each upload gets its 401 while it stalls (the bridge answers without the body, which never
comes), a signed one announcing more than the limit its 413, and the conversation is not
disturbed: a message written after the attack reaches the other vendor and the native user.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession
from fuzz_http import raw_request

from bridge.devtools.stack import LocalStack
from connectors.pandalab.connector import SANDBOX_WEBHOOK_SECRET

from e2e_helpers import body_is, inbox_message, three_way, unique
from helpers import wait_until

pytestmark = pytest.mark.e2e

PATHS = [b"/connectors/pandalab/webhook", b"/connectors/webhook/events"]
STALLED_DECLARED = 15 * 1024 * 1024
JSON = (b"Content-Type", b"application/json")


def pandalab_signed(body: bytes) -> list[tuple[bytes, bytes]]:
    stamp = str(int(time.time())).encode()
    mac = hmac.new(SANDBOX_WEBHOOK_SECRET.encode(), stamp + b"." + body, hashlib.sha256)
    return [
        JSON,
        (b"X-PandaLab-Timestamp", stamp),
        (b"X-PandaLab-Signature", b"sha256=" + mac.hexdigest().encode()),
    ]


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with LocalStack(Path(tmp_path_factory.mktemp("hostile-intake"))) as local:
        yield local


async def test_stalled_unsigned_uploads_are_refused_unread_and_the_conversation_goes_on(
    stack: LocalStack, http: ClientSession
) -> None:
    async with three_way(stack, http, "webhook", "pandalab", "Intake", "Bonjour") as trio:
        port = stack.bridge_port
        answers = await asyncio.gather(
            *(
                raw_request(
                    port,
                    b"POST",
                    PATHS[n % 2],
                    [JSON],
                    b"x" * 65536,
                    declared=STALLED_DECLARED,
                )
                for n in range(30)
            )
        )
        assert [a.status for a in answers] == [401] * 30
        assert {a.json()["error"] for a in answers} == {"unauthorized"}

        oversize = await raw_request(
            port, b"POST", PATHS[0], pandalab_signed(b"{}"), b"x" * 4096, declared=STALLED_DECLARED
        )
        assert oversize.status == 413 and oversize.json()["error"] == "body_too_large"

        text = unique("Après les envois refusés, la conversation continue")
        await trio.other.post(trio.other_conv, text=text)
        await trio.native.wait_for_event(trio.room_id, body_is(text), 30)
        await wait_until(
            lambda: inbox_message(trio.starter, lambda m: m["text"] == text),
            30,
            "the message at the webhook vendor",
        )
