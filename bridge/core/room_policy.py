"""Rooms a ghost may be in: never one that anybody can join or read.

A room is *exposed* when its join rule is ``public`` (anyone may join; guest access then lets
even guests in) or its history is ``world_readable``. A ghost refuses an invite to such a room
(the invite's stripped state, then the room's state once joined) and leaves a portal that
becomes so later, with a reason and a notice; the change is logged and audited (the vendors'
APIs have no system message to carry it). Joins to portals are recorded (who, when, which
portal) for the vendor side to be told later.
"""

from __future__ import annotations

import logging
from typing import Any

from mautrix.errors import MatrixRequestError
from mautrix.types import RoomID

from bridge.core.ghost_ids import GhostIds
from bridge.core.members import BRIDGE_LEAVE
from bridge.core.system_notices import tell_everyone
from bridge.db.audit import AuditRecord
from bridge.db.clock import now_ms
from bridge.db.portal_join import PortalJoinStore
from bridge.db.stores import Stores
from bridge.i18n import _
from bridge.matrix.homeserver import Homeserver, derived_txn_id

log = logging.getLogger("eimis.room_policy")

POLICY_EVENTS = ("m.room.join_rules", "m.room.history_visibility", "m.room.guest_access")
ROOM_POLICY = "room_policy"
"""The audit log's direction of a ghost leaving an exposed portal."""


def exposure(state: dict[str, dict[str, Any]]) -> str | None:
    """Why a room with this state (type -> content) is exposed, for its members (in the
    bridge's locale); None when it is not."""
    join_rule = state.get("m.room.join_rules", {}).get("join_rule")
    history = state.get("m.room.history_visibility", {}).get("history_visibility")
    guests = state.get("m.room.guest_access", {}).get("guest_access")
    if join_rule == "public":
        if guests == "can_join":
            return _("the room is public and open to guests: anyone can join it")
        return _("the room is public: anyone can join it")
    if history == "world_readable":
        return _("the room's history is readable by everyone")
    return None


def not_relayed(reason: str) -> str:
    """What the room and the vendors' users read when a portal stops being bridged."""
    return _("Conversation not relayed: {reason}. Messages are no longer passed on.").format(
        reason=reason
    )


