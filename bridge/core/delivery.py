"""Delivery: carries outbox items to the vendors, in order per (connector, portal room).

Each call carries an idempotency key (the portal room for a new conversation, the Matrix event id
for a message), so a retry after a timeout or a crash never shows anything twice.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from mautrix.types import RoomID

from bridge.core.connectors import ConnectorSet
from bridge.core.errors import PermanentFailure
from bridge.core.members import Member
from bridge.core.portals import CREATE_CONVERSATION, SEND_MESSAGE
from bridge.db.outbox import OutboxItem
from bridge.db.stores import Stores
from bridge.directory.idnps import Idnps
from bridge.matrix.homeserver import Homeserver
from connectors.base import ConnectorError, NewConversation, OutboundMessage

log = logging.getLogger("eimis.delivery")


class Delivery:
    def __init__(self, stores: Stores, homeserver: Homeserver, connectors: ConnectorSet) -> None:
        self.stores = stores
        self.hs = homeserver
        self.connectors = connectors

    async def handle(self, item: OutboxItem) -> None:
        """Deliver one item; raises only for failures worth retrying."""
        try:
            await self._deliver(item)
        except ConnectorError as error:
            if error.retriable:
                raise
            await self._give_up(item, str(error))
            return
        except PermanentFailure as failure:
            await self._give_up(item, str(failure))
            return
        await self.stores.outbox.mark_done(item.seq)

    async def record_error(self, item: OutboxItem, error: Exception) -> None:
        await self.stores.outbox.record_attempt(item.seq, _describe(error))

    async def _deliver(self, item: OutboxItem) -> None:
        connector = self.connectors.get(item.connector)
        if connector is None:
            raise PermanentFailure(f"connector {item.connector!r} is not running")
        link = await self.stores.portals.link(item.room_id, item.connector)
        if link is None:
            raise PermanentFailure(f"the room is not linked to {item.connector}")
        if item.operation == CREATE_CONVERSATION:
            if link.conversation_id is not None:
                return
            conversation_id = await connector.create_conversation(
                NewConversation(
                    request_id=item.room_id,
                    title=item.payload.get("title"),
                    members=tuple(Idnps(m) for m in item.payload["members"]),
                    external=tuple(
                        Member.from_json(m).as_sender() for m in item.payload["external"]
                    ),
                )
            )
            await self.stores.portals.set_conversation(
                item.room_id, item.connector, conversation_id
            )
            log.info(
                "Opened %s conversation %s for %s", item.connector, conversation_id, item.room_id
            )
        elif item.operation == SEND_MESSAGE:
            event_id = item.payload["event_id"]
            if await self.stores.messages.remote_for(item.connector, event_id):
                return
            if link.conversation_id is None:
                raise PermanentFailure(f"the {item.connector} conversation was never opened")
            remote_id = await connector.send_message(
                link.conversation_id,
                OutboundMessage(
                    request_id=event_id,
                    sender=Member.from_json(item.payload["sender"]).as_sender(),
                    text=item.payload["text"],
                    html=item.payload.get("html"),
                    timestamp=datetime.fromtimestamp((item.payload.get("ts") or 0) / 1000, tz=UTC),
                ),
            )
            await self.stores.messages.add(item.connector, remote_id, item.room_id, event_id)
        else:
            raise PermanentFailure(f"unknown outbox operation {item.operation!r}")

    async def _give_up(self, item: OutboxItem, reason: str) -> None:
        log.warning("Delivery %d to %s failed for good: %s", item.seq, item.connector, reason)
        await self.stores.outbox.mark_failed(item.seq, reason)
        portal = await self.stores.portals.get(item.room_id)
        if portal is not None:
            what = "A message" if item.operation == SEND_MESSAGE else "This conversation"
            await self.hs.intent(portal.voice).send_notice(
                RoomID(item.room_id),
                f"{what} could not be delivered to {item.connector}: {reason}",
            )


def _describe(error: Exception) -> str:
    if isinstance(error, ConnectorError):
        return str(error)[:300]
    return type(error).__name__
