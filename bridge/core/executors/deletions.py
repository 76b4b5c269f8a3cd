"""``Redact`` at a vendor: what a Matrix redaction removes there (the messages and reactions it
was sent for that event), or a line telling its users for a vendor without deletions."""

from __future__ import annotations

from bridge.core.executors.context import Context, Target
from bridge.core.executors.outcome import Delivered, Mapped, Skipped
from bridge.core.executors.stand_in import send_stand_in
from bridge.core.operations import Redact, parse_reaction_ref
from bridge.i18n import _


async def redact(ctx: Context, target: Target, redaction: Redact) -> Delivered | Skipped:
    refs = await ctx.stores.messages.remotes_for(
        target.connector_id, redaction.target_event, room_id=target.room_id
    )
    if not refs:
        return Skipped(target.conversation)  # it never reached this vendor
    connector, conversation = target.connector, target.conversation
    sender = redaction.sender.as_sender()
    caps = target.caps
    notes: list[str] = []
    mapped: list[Mapped] = []
    removed = gone = 0
    for ref in refs:
        reaction = parse_reaction_ref(ref)
        if reaction is not None:
            if caps.reactions:
                found = await connector.remove_reaction(
                    conversation, reaction[0], reaction[1], sender
                )
                removed, gone = removed + (found is not False), gone + (found is False)
        elif caps.deletions:
            found = await connector.delete_message(conversation, ref, sender)
            removed, gone = removed + (found is not False), gone + (found is False)
        else:
            notes.append(
                _("{vendor} cannot delete messages: its users were told").format(
                    vendor=target.connector_id
                )
            )
            mapped.append(
                await send_stand_in(
                    target,
                    event_id=redaction.event_id,
                    request_id=f"{redaction.event_id}:{ref}",
                    sender=sender,
                    text=_("🗑 {name} deleted a message.").format(name=sender.display_name),
                    ts=redaction.ts,
                    about=ref,
                )
            )
    if gone and not removed and not mapped:
        # Nothing left there to delete: not "delivered".
        return Skipped(conversation, "vendor_404")
    return Delivered(conversation, tuple(notes), tuple(mapped))
