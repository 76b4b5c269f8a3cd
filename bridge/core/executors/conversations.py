"""``CreateConversation`` at a vendor: the portal's conversation opened there, once (the portal
room is the idempotency key, so a retry after a timeout opens nothing twice)."""

from __future__ import annotations

from bridge.core.executors.outcome import Delivered, Skipped
from bridge.core.operations import CreateConversation
from connectors.base import Connector, NewConversation


async def create_conversation(
    connector: Connector, room_id: str, opened: str | None, create: CreateConversation
) -> Delivered | Skipped:
    """``opened``: the conversation the portal already has there (then nothing to do)."""
    if opened is not None:
        return Skipped(opened)
    conversation_id = await connector.create_conversation(
        NewConversation(
            request_id=room_id,
            title=create.title,
            members=create.members,
            external=tuple(m.as_sender() for m in create.external),
        )
    )
    return Delivered(conversation_id, opened=True)
