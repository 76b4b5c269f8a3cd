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
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from mautrix.errors import MatrixConnectionError, MatrixRequestError

from bridge.config import BackfillConfig
from bridge.core.audit_trail import Trail
from bridge.db.group_commit import Write
from bridge.db.stores import Stores
from connectors.base import Connector, HistorySource, MessageReceived

log = logging.getLogger("eimis.backfill")

PutMessage = Callable[[Connector, str, str, MessageReceived, bool], Awaitable[list[Write]]]
"""Puts one message in a portal as a live one (``ToMatrix``); the last argument: look at the
room first (a send may have happened unrecorded). Returns the writes that record it (none:
it was there already)."""


class Backfill:
    def __init__(
        self,
        stores: Stores,
        trail: Trail,
        config: BackfillConfig,
        *,
        put: PutMessage,
        outsiders: Callable[[str], Awaitable[list[str]]],
        outbox_notify: Callable[[], None],
    ) -> None:
        """``outsiders``: the untrusted servers with a member in a room (nothing goes in)."""
        self.stores = stores
        self.trail = trail
        self.config = config
        self._put = put
        self._outsiders = outsiders
        self._outbox_notify = outbox_notify
        self.skipped = 0
        """Messages of histories that could not be put in (since start)."""

    async def run(
        self,
        connector: Connector,
        connector_id: str,
        room_id: str,
        conversation_id: str,
        *,
        rerun: bool = False,
        now: datetime | None = None,
    ) -> int:
        """Put the conversation's history in its portal; returns how many messages went in.

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
        for message in messages:
            try:
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
        self.skipped += skipped
        if put:
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
