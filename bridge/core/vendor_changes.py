"""Vendors -> Matrix: who is in a conversation, and what it is called, as its vendor changes it.

A vendor user adds people (``ParticipantsAdded``), removes them (``ParticipantsRemoved``),
leaves (``MemberLeft``), renames the conversation or changes its topic. The portal follows, as
done by that user's ghost (the bot for what only it may do: removing a Matrix user).

No echo: before the room changes, the change is recorded in the source connector's
``portal_participant`` rows, so the membership event the homeserver then sends is routed to the
portal's other vendors only (``from_matrix``), never back to the one that made it. A title or
topic is relayed at once to the other vendors as the ``m.room.name`` / ``m.room.topic`` event it
is (or stands for), the same routing as any room event.

Every call is idempotent: membership calls accept "already in" and "already gone", sends use
transaction ids derived from the vendor event.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from mautrix.errors import IntentError, MatrixRequestError
from mautrix.types import RoomID, UserID

from bridge.core.audit_trail import Trail
from bridge.core.errors import NotInDirectory, UnknownUser
from bridge.core.members import Member
from bridge.core.portals import Portals, not_in_directory, refused_notice, unreachable_notice
from bridge.core.send_status import StatusReporter
from bridge.db.group_commit import Write
from bridge.db.stores import Stores
from bridge.i18n import _
from bridge.matrix.homeserver import Homeserver, derived_txn_id
from connectors.base import (
    ConversationRenamed,
    MemberLeft,
    Participant,
    ParticipantsAdded,
    ParticipantsRemoved,
    TopicChanged,
)

log = logging.getLogger("eimis.vendor_changes")

Relayed = Callable[..., Awaitable[list[Write]]]
"""``ToMatrix._relayed``: the deliveries of an event a ghost sent, for the other vendors."""
GhostIn = Callable[[str, Any, str], Awaitable[str]]
"""``ToMatrix._ghost``: a vendor user's ghost, joined to the room."""

VendorChange = (
    ParticipantsAdded | ParticipantsRemoved | MemberLeft | ConversationRenamed | TopicChanged
)
VENDOR_CHANGES = (
    ParticipantsAdded,
    ParticipantsRemoved,
    MemberLeft,
    ConversationRenamed,
    TopicChanged,
)
"""The events this module handles."""


def removed_by(name: str) -> str:
    return _("Removed from the conversation by {name}").format(name=name)


def nobody_left(connector_id: str) -> str:
    return _(
        "No {connector} participant is left in this conversation: it is no longer relayed to "
        "{connector}."
    ).format(connector=connector_id)


def renamed(name: str, title: str | None) -> str:
    if not title:
        return _("{name} removed the conversation's title.").format(name=name)
    return _("{name} renamed the conversation: “{title}”").format(name=name, title=title)


def topic_changed(name: str, topic: str | None) -> str:
    if not topic:
        return _("{name} removed the conversation's topic.").format(name=name)
    return _("{name} changed the conversation's topic: “{topic}”").format(name=name, topic=topic)


