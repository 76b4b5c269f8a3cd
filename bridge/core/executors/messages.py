"""``SendMessage`` at a vendor: a Matrix text, file or location, as the vendor can show it.

Text is rendered in the vendor's formatting and split to its length limit (each part its own
vendor message); a file is checked against what the vendor and the space accept, its real type
read from its first bytes, then streamed; a location goes as a map link to a vendor without
locations. A reply quotes the vendor message it answers, or goes without the quote.
"""

from __future__ import annotations

import dataclasses

from bridge.core import matrix_content
from bridge.core.degradation import (
    check_content,
    check_file,
    file_ref,
    location,
    location_as_text,
    message_kind,
    render_text_bounded,
)
from bridge.core.executors.context import Context, Target, when
from bridge.core.executors.files import real_type, stream
from bridge.core.executors.outcome import Delivered, MessageMapped
from bridge.core.operations import SendMessage
from bridge.i18n import _
from connectors.base import ConnectorError, OutboundAttachment, OutboundMessage


async def send_message(ctx: Context, target: Target, message: SendMessage) -> Delivered:
    content = message.content
    caps = target.caps
    vendor = target.connector_id
    sender = message.sender
    notes: list[str] = []
    converted = matrix_content.note(content, vendor)
    if converted is not None:
        notes.append(converted)
    if content.get("eimis.unknown_msgtype"):
        notes.append(
            _("unknown message type {type}: sent as text").format(
                type=str(content["eimis.unknown_msgtype"])[:64]
            )
        )
    reply_to = await _reply_target(ctx, target, message, notes)
    base = dict(
        sender=sender.as_sender(),
        timestamp=when(message.ts),
        message_kind=message_kind(content),
        reply_to=reply_to,
    )
    ref = file_ref(content)
    place = location(content)
    if ref is not None:
        media, config = ctx.media, ctx.media_config
        ceiling = check_file(ref, caps, vendor, config.max_file_size, config.allows)
        real = await real_type(media, ref, ceiling)
        ref, corrected = check_content(ref, real, caps, vendor, config.allows)
        if corrected:
            notes.append(corrected)
        attachment = OutboundAttachment(
            name=ref.name,
            mime_type=ref.mime_type,
            size=max(ref.size, 0),
            open=lambda: stream(media, ref.mxc, ceiling, ref.encrypted),
        )
        messages = [
            OutboundMessage(request_id=message.event_id, text="", attachment=attachment, **base)
        ]
    elif place is not None and caps.locations:
        messages = [OutboundMessage(request_id=message.event_id, text="", location=place, **base)]
    elif place is not None:
        notes.append(_("{vendor} cannot show locations: sent as a map link").format(vendor=vendor))
        messages = [
            OutboundMessage(request_id=message.event_id, text=location_as_text(place), **base)
        ]
    else:
        rendered = await render_text_bounded(content, caps, sender.display_name, vendor)
        notes.extend(rendered.notes)
        mentions = await ctx.mentions(target, rendered.mention_mxids, notes)
        messages = [
            OutboundMessage(
                request_id=message.event_id if i == 0 else f"{message.event_id}#{i}",
                text=part,
                html=rendered.html if len(rendered.parts) == 1 else None,
                mentions=mentions,
                **{**base, "reply_to": reply_to if i == 0 else None},
            )
            for i, part in enumerate(rendered.parts)
        ]
    mapped = []
    for outbound in messages:
        remote_id = await _send_quoting(target, outbound, notes)
        mapped.append(MessageMapped(remote_id, message.event_id))
    return Delivered(target.conversation, tuple(notes), tuple(mapped))


async def _reply_target(
    ctx: Context, target: Target, message: SendMessage, notes: list[str]
) -> str | None:
    if not message.reply_to_event:
        return None
    if not target.caps.replies:
        notes.append(
            _("{vendor} has no replies: sent without the quoted message").format(
                vendor=target.connector_id
            )
        )
        return None
    quoted = await ctx.message_ref(target, message.reply_to_event)
    if quoted is None:
        notes.append(
            _("the message it answers never reached {vendor}: sent without the quote").format(
                vendor=target.connector_id
            )
        )
    return quoted


async def _send_quoting(target: Target, message: OutboundMessage, notes: list[str]) -> str:
    """Send ``message``; when the vendor refuses it for good while it quotes a message (the
    quoted one may be gone there), send it again without the quote rather than lose it."""
    connector, conversation = target.connector, target.conversation
    try:
        return await connector.send_message(conversation, message)
    except ConnectorError as error:
        if message.reply_to is None or error.retriable or error.unreachable:
            raise
    notes.append(_("the quoted message no longer exists at the recipient: sent without the quote"))
    return await connector.send_message(
        conversation,
        dataclasses.replace(message, reply_to=None, request_id=f"{message.request_id}#unquoted"),
    )
