"""``MarkRead`` at a vendor: its read marker moves to the message a Matrix user read, when the
vendor has read markers and was sent that message."""

from __future__ import annotations

from bridge.core.executors.context import Context, Target
from bridge.core.executors.outcome import Delivered, Skipped
from bridge.core.operations import MarkRead


async def mark_read(ctx: Context, target: Target, read: MarkRead) -> Delivered | Skipped:
    message_id = await ctx.message_ref(target, read.event_id)
    if message_id is not None and target.caps.read_receipts:
        await target.connector.mark_read(target.conversation, read.sender.as_sender(), message_id)
        return Delivered(target.conversation)  # read markers get no send status
    return Skipped(target.conversation)
