"""The router: processes the inbox in order, per conversation.

Matrix events become outbox deliveries for every other connector in the room (never back to the
connector whose ghost sent them: echo suppression); vendor events become portals and ghost
messages on Matrix. Every step is idempotent, so an item processed twice (after a crash between
the work and its ``done`` mark) changes nothing the second time.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from mautrix.errors import MatrixRequestError
from mautrix.types import Event, PaginationDirection, RoomID, StateEvent

from bridge.core.errors import PermanentFailure
from bridge.core.portals import SEND_MESSAGE, Portals
from bridge.db.inbox import MATRIX_ORIGIN, InboxItem
from bridge.db.stores import Stores
from bridge.matrix.homeserver import Homeserver, derived_txn_id
from connectors.base import ConversationCreated, MessageReceived, RemoteEvent, event_from_json

log = logging.getLogger("eimis.router")

TEXT_TYPES = {"m.text", "m.notice", "m.emote"}


def remote_lane(connector: str, conversation_id: str) -> str:
    return f"{connector}\x1f{conversation_id}"


class Router:
    def __init__(
        self, stores: Stores, homeserver: Homeserver, portals: Portals, outbox_notify: Any
    ) -> None:
        self.stores = stores
        self.hs = homeserver
        self.portals = portals
        self.ids = portals.ids
        self._outbox_notify = outbox_notify

    async def handle(self, item: InboxItem) -> None:
        """Process one inbox item; raises only for failures worth retrying."""
        try:
            if item.origin == MATRIX_ORIGIN:
                await self._matrix_event(item.payload)
            else:
                await self._remote_event(item.origin, event_from_json(item.payload))
        except PermanentFailure as failure:
            log.warning("Inbox item %d cannot be processed: %s", item.seq, failure)
            await self.stores.inbox.mark_failed(item.seq, str(failure))
            return
        except MatrixRequestError as error:
            if 400 <= error.http_status < 500 and error.http_status != 429:
                log.warning(
                    "Inbox item %d refused by the homeserver: %s %s",
                    item.seq,
                    error.errcode,
                    error.message,
                )
                await self.stores.inbox.mark_failed(item.seq, f"homeserver: {error.errcode}")
                return
            raise
        await self.stores.inbox.mark_done(item.seq)

    async def record_error(self, item: InboxItem, error: Exception) -> None:
        await self.stores.inbox.record_attempt(item.seq, type(error).__name__)

    # Matrix -> vendors -------------------------------------------------------------------------

    async def _matrix_event(self, raw: dict[str, Any]) -> None:
        if "state_key" in raw:
            try:
                event = Event.deserialize(raw)
            except Exception:  # a state event mautrix cannot type is no reason to stop the lane
                event = None
            if isinstance(event, StateEvent):
                await self.hs.state_store.update_state(event)
        if raw.get("type") == "m.room.member":
            await self._membership(raw)
        elif raw.get("type") == "m.room.message":
            await self._message(raw)

    async def _membership(self, raw: dict[str, Any]) -> None:
        content = raw.get("content") or {}
        target = raw.get("state_key", "")
        if content.get("membership") != "invite" or not self.ids.in_namespace(target):
            return
        if target == self.ids.bot_mxid:
            return  # the admin room arrives with the operators' issue; the bot stays out for now
        if self.ids.in_namespace(raw["sender"]):
            return  # the bridge invited its own ghost while opening a portal: already handled
        opened = await self.portals.open_from_invite(
            raw["room_id"], raw["sender"], target, bool(content.get("is_direct"))
        )
        if opened:
            await self._catch_up(raw["room_id"], target, int(raw.get("origin_server_ts") or 0))

    async def _catch_up(self, room_id: str, viewer: str, since_ts: int) -> None:
        """Route what was said between the invite and the ghost's join.

        The homeserver only sends an appservice the events of rooms where one of its users is
        joined, so a message written right after inviting a ghost would otherwise never arrive.
        Outbox items are keyed by event id, so a message that does arrive later is not doubled.
        """
        missed: list[dict[str, Any]] = []
        from_token = None
        for _ in range(10):  # at most 10 pages of 50 events back to the invite
            page = await self.hs.intent(viewer).get_messages(
                RoomID(room_id), PaginationDirection.BACKWARD, from_token=from_token, limit=50
            )
            events = [e.serialize() for e in page.events]
            missed.extend(
                e
                for e in events
                if e.get("type") == "m.room.message" and e.get("origin_server_ts", 0) >= since_ts
            )
            if not events or min(e.get("origin_server_ts", 0) for e in events) < since_ts:
                break
            from_token = page.end
        for event in reversed(missed):
            event.setdefault("room_id", room_id)
            await self._message(event)

    async def _message(self, raw: dict[str, Any]) -> None:
        room_id, sender, event_id = raw["room_id"], raw["sender"], raw["event_id"]
        if sender == self.ids.bot_mxid:
            return
        portal = await self.stores.portals.get(room_id)
        if portal is None:
            return
        source = self.ids.parse(sender)
        targets = [
            link.connector
            for link in await self.stores.portals.links(room_id)
            if (source is None or link.connector != source.connector)
            and link.connector in self.portals.connectors
        ]
        if not targets:
            return
        content = raw.get("content") or {}
        relates = content.get("m.relates_to") or {}
        msgtype = content.get("msgtype")
        if relates.get("rel_type") == "m.replace" or msgtype not in TEXT_TYPES:
            what = "Edits" if relates.get("rel_type") == "m.replace" else f"{msgtype} messages"
            await self.hs.intent(portal.voice).send_notice(
                RoomID(room_id),
                f"{what} are not bridged yet: this one did not reach {', '.join(targets)}.",
            )
            return
        member = await self.portals.sender(room_id, sender, portal.voice)
        text = str(content.get("body", ""))
        html = (
            content.get("formatted_body")
            if content.get("format") == "org.matrix.custom.html"
            else None
        )
        if msgtype == "m.emote":
            text = f"* {member.display_name} {text}"
        payload = {
            "event_id": event_id,
            "sender": member.to_json(),
            "text": text,
            "html": html,
            "ts": raw.get("origin_server_ts"),
        }
        async with self.stores.db.acquire() as conn, conn.transaction():
            for connector_id in targets:
                await self.stores.outbox.enqueue(
                    connector_id, room_id, SEND_MESSAGE, event_id, payload, conn=conn
                )
        self._outbox_notify()

    # Vendors -> Matrix -------------------------------------------------------------------------

    async def _remote_event(self, connector_id: str, event: RemoteEvent) -> None:
        if connector_id not in self.portals.connectors:
            raise PermanentFailure(f"connector {connector_id!r} is not running")
        if isinstance(event, ConversationCreated):
            await self.portals.open_from_remote(connector_id, event)
            self._outbox_notify()
        elif isinstance(event, MessageReceived):
            await self._remote_message(connector_id, event)

    async def _remote_message(self, connector_id: str, event: MessageReceived) -> None:
        if await self.stores.messages.event_for(connector_id, event.message_id):
            return
        room_id = await self.stores.portals.by_conversation(connector_id, event.conversation_id)
        if room_id is None:
            raise PermanentFailure(
                f"{connector_id} conversation {event.conversation_id} is not bridged to a room"
            )
        ghost = await self.portals.ghost(connector_id, event.sender)
        await self.hs.intent(ghost.mxid).ensure_joined(RoomID(room_id))
        event_id = await self.hs.send_message(
            ghost.mxid,
            room_id,
            {"msgtype": "m.text", "body": event.text},
            txn_id=derived_txn_id(connector_id, "message", event.message_id),
            ts_ms=_ms(event.timestamp),
        )
        await self.stores.messages.add(connector_id, event.message_id, room_id, event_id)


def _ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
