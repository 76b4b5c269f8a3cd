"""What every executor works with: the operation's ``Target`` (a connector and its conversation
for one portal room) and the ``Context`` of look-ups they share (the message map, mentions)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bridge.config import MediaConfig
from bridge.core.operations import parse_reaction_ref
from bridge.core.portals import Portals
from bridge.db.stores import Stores
from bridge.i18n import ngettext
from bridge.matrix.homeserver import Homeserver
from bridge.matrix.media import MediaRepository
from connectors.base import Capabilities, Connector, Mention
from connectors.idnps import Idnps


@dataclass(frozen=True)
class Target:
    """Where an operation goes: connector ``connector_id`` and its conversation for the portal
    room ``room_id``."""

    connector_id: str
    connector: Connector
    room_id: str
    conversation: str

    @property
    def caps(self) -> Capabilities:
        return self.connector.capabilities


@dataclass
class Context:
    stores: Stores
    hs: Homeserver
    media: MediaRepository
    media_config: MediaConfig
    portals: Portals | None = None
    """How members are shown to vendors (a native user never as a bare free name)."""

    async def message_ref(self, target: Target, event_id: str) -> str | None:
        """The vendor id of a message this portal carried (never one of another portal)."""
        for ref in await self.stores.messages.remotes_for(
            target.connector_id, event_id, room_id=target.room_id
        ):
            if parse_reaction_ref(ref) is None:
                return ref
        return None

    async def mentions(
        self, target: Target, mxids: list[str], notes: list[str] | None = None
    ) -> tuple[Mention, ...]:
        """The people ``mxids`` names, as the vendor lists them: past its ``max_mentions``, the
        others stay plain names in the text (and ``notes`` tells the sender)."""
        if not mxids:
            return ()
        people = list(dict.fromkeys(mxids))
        limit = target.caps.max_mentions
        if limit is not None and len(people) > limit:
            if notes is not None:
                others = len(people) - limit
                notes.append(
                    ngettext(
                        "{vendor} accepts at most {limit} mentions per message: the {n} other "
                        "is written as a plain name",
                        "{vendor} accepts at most {limit} mentions per message: the {n} others "
                        "are written as plain names",
                        others,
                    ).format(vendor=target.connector_id, limit=limit, n=others)
                )
            people = people[:limit]
        room_id = target.room_id
        portal = await self.stores.portals.get(room_id)
        found = []
        for mxid in people:
            ghost = await self.stores.ghosts.get(mxid)
            if ghost is not None:
                found.append(Mention(ghost.display_name or mxid, Idnps(ghost.idnps), mxid))
            elif portal is not None and self.portals is not None:
                member = await self.portals.sender(room_id, mxid, portal.voice)
                found.append(Mention(member.display_name, None, mxid))
            elif portal is not None:
                name = await self.hs.display_name(room_id, mxid, viewer=portal.voice)
                found.append(Mention(f"{name} ({mxid})" if name != mxid else mxid, None, mxid))
        return tuple(found)


def when(ts: Any) -> datetime:
    """An operation's ``ts`` (ms, from its Matrix event) as the vendor's timestamp."""
    return datetime.fromtimestamp((ts or 0) / 1000, tz=UTC)
