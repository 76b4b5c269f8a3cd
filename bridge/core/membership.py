"""Matrix -> vendors: who is in a portal, and what it is called.

A join in a portal adds that person to each open vendor conversation whose side was not yet
told of them (``portal_participant``): a ghost of connector X joining is X's own user joining
(``AddParticipants.members`` for X, ``external`` everywhere else); anyone else is external
everywhere. A leave, a kick or a ban removes the person from each side that has them. What
each side was told is recorded in the same commit as the deliveries (the writes returned), so
a change is routed once per side, and never back to the side that made it: the vendor → Matrix
path records its own changes before it makes them on Matrix.

A rename (``m.room.name``) or a new topic (``m.room.topic``) goes to every open side but the
one whose ghost made it. Membership changes of the bridge bot are not bridged.

A native user joining a portal the bot speaks for is raised to ``MEMBER_LEVEL`` (they may then
remove a ghost), best effort.
"""

from __future__ import annotations

import logging
from typing import Any

from mautrix.errors import MatrixRequestError

from bridge.core import operations as op
from bridge.core.backfill import VISITOR_KEY
from bridge.core.members import BRIDGE_LEAVE, Member
from bridge.core.portals import Portals
from bridge.db.group_commit import Write
from bridge.db.portal import Portal
from bridge.db.stores import Stores
from bridge.matrix.homeserver import MEMBER_LEVEL, Homeserver

log = logging.getLogger("eimis.membership")

POWER_LEVELS = "m.room.power_levels"


