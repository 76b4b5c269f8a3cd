"""``AddReaction`` at a vendor: a reaction on the message it was sent, or a short notice naming
the reaction (a stand-in message) for a vendor without reactions."""

from __future__ import annotations

from bridge.core.executors.context import Context, Target
from bridge.core.executors.outcome import Delivered, ReactionMapped, Skipped
from bridge.core.executors.stand_in import send_stand_in
from bridge.core.operations import AddReaction
from bridge.i18n import _


async def add_reaction(ctx: Context, target: Target, reaction: AddReaction) -> Delivered | Skipped:
    message_id = await ctx.message_ref(target, reaction.target_event)
    if message_id is None:
        return Skipped(target.conversation)
    sender = reaction.sender.as_sender()
    if target.caps.reactions:
        reaction_id = await target.connector.add_reaction(
            target.conversation, message_id, sender, reaction.key, reaction.event_id
        )
        mapped = ReactionMapped(message_id, reaction_id, reaction.event_id)
        return Delivered(target.conversation, (), (mapped,))
    stand_in = await send_stand_in(
        target,
        event_id=reaction.event_id,
        request_id=reaction.event_id,
        sender=sender,
        text=_("{name} reacted {emoji}").format(name=sender.display_name, emoji=reaction.key),
        ts=reaction.ts,
        about=message_id,
        message_kind="notice",
    )
    note = _("{vendor} has no reactions: sent as a short message").format(
        vendor=target.connector_id
    )
    return Delivered(target.conversation, (note,), (stand_in,))
