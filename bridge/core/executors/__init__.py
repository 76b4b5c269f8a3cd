"""Executors: each outbox operation done at its vendor, one module per kind of operation.

``Executors.run`` finds where an operation goes (the connector and its conversation for the
portal room) and hands it to the executor of its type:

- ``conversations.py``: ``CreateConversation``
- ``messages.py``: ``SendMessage`` (``files.py``: a file's bytes on the way)
- ``edits.py``: ``EditMessage``
- ``deletions.py``: ``Redact`` (messages and reactions)
- ``reactions.py``: ``AddReaction``
- ``receipts.py``: ``MarkRead``
- ``membership.py``: ``AddParticipants``, ``RemoveParticipants``
- ``titles.py``: ``SetTitle``, ``SetTopic``
- ``system.py``: ``SystemNotice`` (what the room was told, told to the vendor's users)
- ``stand_in.py``: what a vendor cannot do (an edit, a deletion, a reaction, a membership or
  title change), sent as a message

Each returns an ``Outcome`` (``outcome.py``): what it did and the vendor ids it created. The
executors only do the work: retrying, dead letters, send statuses and the audit row are the
delivery policy's (``bridge/core/delivery.py``), and so is recording what they mapped.
"""

from __future__ import annotations

from typing import assert_never

from bridge.config import MediaConfig
from bridge.core.connectors import ConnectorSet
from bridge.core.errors import PermanentFailure
from bridge.core.executors.context import Context, Target
from bridge.core.executors.conversations import create_conversation
from bridge.core.executors.deletions import redact
from bridge.core.executors.edits import edit_message
from bridge.core.executors.membership import add_participants, remove_participants
from bridge.core.executors.messages import send_message
from bridge.core.executors.outcome import (
    Delivered,
    Mapped,
    MessageMapped,
    Outcome,
    ReactionMapped,
    Skipped,
)
from bridge.core.executors.reactions import add_reaction
from bridge.core.executors.receipts import mark_read
from bridge.core.executors.system import system_notice
from bridge.core.executors.titles import set_title, set_topic
from bridge.core.operations import (
    AddParticipants,
    AddReaction,
    CreateConversation,
    EditMessage,
    MarkRead,
    Operation,
    Redact,
    RemoveParticipants,
    SendMessage,
    SetTitle,
    SetTopic,
    SystemNotice,
)
from bridge.core.portals import Portals
from bridge.db.stores import Stores
from bridge.i18n import _
from bridge.matrix.homeserver import Homeserver
from bridge.matrix.media import MediaRepository

__all__ = [
    "Context",
    "Delivered",
    "Executors",
    "Mapped",
    "MessageMapped",
    "Outcome",
    "ReactionMapped",
    "Skipped",
    "Target",
]


class Executors:
    def __init__(
        self,
        stores: Stores,
        homeserver: Homeserver,
        connectors: ConnectorSet,
        media: MediaRepository,
        media_config: MediaConfig,
        portals: Portals | None = None,
    ) -> None:
        self.stores = stores
        self.connectors = connectors
        self.context = Context(stores, homeserver, media, media_config, portals)

    async def run(self, connector_id: str, room_id: str, operation: Operation) -> Outcome:
        """Do ``operation`` at connector ``connector_id`` for the portal ``room_id``. Raises
        ``PermanentFailure`` when it cannot go there at all, and lets the connector's and the
        homeserver's errors through (the delivery policy sorts them)."""
        connector = self.connectors.get(connector_id)
        if connector is None:
            raise PermanentFailure(
                _("the {connector} connector is not running").format(connector=connector_id)
            )
        link = await self.stores.portals.link(room_id, connector_id)
        if link is None:
            raise PermanentFailure(
                _("the room is not linked to {connector}").format(connector=connector_id)
            )
        if isinstance(operation, CreateConversation):
            return await create_conversation(connector, room_id, link.conversation_id, operation)
        if link.conversation_id is None:
            raise PermanentFailure(
                _("the {connector} conversation was never opened").format(connector=connector_id)
            )
        target = Target(connector_id, connector, room_id, link.conversation_id)
        ctx = self.context
        match operation:
            case SendMessage():
                return await send_message(ctx, target, operation)
            case EditMessage():
                return await edit_message(ctx, target, operation)
            case Redact():
                return await redact(ctx, target, operation)
            case AddReaction():
                return await add_reaction(ctx, target, operation)
            case MarkRead():
                return await mark_read(ctx, target, operation)
            case AddParticipants():
                return await add_participants(ctx, target, operation)
            case RemoveParticipants():
                return await remove_participants(ctx, target, operation)
            case SetTitle():
                return await set_title(ctx, target, operation)
            case SetTopic():
                return await set_topic(ctx, target, operation)
            case SystemNotice():
                return await system_notice(ctx, target, operation)
            case _:
                assert_never(operation)
