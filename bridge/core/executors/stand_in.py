"""What a vendor cannot do, shown as a short message in its conversation instead.

A vendor without edits gets the correction as a marked message, one without deletions a line
saying a message was deleted, one without reactions a notice naming the reaction: the same
degradation each time, written once here. The stand-in quotes the message it is about when the
vendor has replies, and its vendor id maps to the Matrix event it stands for.
"""

from __future__ import annotations

from typing import Any

from bridge.core.executors.context import Context, Target, when
from bridge.core.executors.outcome import MessageMapped
from connectors.base import Mention, MessageKind, OutboundMessage, Sender


async def send_stand_in(
    target: Target,
    *,
    event_id: str,
    request_id: str,
    sender: Sender,
    text: str,
    ts: Any,
    about: str | None,
    message_kind: MessageKind = "text",
    mentions: tuple[Mention, ...] = (),
) -> MessageMapped:
    """Send ``text`` in place of what the vendor cannot do; ``about``: the vendor message it is
    about (quoted when the vendor has replies). Returns the message it created for ``event_id``."""
    remote_id = await target.connector.send_message(
        target.conversation,
        OutboundMessage(
            request_id=request_id,
            sender=sender,
            text=text,
            timestamp=when(ts),
            message_kind=message_kind,
            reply_to=about if target.caps.replies else None,
            mentions=mentions,
        ),
    )
    return MessageMapped(remote_id, event_id)


EIMIS = "EIMIS"
"""The name the bridge's own messages in a vendor conversation are signed with."""


def eimis(ctx: Context) -> Sender:
    """The sender of what the bridge itself says in a vendor conversation (who joined, left,
    renamed it, where the vendor cannot show it)."""
    return Sender(mxid=str(ctx.hs.config.bot_mxid), display_name=EIMIS)