class Membership:
    def __init__(self, stores: Stores, homeserver: Homeserver, portals: Portals) -> None:
        self.stores = stores
        self.hs = homeserver
        self.portals = portals
        self.ids = portals.ids

    # Joins and leaves --------------------------------------------------------------------------

    async def changed(self, raw: dict[str, Any]) -> list[Write]:
        """The writes an ``m.room.member`` event calls for (a join or a departure)."""
        target = raw.get("state_key")
        content = raw.get("content")
        if not isinstance(target, str) or not isinstance(content, dict):
            return []
        if target == self.ids.bot_mxid:
            return []
        if self.ids.in_namespace(target) and self.ids.parse(target) is None:
            return []  # a namespace user that is no ghost of ours: nobody to tell about
        membership = content.get("membership")
        if membership not in ("join", "leave", "ban"):
            return []
        if membership == "join" and _previous(raw) == "join":
            return []  # a new display name or avatar: nobody joined
        portal = await self.stores.portals.get(str(raw["room_id"]))
        if portal is None:
            return []
        if membership == "join":
            return await self._joined(raw, portal, target)
        return await self._left(raw, portal, target, content)

    async def _joined(self, raw: dict[str, Any], portal: Portal, target: str) -> list[Write]:
        room_id = portal.room_id
        ref = self.ids.parse(target)
        if ref is None and portal.voice == self.ids.bot_mxid:
            await self._raise(room_id, target)
        member = await self.portals.sender(room_id, target, portal.voice)
        writes: list[Write] = []
        for link in await self.stores.portals.open_links(room_id):
            if link.connector not in self.portals.connectors:
                continue
            if target in await self.stores.portals.participants(room_id, link.connector):
                continue
            if ref is not None and ref.connector == link.connector:
                add = op.AddParticipants(event_id=raw["event_id"], members=(ref.idnps,))
            else:
                add = op.AddParticipants(event_id=raw["event_id"], external=(member,))
            writes += self._tell(raw, link.connector, add)
            writes.append(
                self.stores.portals.add_participant_write(room_id, link.connector, target)
            )
        return writes

    async def _left(
        self, raw: dict[str, Any], portal: Portal, target: str, content: dict[str, Any]
    ) -> list[Write]:
        room_id = portal.room_id
        sender = str(raw.get("sender"))
        by: Member | None = None
        if sender not in (target, self.ids.bot_mxid):
            by = await self.portals.sender(room_id, sender, portal.voice)
        reason = content.get("reason")
        reason = reason[:500] if isinstance(reason, str) and reason.strip() else None
        ref = self.ids.parse(target)
        if ref is not None and sender == target and isinstance(content.get(BRIDGE_LEAVE), str):
            return []  # the bridge's own reasons (room policy, erasure ...): nobody left
        if ref is not None and sender == target and content.get(VISITOR_KEY) is True:
            # A former member's ghost that came in only to show their earlier messages
            # (backfill): no vendor side ever had them back, so none is told they left.
            return [
                self.stores.portals.remove_participant_write(room_id, link.connector, target)
                for link in await self.stores.portals.links(room_id)
            ]
        member: Member | None = None
        writes: list[Write] = []
        for link in await self.stores.portals.open_links(room_id):
            if link.connector not in self.portals.connectors:
                continue
            if target not in await self.stores.portals.participants(room_id, link.connector):
                continue
            if ref is not None and ref.connector == link.connector:
                remove = op.RemoveParticipants(
                    event_id=raw["event_id"], members=(ref.idnps,), by=by, reason=reason
                )
            else:
                member = member or await self.portals.sender(room_id, target, portal.voice)
                remove = op.RemoveParticipants(
                    event_id=raw["event_id"], external=(member,), by=by, reason=reason
                )
            writes += self._tell(raw, link.connector, remove)
            writes.append(
                self.stores.portals.remove_participant_write(room_id, link.connector, target)
            )
        return writes

    async def _raise(self, room_id: str, mxid: str) -> None:
        """A native member of a portal the bot speaks for may remove ghosts (``MEMBER_LEVEL``):
        read-modify-write of the power levels by the bot, skipped when already at or above."""
        bot = self.ids.bot_mxid
        try:
            levels = await self.hs.get_state(bot, room_id, POWER_LEVELS)
            if levels is None or _level_of(levels, mxid) >= MEMBER_LEVEL:
                return
            users = levels.get("users")
            users = dict(users) if isinstance(users, dict) else {}
            users[mxid] = MEMBER_LEVEL
            await self.hs.put_state(bot, room_id, POWER_LEVELS, {**levels, "users": users})
        except MatrixRequestError as error:
            log.warning("Could not raise a member's power level in %s (%s)", room_id, error.errcode)

    # Name and topic ----------------------------------------------------------------------------

    async def renamed(self, raw: dict[str, Any]) -> list[Write]:
        """``m.room.name`` / ``m.room.topic`` in a portal → ``SetTitle`` / ``SetTopic`` to every
        open side but the one whose ghost made it (a vendor's rename relayed comes back here)."""
        if raw.get("state_key", "") != "":
            return []
        sender = raw.get("sender")
        content = raw.get("content")
        if not isinstance(sender, str) or not isinstance(content, dict):
            return []
        if sender == self.ids.bot_mxid:
            return []
        source = self.ids.parse(sender)
        if source is None and self.ids.in_namespace(sender):
            return []
        portal = await self.stores.portals.get(str(raw.get("room_id")))
        if portal is None:
            return []
        if raw.get("type") == "m.room.name" and _text(content.get("name")) != portal.title:
            # What a vendor linked later is given as the conversation's title.
            await self.stores.portals.set_title(portal.room_id, _text(content.get("name")))
        targets = [
            link.connector
            for link in await self.stores.portals.open_links(portal.room_id)
            if (source is None or link.connector != source.connector)
            and link.connector in self.portals.connectors
        ]
        if not targets:
            return []
        by = await self.portals.sender(portal.room_id, sender, portal.voice)
        change: op.SetTitle | op.SetTopic
        if raw.get("type") == "m.room.name":
            title = _text(content.get("name"))
            change = op.SetTitle(event_id=raw["event_id"], title=title, by=by)
        else:
            change = op.SetTopic(event_id=raw["event_id"], topic=_text(content.get("topic")), by=by)
        return [w for connector in targets for w in self._tell(raw, connector, change)]

    def _tell(self, raw: dict[str, Any], connector: str, operation: op.Operation) -> list[Write]:
        """The delivery of ``operation`` to ``connector``, keyed by the event (a repeat, such as
        the homeserver's push of an event already relayed, changes nothing)."""
        return [
            self.stores.outbox.enqueue_write(
                connector, raw["room_id"], operation.kind, raw["event_id"], operation.to_json()
            )
        ]


def _level_of(levels: dict[str, Any], mxid: str) -> int:
    users = levels.get("users") if isinstance(levels.get("users"), dict) else {}
    value = users.get(mxid, levels.get("users_default", 0))
    return int(value) if isinstance(value, int | float) else 0


def _previous(raw: dict[str, Any]) -> Any:
    """The membership before this event, when the homeserver says (``unsigned.prev_content``)."""
    unsigned = raw.get("unsigned")
    previous = unsigned.get("prev_content") if isinstance(unsigned, dict) else None
    return previous.get("membership") if isinstance(previous, dict) else None


def _text(value: Any) -> str | None:
    """A name or topic as vendors get it (None: none)."""
    return value if isinstance(value, str) and value.strip() else None
