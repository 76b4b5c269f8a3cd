"""``EditMessage`` at a vendor: the correction of a message it was sent, or a marked correction
(a stand-in message) for a vendor without edits."""

from __future__ import annotations

from bridge.core.degradation import render_text_bounded
from bridge.core.executors.context import Context, Target, when
from bridge.core.executors.outcome import Delivered, Skipped
from bridge.core.executors.stand_in import send_stand_in
from bridge.core.operations import EditMessage
from bridge.i18n import _
from connectors.base import OutboundMessage


async def edit_message(ctx: Context, target: Target, edit: EditMessage) -> Delivered | Skipped:
    original = await ctx.message_ref(target, edit.target_event)
    if original is None:
        # The original never reached this vendor: nothing to correct there.
        return Skipped(target.conversation)
    caps = target.caps
    sender = edit.sender
    rendered = await render_text_bounded(
        edit.content, caps, sender.display_name, target.connector_id
    )
    mentions = await ctx.mentions(target, rendered.mention_mxids)
    notes = list(rendered.notes)
    text = rendered.parts[0]
    if len(rendered.parts) > 1:
        notes.append(_("the correction was cut to the recipient's length limit"))
    if caps.edits:
        await target.connector.edit_message(
            target.conversation,
            original,
            OutboundMessage(
                request_id=edit.event_id,
                sender=sender.as_sender(),
                text=text,
                timestamp=when(edit.ts),
                html=rendered.html,
                mentions=mentions,
            ),
        )
        return Delivered(target.conversation, tuple(notes))
    notes.append(
        _("{vendor} has no edits: sent as a marked correction").format(vendor=target.connector_id)
    )
    mapped = await send_stand_in(
        target,
        event_id=edit.event_id,
        request_id=edit.event_id,
        sender=sender.as_sender(),
        text=_("✏️ Correction: {text}").format(text=text),
        ts=edit.ts,
        about=original,
        mentions=mentions,
    )
    return Delivered(target.conversation, tuple(notes), (mapped,))
