"""``SetTitle`` and ``SetTopic`` at a vendor: the portal's name or topic becomes its
conversation's, or a line saying so in the bridge's locale (a stand-in message from "EIMIS")
for a vendor without titles or topics. The idempotency key is the state event. Never logged
(people's words)."""

from __future__ import annotations

from typing import cast

from bridge.core.executors.context import Context, Target
from bridge.core.executors.outcome import Delivered
from bridge.core.executors.stand_in import eimis, send_stand_in
from bridge.core.operations import SetTitle, SetTopic
from bridge.i18n import _
from connectors.base import TitleHandling, TopicHandling


async def set_title(ctx: Context, target: Target, change: SetTitle) -> Delivered:
    by = change.by.as_sender()
    if target.caps.titles:
        await cast(TitleHandling, target.connector).set_title(target.conversation, change.title, by)
        return Delivered(target.conversation)
    text = (
        _("{name} renamed the conversation: “{title}”").format(
            name=by.display_name, title=change.title
        )
        if change.title
        else _("{name} removed the conversation's name").format(name=by.display_name)
    )
    return await _say(ctx, target, change.event_id, text)


async def set_topic(ctx: Context, target: Target, change: SetTopic) -> Delivered:
    by = change.by.as_sender()
    if target.caps.topics:
        await cast(TopicHandling, target.connector).set_topic(target.conversation, change.topic, by)
        return Delivered(target.conversation)
    text = (
        _("{name} changed the conversation's topic: “{topic}”").format(
            name=by.display_name, topic=change.topic
        )
        if change.topic
        else _("{name} removed the conversation's topic").format(name=by.display_name)
    )
    return await _say(ctx, target, change.event_id, text)


async def _say(ctx: Context, target: Target, event_id: str, text: str) -> Delivered:
    mapped = await send_stand_in(
        target,
        event_id=event_id,
        request_id=event_id,
        sender=eimis(ctx),
        text=text,
        ts=None,
        about=None,
        message_kind="notice",
    )
    return Delivered(target.conversation, (), (mapped,))