def stripped_state(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An invite's stripped room state (``unsigned.invite_room_state``) as type -> content."""
    unsigned = raw.get("unsigned")
    events = unsigned.get("invite_room_state") if isinstance(unsigned, dict) else None
    state: dict[str, dict[str, Any]] = {}
    for event in events if isinstance(events, list) else []:
        if (
            isinstance(event, dict)
            and event.get("state_key", "") == ""
            and isinstance(event.get("type"), str)
            and isinstance(event.get("content"), dict)
        ):
            state[event["type"]] = event["content"]
    return state


class RoomPolicy:
    def __init__(self, stores: Stores, homeserver: Homeserver, ids: GhostIds) -> None:
        self.stores = stores
        self.hs = homeserver
        self.ids = ids
        self.joins = PortalJoinStore(stores.db)
        self._exposed: set[str] = set()
        """Portals found exposed by this process: no ghost joins them again."""

    def is_exposed(self, room_id: str) -> bool:
        return room_id in self._exposed

    def mark_exposed(self, room_id: str) -> None:
        self._exposed.add(room_id)

    async def room_state(self, viewer: str, room_id: str) -> dict[str, dict[str, Any]]:
        """The policy's state events of a room, as ``viewer`` (a member) sees them."""
        state: dict[str, dict[str, Any]] = {}
        for event_type in POLICY_EVENTS:
            content = await self.hs.get_state(viewer, room_id, event_type)
            if content is not None:
                state[event_type] = content
        return state

    async def refusal(self, viewer: str, room_id: str) -> str | None:
        """Why the room must not be bridged, as ``viewer`` (joined) sees it now; None if fine."""
        if room_id in self._exposed:
            return _("the room is open to anyone")
        return exposure(await self.room_state(viewer, room_id))

    async def leave(self, room_id: str, ghost_mxid: str, reason: str) -> None:
        """The ghost says why in the room, then leaves it with that reason."""
        text = not_relayed(reason)
        log.info("Leaving exposed room %s as %s", room_id, ghost_mxid)
        try:
            await self.hs.send_event(
                ghost_mxid,
                room_id,
                "m.room.message",
                {"msgtype": "m.notice", "body": text},
                txn_id=derived_txn_id("exposed", room_id, ghost_mxid),
            )
        except MatrixRequestError as error:
            log.warning("Could not say why in %s (%s)", room_id, error.errcode)
        try:
            await self.hs.intent(ghost_mxid).leave_room(
                RoomID(room_id),
                reason=reason,
                extra_content={"reason": reason, BRIDGE_LEAVE: "room_policy"},
            )
        except MatrixRequestError as error:
            log.warning("Could not leave %s as %s (%s)", room_id, ghost_mxid, error.errcode)

    async def observe(self, raw: dict[str, Any]) -> None:
        """A state event arrived: record a join to a portal; leave a portal made exposed."""
        room_id = raw.get("room_id")
        content = raw.get("content")
        if not isinstance(room_id, str) or not isinstance(content, dict):
            return
        kind = raw.get("type")
        if kind == "m.room.member":
            await self._member(room_id, raw, content)
        elif kind in POLICY_EVENTS and raw.get("state_key") == "":
            await self._policy_changed(room_id, raw, kind, content)

    async def _member(self, room_id: str, raw: dict[str, Any], content: dict[str, Any]) -> None:
        if content.get("membership") != "join":
            return
        unsigned = raw.get("unsigned")
        prev = unsigned.get("prev_content") if isinstance(unsigned, dict) else None
        if isinstance(prev, dict) and prev.get("membership") == "join":
            return  # a new display name or avatar, not a join
        user_id, event_id = raw.get("state_key"), raw.get("event_id")
        if not isinstance(user_id, str) or not isinstance(event_id, str):
            return
        if user_id == self.ids.bot_mxid or await self.stores.portals.get(room_id) is None:
            return
        at = raw.get("origin_server_ts")
        await self.joins.record(
            room_id, user_id, event_id, int(at) if isinstance(at, int) else now_ms()
        )

    async def _policy_changed(
        self, room_id: str, raw: dict[str, Any], kind: str, content: dict[str, Any]
    ) -> None:
        portal = await self.stores.portals.get(room_id)
        if portal is None:
            return
        try:
            members = await self.hs.joined_members(room_id, viewer=portal.voice)
        except MatrixRequestError as error:
            log.warning("Members of %s not readable (%s)", room_id, error.errcode)
            return
        ghosts = [m for m in members if self.ids.parse(m) is not None]
        viewer = ghosts[0] if ghosts else portal.voice
        try:
            state = await self.room_state(viewer, room_id)
        except MatrixRequestError as error:
            log.warning("State of %s not readable (%s)", room_id, error.errcode)
            state = {}
        state[kind] = content  # what this event says, whatever the homeserver answers first
        reason = exposure(state)
        if reason is None:
            self._exposed.discard(room_id)  # closed again: ghosts may be brought back
            return
        self._exposed.add(room_id)
        log.warning("Portal %s became open to anyone (%s): its ghosts leave", room_id, kind)
        # The vendor users are told why their conversation stops (queued before the links close:
        # what was queued is still delivered).
        await tell_everyone(
            self.stores,
            room_id,
            not_relayed(reason),
            key=derived_txn_id("exposed", room_id, kind, str(raw.get("event_id"))),
        )
        for ghost in ghosts:
            await self.leave(room_id, ghost, reason)
        for link in await self.stores.portals.links(room_id):
            await self.stores.audit.record(
                AuditRecord(
                    at=now_ms(),
                    connector=link.connector,
                    direction=ROOM_POLICY,
                    kind="conversation",
                    outcome="refused",
                    sender=str(raw.get("sender")),
                    portal=room_id,
                    event_id=str(raw.get("event_id")),
                    detail=f"room_exposed:{kind}",
                )
            )
