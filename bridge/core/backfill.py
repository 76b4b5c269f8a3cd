"""Backfill: a new portal gets its conversation's earlier messages, before any newer one.

When the bridge first links a conversation of a vendor that can read its history
(``HistorySource``), the latest ``portal.backfill.max_messages`` messages written in the last
``max_age_days`` days go into the portal, oldest first, each by its sender's ghost with its
original time (the appservice ``ts``). They take the path of live messages (``ToMatrix``'s):
mapped, relayed to the portal's other vendors, deduplicated.

It runs inside the handling of ``ConversationCreated``, so the conversation's inbox lane (which
is ordered) holds newer messages until it is done. Each message is committed as it is put in: a
crash midway, then the redelivered creation, skips what is already there (the message map), and
a send the crash left unrecorded is found by its derived transaction id or in the room's latest
events. A message that cannot be put in (its sender unknown to every directory, a file refused)
is skipped, counted and logged without its content; it never holds the others.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime, timedelta

from cachetools import LRUCache
from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import RoomID

from bridge.config import BackfillConfig
from bridge.core.audit_trail import Trail
from bridge.core.portals import Portals
from bridge.db.group_commit import Write
from bridge.db.stores import Stores
from connectors.base import Connector, HistorySource, MessageReceived

log = logging.getLogger("eimis.backfill")

VISITOR_KEY = "eu.eimis.backfill_visitor"
"""On the leave of a ghost that came in only to show a former member's earlier messages: the
vendors need not be told (they never had them back)."""
ROOMS_REMEMBERED = 10_000

PutMessage = Callable[[Connector, str, str, MessageReceived, bool], Awaitable[list[Write]]]
"""Puts one message in a portal as a live one (``ToMatrix``); the last argument: look at the
room first (a send may have happened unrecorded). Returns the writes that record it (none:
it was there already)."""


class Backfill:
    def __init__(
        self,
        stores: Stores,
        portals: Portals,
        trail: Trail,
        config: BackfillConfig,
        *,
        put: PutMessage,
        outsiders: Callable[[str], Awaitable[list[str]]],
        outbox_notify: Callable[[], None],
    ) -> None:
        """``outsiders``: the untrusted servers with a member in a room (nothing goes in)."""
        self.stores = stores
        self.portals = portals
        self.trail = trail
        self.config = config
        self._put = put
        self._outsiders = outsiders
        self._outbox_notify = outbox_notify
        self.skipped = 0
        """Messages of histories that could not be put in (since start)."""
        self._rooms: LRUCache[str, bool] = LRUCache(ROOMS_REMEMBERED)

    def filled(self, room_id: str) -> bool:
        """Whether this process put history in the room: a live message may be one of it (the
        message map is read before it is sent)."""
        return room_id in self._rooms

    async def _visiting(
        self,
        connector_id: str,
        room_id: str,
        message: MessageReceived,
        members: Collection[str],
        visitors: list[str],
    ) -> None:
        """A message of someone no longer in the conversation: their ghost comes in for their
        messages, then leaves (``_see_out``). Every vendor side is told first that they are
        there, so the join is news to none of them. Raises ``UnknownUser`` when their vendor
        no longer describes them."""
        mxid = self.portals.ids.mxid(connector_id, message.sender)
        if mxid in members or mxid in visitors:
            return
        await self.portals.ghost(connector_id, message.sender)
        for link in await self.stores.portals.links(room_id):
            await self.stores.portals.add_participants(room_id, link.connector, [mxid])
        visitors.append(mxid)

    async def _see_out(self, room_id: str, mxid: str) -> None:
        """A former member's ghost, done showing their messages, leaves."""
        try:
            await self.portals.hs.intent(mxid).leave_room(
                RoomID(room_id), extra_content={VISITOR_KEY: True}
            )
        except MatrixRequestError as error:
            log.warning("A former member's ghost could not leave %s (%s)", room_id, error.errcode)
        self.portals.member_changed(room_id, mxid, "leave")

    async def run(
        self,
        connector: Connector,
        connector_id: str,
        room_id: str,
        conversation_id: str,
        *,
        rerun: bool = False,
        members: Collection[str] = (),
        now: datetime | None = None,
    ) -> int:
        """Put the conversation's history in its portal; returns how many messages went in.

        ``members``: the ghosts of the conversation's current members; a message of anyone
        else is shown by their ghost, which then leaves (``VISITOR_KEY`` on its leave).

        ``rerun``: this portal was opened before (a retry after a crash): a message may have
        been sent without being recorded, so the room is looked at before each send.
        """
        limit = self.config.max_messages
        if limit <= 0 or not isinstance(connector, HistorySource):
            return 0
        since = (now or datetime.now(UTC)) - timedelta(days=self.config.max_age_days)
        try:
            history = list(await connector.history(conversation_id, limit=limit, since=since))
        except Exception as error:  # noqa: BLE001 - a vendor's failure: the portal goes on
            log.warning(
                "Could not read the history of a %s conversation (%s): the portal starts "
                "without it",
                connector_id,
                type(error).__name__,
            )
            return 0
        if await self._outsiders(room_id):
            log.warning("No backfill in %s: members of untrusted servers are in it", room_id)
            return 0
        messages = [
            m
            for m in history
            if isinstance(m, MessageReceived) and m.conversation_id == conversation_id
        ]
        skipped = len(history) - len(messages)
        messages = messages[-limit:]
        messages.sort(key=lambda m: _ms(m.timestamp))  # stable: same time, the vendor's order
        put = 0
        visitors: list[str] = []
        for message in messages:
            if await self.stores.messages.event_for(
                connector_id, message.message_id, room_id=room_id
            ):
                continue  # put in before this run was cut short
            try:
                await self._visiting(connector_id, room_id, message, members, visitors)
                writes = await self._put(connector, connector_id, room_id, message, rerun)
            except MatrixConnectionError:
                raise  # the homeserver is away: the whole creation is retried later
            except MatrixRequestError as error:
                if error.http_status >= 500 or error.http_status == 429:
                    raise
                skipped += 1
                log.warning(
                    "Backfill: a %s message was skipped (homeserver: %s)",
                    connector_id,
                    error.errcode,
                )
                continue
            except Exception as error:  # noqa: BLE001 - one message never holds the others
                skipped += 1
                log.warning(
                    "Backfill: a %s message was skipped (%s)", connector_id, type(error).__name__
                )
                continue
            if writes:
                await self.stores.commit.commit(writes)
                self.trail.committed(writes, None)
                put += 1
        for mxid in visitors:
            await self._see_out(room_id, mxid)
        self.skipped += skipped
        if put:
            self._rooms[room_id] = True
            self._outbox_notify()
        log.info(
            "Backfill of a %s conversation into %s: %d message(s) put in, %d skipped",
            connector_id,
            room_id,
            put,
            skipped,
        )
        return put


def _ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