class VendorChanges:
    def __init__(
        self,
        stores: Stores,
        homeserver: Homeserver,
        portals: Portals,
        status: StatusReporter,
        trail: Trail,
        ghost_in: GhostIn,
        relayed: Relayed,
    ) -> None:
        self.stores = stores
        self.hs = homeserver
        self.portals = portals
        self.ids = portals.ids
        self.status = status
        self.trail = trail
        self._ghost_in = ghost_in
        self._relayed = relayed

    async def handle(self, connector_id: str, room_id: str, event: VendorChange) -> list[Write]:
        if isinstance(event, ParticipantsAdded):
            await self._added(connector_id, room_id, event)
        elif isinstance(event, ParticipantsRemoved):
            await self._removed(connector_id, room_id, event)
        elif isinstance(event, MemberLeft):
            await self._left(connector_id, room_id, event)
        else:
            return await self._retitled(connector_id, room_id, event)
        return [self.trail.to_matrix(connector_id, event, room_id, "sent")]

    # Adding ------------------------------------------------------------------------------------

    async def _added(self, source: str, room_id: str, event: ParticipantsAdded) -> None:
        inviter = await self._ghost_in(source, event.sender, room_id)
        people = self.stores.portals
        refused: list[str] = []
        unreachable: list[str] = []
        for idnps in dict.fromkeys(event.members):
            try:
                member = await self.portals.ghost(source, idnps)
            except NotInDirectory:
                refused.append(not_in_directory(str(idnps)))
                continue
            except UnknownUser:
                unreachable.append(str(idnps))
                continue
            await people.add_participants(room_id, source, [member.mxid])
            await self.portals.invite(room_id, inviter, member.mxid)
            await self.portals.ensure_joined(room_id, member.mxid)
        for participant in dict.fromkeys(event.participants):
            member = await self.portals.resolve(source, participant)
            if member is None:
                unreachable.append(_named(participant))
                continue
            reason = await self.portals.invite_refusal(inviter, member.mxid, member.idnps)
            if reason is not None:
                log.info("Not inviting %s to a %s conversation: %s", member.mxid, source, reason)
                refused.append(f"{_named(participant)} ({reason})")
                continue
            await people.add_participants(room_id, source, [member.mxid])
            await self.portals.invite(room_id, inviter, member.mxid)
            if member.connector is not None:
                await self.portals.ensure_joined(room_id, member.mxid)
                await self._linked(room_id, member)
        key = event.event_id
        if unreachable:
            await self.status.tell_everyone(
                room_id,
                unreachable_notice(unreachable),
                txn_id=derived_txn_id(source, "unreachable", key),
            )
        if refused:
            await self.status.tell_everyone(
                room_id, refused_notice(refused), txn_id=derived_txn_id(source, "refused", key)
            )

    async def _linked(self, room_id: str, member: Member) -> None:
        """A ghost of another vendor joined: that vendor gets the conversation (queued), or the
        link it had again."""
        assert member.connector is not None
        link = await self.stores.portals.link(room_id, member.connector)
        if link is None:
            portal = await self.stores.portals.get(room_id)
            voice = portal.voice if portal is not None else self.ids.bot_mxid
            everyone = await self.portals.room_members(room_id, voice)
            if member.mxid not in {m.mxid for m in everyone}:
                everyone.append(member)
            await self.portals.link_connector(room_id, member.connector, everyone)
        elif link.closed:
            await self.stores.portals.reopen_link(room_id, member.connector)

    # Removing ----------------------------------------------------------------------------------

    async def _removed(self, source: str, room_id: str, event: ParticipantsRemoved) -> None:
        remover = await self.portals.ghost(source, event.sender)
        reason = removed_by(remover.display_name)
        portal = await self.stores.portals.get(room_id)
        voice = portal.voice if portal is not None else self.ids.bot_mxid
        targets = [self.ids.mxid(source, idnps) for idnps in dict.fromkeys(event.members)]
        known = await self.stores.portals.participants(room_id, source)
        for participant in dict.fromkeys(event.participants):
            targets += await self._meant(room_id, voice, participant, known)
        for mxid in dict.fromkeys(targets):
            await self.stores.portals.remove_participants(room_id, source, [mxid])
            if self.ids.parse(mxid) is not None:
                await self._leave(room_id, mxid, reason)
            else:
                await self._kick(room_id, voice, mxid, reason)
        await self._still_there(source, room_id, voice, event.event_id)

    async def _meant(
        self, room_id: str, voice: str, participant: Participant, known: set[str]
    ) -> list[str]:
        """The room members a vendor means by a person outside it (by IDNPS: any of that
        professional's accounts the vendor side was told of, or that is in the room)."""
        if participant.mxid is not None:
            return [participant.mxid]
        assert participant.idnps is not None
        candidates = {self.ids.mxid(c, participant.idnps) for c in self.portals.connectors.ids()}
        candidates |= {m.mxid for m in await self.stores.directory.mxids(participant.idnps)}
        present = known | set(await self.hs.joined_members(room_id, viewer=voice))
        return sorted(candidates & present)

    async def _leave(self, room_id: str, mxid: str, reason: str | None) -> None:
        """The ghost leaves (already gone is fine)."""
        with contextlib.suppress(IntentError):
            await self.hs.intent(mxid).leave_room(RoomID(room_id), reason=reason)
        self.portals.member_changed(room_id, mxid, "leave")

    async def _kick(self, room_id: str, voice: str, mxid: str, reason: str) -> None:
        """A Matrix user is removed by the portal's voice (already gone is fine)."""
        try:
            await self.hs.intent(voice).kick_user(RoomID(room_id), UserID(mxid), reason=reason)
        except MatrixRequestError as error:
            if error.http_status != 403:
                raise
            # Not in the room any more, or a room where the voice lacks the power.
            log.warning("Could not remove a member of %s (%s)", room_id, error.errcode)
        self.portals.member_changed(room_id, mxid, "leave")

    async def _left(self, source: str, room_id: str, event: MemberLeft) -> None:
        mxid = self.ids.mxid(source, event.sender)
        await self.stores.portals.remove_participants(room_id, source, [mxid])
        await self._leave(room_id, mxid, None)
        portal = await self.stores.portals.get(room_id)
        voice = portal.voice if portal is not None else self.ids.bot_mxid
        await self._still_there(source, room_id, voice, event.event_id)

    async def _still_there(self, source: str, room_id: str, voice: str, key: str) -> None:
        """When nobody of ``source`` is left in the portal, its link is closed (what was queued
        for it is still delivered) and the room is told."""
        members = await self.hs.joined_members(room_id, viewer=voice)
        if any((ref := self.ids.parse(m)) is not None and ref.connector == source for m in members):
            return
        link = await self.stores.portals.link(room_id, source)
        if link is None or link.closed:
            return
        await self.stores.portals.close_link(room_id, source)
        log.info("Closed the %s link of portal %s: none of its users is left", source, room_id)
        await self.status.tell_everyone(
            room_id,
            nobody_left(source),
            txn_id=derived_txn_id(source, "nobody-left", key),
        )

    # Titles and topics -------------------------------------------------------------------------

    async def _retitled(
        self, source: str, room_id: str, event: ConversationRenamed | TopicChanged
    ) -> list[Write]:
        ghost = await self._ghost_in(source, event.sender, room_id)
        if isinstance(event, ConversationRenamed):
            state_type, key, value = "m.room.name", "name", event.title
        else:
            state_type, key, value = "m.room.topic", "topic", event.topic
        content = {key: value or ""}
        event_id: str | None = None
        if self.hs.titles_in_room_state:
            try:
                event_id = await self.hs.put_state(ghost, room_id, state_type, content)
            except MatrixRequestError as error:
                if error.http_status != 403:
                    raise
                # A room a Matrix user opened, where members may not rename: said instead.
                log.info("No power level to set %s in %s", state_type, room_id)
        if event_id is None:
            name = (await self.portals.ghost(source, event.sender)).display_name
            text = renamed(name, value) if key == "name" else topic_changed(name, value)
            event_id = await self.hs.send_message(
                ghost,
                room_id,
                {"msgtype": "m.notice", "body": text},
                txn_id=derived_txn_id(source, state_type, event.event_id),
                ts_ms=_ms(event.timestamp),
            )
        audit = self.trail.to_matrix(source, event, room_id, "sent", event_id=event_id)
        relayed = await self._relayed(
            room_id, ghost, event_id, state_type, content, _ms(event.timestamp), state_key=""
        )
        return [audit, *relayed]


def _named(participant: Participant) -> str:
    return str(participant.idnps or participant.mxid)


def _ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
