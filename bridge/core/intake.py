"""Vendor events into the inbox: what a connector's ``emit`` does.

A connector acknowledges its vendor (or moves its poll cursor) once ``emit`` returns, so an
event is stored (group-committed: concurrent webhook deliveries share one transaction) before
that, and the inbox worker is woken for it.

Every remote id an event holds is checked here, once for all connectors (``connectors.kit.ids``:
non-empty, bounded, no control characters): a batch holding an id the stores cannot key is
refused whole with ``InvalidRemoteId`` (a ``ValueError``), before anything is written; the
connector answers its vendor 400 for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bridge.core.router import remote_lane
from bridge.db.group_commit import GroupCommit
from bridge.db.inbox import InboxStore
from connectors.base import REMOTE_EVENT_TYPES, BatchSink, EventSink, RemoteEvent, event_to_json
from connectors.kit.ids import check_event_ids


class VendorIntake:
    def __init__(self, inbox: InboxStore, commits: GroupCommit, notify: Callable[[], None]) -> None:
        self._inbox = inbox
        self._commits = commits
        self._notify = notify

    def emitter(self, connector_id: str) -> EventSink:
        store = self.batch_emitter(connector_id)

        async def emit(event: RemoteEvent) -> None:
            await store([event])

        return emit

    def batch_emitter(self, connector_id: str) -> BatchSink:
        async def store(events: Sequence[RemoteEvent]) -> None:
            for event in events:
                if not isinstance(event, REMOTE_EVENT_TYPES):
                    raise TypeError(f"connectors emit RemoteEvent, not {type(event).__name__}")
                check_event_ids(event)
            await self._commits.commit(
                [
                    self._inbox.remote_write(
                        connector_id,
                        event.event_id,
                        remote_lane(connector_id, event.conversation_id),
                        event_to_json(event),
                    )
                    for event in events
                ]
            )
            self._notify()

        return store
