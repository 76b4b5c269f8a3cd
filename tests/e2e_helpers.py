"""Shared steps of the end-to-end tests: sandbox users, waiting for what they receive."""

from __future__ import annotations

import itertools
from typing import Any

from aiohttp import ClientSession

from bridge.devtools.demo import SandboxUser, wait_for
from bridge.devtools.stack import LocalStack

counter = itertools.count(1)


def unique(text: str) -> str:
    return f"{text} #{next(counter)}"


async def users_of(stack: LocalStack, http: ClientSession, type_name: str) -> list[SandboxUser]:
    sandbox = stack.sandboxes[type_name]
    async with http.get(f"{sandbox.url}/_sandbox/users") as resp:
        users = (await resp.json())["users"]
    return [SandboxUser(http, sandbox, user) for user in users]


async def conversation_titled(user: SandboxUser, title: str) -> str | None:
    for conversation in await user.conversations():
        if conversation.get("title") == title:
            return str(conversation["conversation_id"])
    return None


async def inbox_texts(user: SandboxUser) -> list[str]:
    return [m["text"] for m in await user.inbox()]


async def received(user: SandboxUser, text: str) -> dict[str, Any] | None:
    for message in await user.inbox():
        if message["text"] == text:
            return message
    return None


async def portal_of(stack: LocalStack, connector: str, conversation_id: str) -> str:
    assert stack.bridge is not None

    async def lookup() -> str | None:
        assert stack.bridge is not None
        return await stack.bridge.stores.portals.by_conversation(connector, conversation_id)

    return str(await wait_for("the portal room", lookup, timeout=30))
