"""Portals and ghosts: opening a Matrix room for a conversation, and the people in it."""

from __future__ import annotations

import contextlib
import logging

from cachetools import LRUCache
from mautrix.errors import IntentError, MatrixRequestError
from mautrix.types import EventType, Membership, RoomID, UserID

from bridge.core import operations as op
from bridge.core.connectors import ConnectorSet
from bridge.core.errors import NotInDirectory, PermanentFailure, UnknownUser
from bridge.core.ghost_ids import GhostIds
from bridge.core.members import BRIDGE_LEAVE, Member
from bridge.core.room_policy import RoomPolicy
from bridge.core.system_notices import tell_everyone
from bridge.crypto.machine import Crypto
from bridge.db.directory import GHOST, display_name
from bridge.db.portal import Portal
from bridge.db.stores import Stores
from bridge.directory.choice import reachable
from bridge.i18n import _
from bridge.matrix.homeserver import Homeserver, derived_txn_id
from bridge.values.trust import server_of
from connectors.base import ConversationCreated, Participant, RemoteUser
from connectors.idnps import Idnps

log = logging.getLogger("eimis.portals")

CAPABILITIES_EVENT = EventType.find("eu.eimis.bridge.capabilities", EventType.Class.STATE)
MEMBER_CACHE_SIZE = 50_000


class Portals:
    def __init__(
        self,
        stores: Stores,
        homeserver: Homeserver,
        connectors: ConnectorSet,
        ids: GhostIds,
        *,
        crypto: Crypto | None = None,
        require_encryption: bool = False,
        require_directory_entry: bool = False,
    ) -> None:
        self.stores = stores
        self.hs = homeserver
        self.crypto = crypto
        """End-to-bridge encryption, when enabled: every ghost gets its device."""
        self.connectors = connectors
        self.ids = ids
        self.policy = RoomPolicy(stores, homeserver, ids)
        """Rooms a ghost may be in (never one open to anyone); joins recorded."""
        self.require_encryption = require_encryption
        """``encryption.require``: rooms that are not encrypted are not bridged."""
        self.require_directory_entry = require_directory_entry
        """``identity.require_directory_entry``: no ghost for an IDNPS the imported (national)
        directory does not list."""
        # Per (room, user): a native member's display name, and ghosts known to be joined. Both
        # change only through membership events, which ``member_changed`` is told of.
        self._names: LRUCache[tuple[str, str], str] = LRUCache(MEMBER_CACHE_SIZE)
        self._joined: LRUCache[tuple[str, str], bool] = LRUCache(MEMBER_CACHE_SIZE)
        # Per room: the trust list it was computed with, and the servers outside it.
        self._outsiders: LRUCache[str, tuple[tuple[str, ...], list[str]]] = LRUCache(
            MEMBER_CACHE_SIZE
        )

    def member_changed(self, room_id: str, mxid: str, membership: object) -> None:
        """A membership event (join, leave, new display name ...) arrived for this member."""
        self._names.pop((room_id, mxid), None)
        self._outsiders.pop(room_id, None)
        if membership != "join":
            self._joined.pop((room_id, mxid), None)

    async def ensure_joined(self, room_id: str, ghost_mxid: str) -> None:
        """The ghost is in the room (joined once, then remembered until it leaves)."""
        if (room_id, ghost_mxid) in self._joined:
            return
        if self.crypto is not None:
            # Its device first, even in a plain room: members' clients share their room keys
            # with the devices they know, from its join or from the moment someone turns
            # encryption on (a ghost without a device then could not read the first messages).
            await self.crypto.ensure_device(ghost_mxid)
        if self.policy.is_exposed(room_id):
            raise PermanentFailure(f"{room_id} is open to anyone: no ghost joins it")
        await self.hs.intent(ghost_mxid).ensure_joined(RoomID(room_id))
        if (reason := await self.policy.refusal(ghost_mxid, room_id)) is not None:
            self.policy.mark_exposed(room_id)
            await self.policy.leave(room_id, ghost_mxid, reason)
            raise PermanentFailure(f"{room_id} is open to anyone: its ghost left")
        self._joined[(room_id, ghost_mxid)] = True

    # Ghosts ------------------------------------------------------------------------------------

    async def ghost(
        self, connector_id: str, idnps: Idnps, user: RemoteUser | None = None
    ) -> Member:
        """The ghost of a vendor user, registered on the homeserver with its display name.

        Raises ``NotInDirectory`` (an ``UnknownUser``) for a new ghost, or a vendor's new
        description of one, when the directory must list the IDNPS and does not.
        """
        mxid = self.ids.mxid(connector_id, idnps)
        row = await self.stores.ghosts.get(mxid)
        if row is not None and row.display_name and user is None:
            return Member(mxid, row.display_name, connector_id, idnps)
        if self.require_directory_entry:
            listed = await self.stores.directory.get(idnps)
            if listed is None or not listed.national:
                log.warning(
                    "No ghost for %s user %s: not in the imported directory "
                    "(identity.require_directory_entry)",
                    connector_id,
                    idnps,
                )
                raise NotInDirectory(
                    _(
                        "the professional {idnps} is not listed in the imported national directory"
                    ).format(idnps=idnps)
                )
        if user is None:
            connector = self.connectors.get(connector_id)
            if connector is None:
                raise PermanentFailure(f"connector {connector_id!r} is not running")
            user = await connector.get_user(idnps)
            if user is None:
                raise UnknownUser(
                    _("{connector} does not know the professional {idnps}").format(
                        connector=connector_id, idnps=idnps
                    )
                )
        # The connector's user list feeds the directory. An ANS entry names the ghost (it wins
        # over what any vendor says); else the ghost carries its own connector's description,
        # never another connector's (which may have claimed the IDNPS first).
        entry = await self.stores.directory.record_connector_user(
            connector_id, idnps, user.given_name, user.family_name, user.profession, mxid
        )
        own = entry.national or entry.source == f"connector:{connector_id}"
        name = (
            entry.display_name
            if own
            else display_name(user.given_name, user.family_name, user.profession)
        ) or user.display_name
        if row is None or row.display_name != name:
            await self.hs.ensure_ghost(mxid, name)
            await self.stores.ghosts.upsert(mxid, connector_id, idnps, name)
        return Member(mxid, name, connector_id, idnps)

    async def find_professional(self, idnps: Idnps, *, exclude: str) -> Member | None:
        """The professional with this IDNPS, reached outside the ``exclude`` connector.

        The directory is the source: of the Matrix IDs it lists, the choice follows
        ``bridge.directory.choice`` (preferred, else a native account, else the first connector
        in config order). When it lists none usable, the connectors are asked in config order
        (and what they answer is recorded in the directory).
        """
        mxids = await self.stores.directory.mxids(idnps)
        for choice in reachable(mxids, self.connectors.ids(), exclude=exclude):
            if choice.kind == GHOST and choice.connector is not None:
                try:
                    return await self.ghost(choice.connector, idnps)
                except UnknownUser:
                    continue  # no longer a user of that vendor: try the next way
            entry = await self.stores.directory.get(idnps)
            return Member(choice.mxid, entry.display_name if entry else choice.mxid)
        for connector_id, connector in self.connectors:
            if connector_id == exclude:
                continue
            user = await connector.get_user(idnps)
            if user is not None:
                try:
                    return await self.ghost(connector_id, idnps, user)
                except UnknownUser:
                    continue  # not in the directory a ghost needs
        return None

    async def resolve(self, source: str, participant: Participant) -> Member | None:
        """Who a vendor user means by an IDNPS or a Matrix id; None when nobody is reachable."""
        if participant.idnps is not None:
            return await self.find_professional(participant.idnps, exclude=source)
        mxid = participant.mxid
        assert mxid is not None
        ref = self.ids.parse(mxid)
        if ref is not None:
            if ref.connector not in self.connectors:
                return None
            try:
                return await self.ghost(ref.connector, ref.idnps)
            except UnknownUser:
                return None
        if self.ids.in_namespace(mxid):
            return None
        return Member(mxid, mxid)

    async def sender(self, room_id: str, mxid: str, voice: str) -> Member:
        """A room member as a sender the vendors can show (ghost identity or native name)."""
        ref = self.ids.parse(mxid)
        if ref is not None:
            row = await self.stores.ghosts.get(mxid)
            if row is not None and row.display_name:
                return Member(mxid, row.display_name, ref.connector, ref.idnps)
        name = self._names.get((room_id, mxid))
        if name is None:
            name = await self._native_name(room_id, mxid, voice)
            self._names[(room_id, mxid)] = name
        return Member(mxid, name)

    async def _native_name(self, room_id: str, mxid: str, voice: str) -> str:
        """How vendors see a Matrix user: the national directory's identity when it lists this
        Matrix ID; else the free display name followed by the Matrix ID, so that it never reads
        as a verified professional (a ghost's name never carries a Matrix ID)."""
        entry = await self.stores.directory.by_mxid(mxid)
        if entry is not None and entry.national and entry.display_name:
            return entry.display_name
        name = " ".join((await self.hs.display_name(room_id, mxid, viewer=voice)).split())
        return f"{name} ({mxid})" if name and name != mxid else mxid

    async def outsiders(self, room_id: str, voice: str) -> list[str]:
        """The servers outside the trust space with a member (joined or invited) in the room.

        Vendors' messages never go into a room that has any: those servers would see them. The
        portal's ACL keeps them out where the bridge could set it; in a room a Matrix user
        opened without giving the bridge that power, this is what holds the line.
        """
        trusted = tuple(self.hs.trust.servers)
        cached = self._outsiders.get(room_id)
        if cached is not None and cached[0] == trusted:
            return cached[1]
        store = self.hs.state_store
        if not await store.has_full_member_list(RoomID(room_id)):
            # Once per room: membership events keep the state store current afterwards.
            events = await self.hs.intent(voice).get_members(RoomID(room_id))
            await store.set_members(RoomID(room_id), {e.state_key: e.content for e in events})
        members = await store.get_members(
            RoomID(room_id), memberships=(Membership.JOIN, Membership.INVITE)
        )
        servers = sorted(
            {str(server_of(m)) for m in members if not self.hs.trust.is_trusted(str(m))}
        )
        self._outsiders[room_id] = (trusted, servers)
        return servers

    # Opening portals ---------------------------------------------------------------------------

    async def open_from_remote(self, source: str, event: ConversationCreated) -> None:
        """A vendor user opened a conversation with people outside the vendor: make its room."""
        if await self.stores.portals.by_conversation(source, event.conversation_id):
            return  # processed before (a redelivery, or a restart after the room was made)
        members: list[Member] = []
        refused: list[str] = []
        for idnps in dict.fromkeys(event.members):
            try:
                members.append(await self.ghost(source, idnps))
            except NotInDirectory:
                if idnps == event.creator:
                    raise  # the conversation itself is refused
                refused.append(not_in_directory(idnps))
        others: list[Member] = []
        unreachable: list[str] = []
        creator = self.ids.mxid(source, event.creator)
        for participant in event.participants:
            member = await self.resolve(source, participant)
            if member is None:
                unreachable.append(str(participant.idnps or participant.mxid))
            elif (
                reason := await self.invite_refusal(creator, member.mxid, member.idnps)
            ) is not None:
                log.info("Not inviting %s to a %s conversation: %s", member.mxid, source, reason)
                refused.append(f"{participant.idnps or participant.mxid} ({reason})")
            elif member.mxid not in {m.mxid for m in members + others}:
                others.append(member)
        everyone = members + others
        is_direct = len(everyone) == 2
        ghosts = [m for m in everyone if m.connector is not None]
        room_id = await self.hs.create_portal_room(
            title=event.title,
            topic=event.topic,
            invite=[m.mxid for m in ghosts],
            is_direct=is_direct,
        )
        for member in ghosts:
            await self.ensure_joined(room_id, member.mxid)
        # Matrix users are invited by the person who asked (the creator's ghost), so their
        # clients show who it is (and, in a 1:1, name the room after them).
        inviter = creator if creator in {m.mxid for m in ghosts} else self.ids.bot_mxid
        for member in everyone:
            if member.connector is None:
                await self.invite(room_id, inviter, member.mxid, is_direct=is_direct)
        if is_direct:
            first, second = everyone
            for member, other in ((first, second), (second, first)):
                if member.connector is not None:
                    await self._record_direct(member.mxid, other.mxid, room_id)
        async with self.stores.db.acquire() as conn, conn.transaction():
            await self.stores.portals.create(
                Portal(room_id, event.title, len(everyone) == 2, self.ids.bot_mxid), conn=conn
            )
            await self.stores.portals.add_link(room_id, source, event.conversation_id, conn=conn)
            # The vendor already has everyone: their joins must not go back to it.
            await self.stores.portals.add_participants(
                room_id, source, [m.mxid for m in everyone], conn=conn
            )
            starter = next((m for m in members if m.mxid == creator), None)
            for connector_id in dict.fromkeys(m.connector for m in others if m.connector):
                await self._queue_conversation(
                    room_id, connector_id, event.title, everyone, conn=conn
                )
                if event.topic and starter is not None:
                    # The topic follows the opening, as if its author had just set it.
                    topic = op.SetTopic(event_id=f"topic:{room_id}", topic=event.topic, by=starter)
                    await self.stores.outbox.enqueue(
                        connector_id,
                        room_id,
                        topic.kind,
                        topic.event_id,
                        topic.to_json(),
                        conn=conn,
                    )
        self.stores.portals.forget(room_id)
        log.info("Opened portal %s for %s conversation %s", room_id, source, event.conversation_id)
        await self.publish_capabilities(room_id, self.ids.bot_mxid)
        if event.title and self.hs.encrypt_new_portals and not self.hs.titles_in_room_state:
            # Kept out of the room state (stored in clear), the title reaches the room's Matrix
            # members in an end-to-end encrypted notice.
            await self.hs.send_notice(
                room_id,
                _("Conversation: {title}").format(title=event.title),
                txn_id=derived_txn_id("portal-title", room_id),
            )
        if event.topic and self.hs.encrypt_new_portals and not self.hs.titles_in_room_state:
            await self.hs.send_notice(
                room_id,
                _("Topic: {topic}").format(topic=event.topic),
                txn_id=derived_txn_id("portal-topic", room_id),
            )
        if unreachable:
            txn_id = derived_txn_id("unreachable", room_id)
            # The vendor user who asked reads it in the conversation they started (their
            # vendor's link exists even when nobody else could be added), and so does everyone.
            await tell_everyone(self.stores, room_id, unreachable_notice(unreachable), key=txn_id)
            await self.hs.send_notice(room_id, unreachable_notice(unreachable), txn_id=txn_id)
        if refused:
            txn_id = derived_txn_id("refused", room_id)
            await tell_everyone(self.stores, room_id, refused_notice(refused), key=txn_id)
            await self.hs.send_notice(room_id, refused_notice(refused), txn_id=txn_id)

    async def invite(
        self, room_id: str, inviter: str, invitee: str, *, is_direct: bool = False
    ) -> None:
        """``inviter`` (a ghost in the room) invites ``invitee``; already in is fine."""
        await self.hs.intent(inviter).invite_user(
            RoomID(room_id),
            UserID(invitee),
            extra_content={"is_direct": True} if is_direct else None,
        )

    async def link_connector(self, room_id: str, connector_id: str, everyone: list[Member]) -> None:
        """Someone of ``connector_id`` was added to a portal that has no conversation there: one
        is queued for opening, with ``everyone`` in it (recorded as that side's participants)."""
        portal = await self.stores.portals.get(room_id)
        title = portal.title if portal is not None else None
        async with self.stores.db.acquire() as conn, conn.transaction():
            await self._queue_conversation(room_id, connector_id, title, everyone, conn=conn)
        self.stores.portals.forget(room_id)
        log.info("Queued a %s conversation for portal %s", connector_id, room_id)
        await self.publish_capabilities(
            room_id, portal.voice if portal is not None else self.ids.bot_mxid
        )

    async def room_members(self, room_id: str, voice: str) -> list[Member]:
        """The joined members of a portal (the bot left out), as vendors see them."""
        mxids = await self.hs.joined_members(room_id, viewer=voice)
        return [await self.sender(room_id, m, voice) for m in mxids if m != self.ids.bot_mxid]

    async def invite_refusal(
        self, inviter: str, target: str, target_idnps: Idnps | None = None
    ) -> str | None:
        """Why ``target`` must not be invited by ``inviter``, or None when the invite may go.

        Both must be on servers of the trust space; a vendor user's (``target_idnps``) own
        permission setting must accept the inviter. The reason is shown to people.
        """
        trust = self.hs.trust
        if not trust.is_trusted(inviter):
            return _("the server of {user} is not in the EIMIS trust space").format(user=inviter)
        if not trust.is_trusted(target):
            return _("the server of {user} is not in the EIMIS trust space").format(user=target)
        if target_idnps is not None:
            permission = await self.stores.permissions.effective(target_idnps)
            decision = permission.decide(inviter)
            if not decision.allowed:
                return decision.reason
        return None

    async def open_from_invite(
        self,
        room_id: str,
        inviter: str,
        ghost_mxid: str,
        is_direct: bool,
        *,
        encrypted: bool = False,
    ) -> bool:
        """A Matrix user invited a ghost: join, and open the vendor conversation behind it.

        Returns True when a vendor conversation was queued for opening.
        """
        ref = self.ids.parse(ghost_mxid)
        if ref is None or ref.connector not in self.connectors:
            return False
        intent = self.hs.intent(ghost_mxid)
        try:
            ghost = await self.ghost(ref.connector, ref.idnps)
        except UnknownUser as error:
            await self._refuse_invite(room_id, ghost_mxid, str(error))
            return False
        connector = self.connectors.get(ref.connector)
        if (
            connector is not None
            and await self.stores.portals.link(room_id, ref.connector) is not None
            and not connector.capabilities.add_participants
        ):
            # That vendor's conversation exists and cannot take anyone more: the room is told
            # (in French) and the invite refused, before the ghost joins (nothing to undo).
            reason = _(
                "{connector} does not allow adding someone to an existing conversation"
            ).format(connector=ref.connector)
            if (known := await self.stores.portals.get(room_id)) is not None:
                text = _("{name} cannot be added: {reason}.").format(
                    name=ghost.display_name, reason=reason
                )
                txn_id = derived_txn_id("join-unsupported", room_id, ghost_mxid)
                await tell_everyone(
                    self.stores, room_id, text, key=txn_id, exclude=(ref.connector,)
                )
                with contextlib.suppress(MatrixRequestError):
                    await self.hs.send_event(
                        known.voice,
                        room_id,
                        "m.room.message",
                        {"msgtype": "m.notice", "body": text},
                        txn_id=txn_id,
                    )
            await self._refuse_invite(room_id, ghost_mxid, reason)
            return False
        if self.crypto is not None:
            # Its device before its join: the inviter's client shares its room keys with the
            # devices it finds when the ghost joins (now, or when encryption is turned on).
            await self.crypto.ensure_device(ghost_mxid)
        try:
            await intent.join_room(RoomID(room_id), max_retries=0)
        except MatrixRequestError as error:
            raise PermanentFailure(f"{ghost_mxid} could not join ({error.errcode})") from None
        await self.hs.state_store.joined(RoomID(room_id), ghost.mxid)
        if not await self.hs.follow_encryption(room_id, ghost_mxid) and self.require_encryption:
            await self._leave_unencrypted(room_id, ghost_mxid)
            return False
        await self._apply_policy(room_id, ghost_mxid, inviter if is_direct else None)
        if (exposed := await self.policy.refusal(ghost_mxid, room_id)) is not None:
            await self.policy.leave(room_id, ghost_mxid, exposed)
            return False
        portal = await self.stores.portals.get(room_id)
        if portal is None:
            portal = Portal(room_id, None, is_direct, ghost_mxid)
            await self.stores.portals.create(portal)
        link = await self.stores.portals.link(room_id, ref.connector)
        if link is not None:
            # That vendor's conversation exists: the ghost's join (pushed by the homeserver,
            # ``membership.py``) adds its user to it, when the vendor can add people.
            if link.closed:
                await self.stores.portals.reopen_link(room_id, ref.connector)
            return False
        member_ids = await self.hs.joined_members(room_id, viewer=ghost_mxid)
        if inviter not in member_ids:
            member_ids.append(inviter)
        everyone = [
            await self.sender(room_id, m, ghost_mxid) for m in member_ids if m != self.ids.bot_mxid
        ]
        if ghost not in everyone:
            everyone.append(ghost)
        async with self.stores.db.acquire() as conn, conn.transaction():
            await self._queue_conversation(
                room_id, ref.connector, portal.title, everyone, conn=conn
            )
            # That side is told of everyone by the conversation's opening: their joins, pushed
            # later, are not told again.
            await self.stores.portals.add_participants(
                room_id, ref.connector, (m.mxid for m in everyone), conn=conn
            )
        self.stores.portals.forget(room_id)
        log.info("Opened portal %s for a Matrix invite to a %s user", room_id, ref.connector)
        await self.publish_capabilities(room_id, portal.voice)
        return True

    async def open_direct(self, asker: str, idnps: Idnps) -> tuple[str | None, Member, bool]:
        """A Matrix user asked the bot for a DM with a professional (``dm <identifier>``).

        The professional is reached as ``find_professional`` says (issue 5's choice rule). A
        native account: nothing to open (``None``; the asker gets a link). A ghost: a portal
        room made as for a vendor's conversation (the bridge's policy in its initial state), the
        ghost in it, the asker invited by the ghost as a direct chat (their client names the
        room after the professional), and the vendor conversation queued for opening, as when a
        Matrix user invites a ghost; unless both are already in a direct portal of that vendor
        (then that room, and ``False`` for "not new"). Raises ``UnknownUser`` (nobody reachable) or
        ``PermanentFailure`` (refused: trust space, the professional's permissions), with a
        French reason.
        """
        member = await self.find_professional(idnps, exclude="")
        if member is None:
            raise UnknownUser(
                _(
                    "the professional {idnps} cannot be reached by any messaging service "
                    "connected to the bridge"
                ).format(idnps=idnps)
            )
        if member.connector is None:
            return None, member, False
        if await self.invite_refusal(asker, member.mxid, idnps) is not None:
            # The asker is of the bridge's homeserver (trusted): what refuses is the
            # professional's permission settings (the trust space, were it ever that, too).
            log.info("Not opening a direct chat with %s: refused", member.mxid)
            raise PermanentFailure(
                _(
                    "{name} does not accept a conversation with you (their permission "
                    "settings refuse it)"
                ).format(name=member.display_name)
            )
        for existing in await self.stores.portals.direct_with(member.connector, asker, member.mxid):
            try:
                joined = await self.hs.joined_members(existing, viewer=member.mxid)
            except MatrixRequestError:
                continue
            if asker in joined and member.mxid in joined:
                return existing, member, False
        room_id = await self.hs.create_portal_room(title=None, invite=[member.mxid], is_direct=True)
        await self.ensure_joined(room_id, member.mxid)
        await self.invite(room_id, member.mxid, asker, is_direct=True)
        await self._record_direct(member.mxid, asker, room_id)
        native = await self.sender(room_id, asker, member.mxid)
        everyone = [native, member]
        async with self.stores.db.acquire() as conn, conn.transaction():
            await self.stores.portals.create(
                Portal(room_id, None, True, self.ids.bot_mxid), conn=conn
            )
            await self._queue_conversation(room_id, member.connector, None, everyone, conn=conn)
        self.stores.portals.forget(room_id)
        log.info("Opened portal %s for a direct chat asked of the bot", room_id)
        await self.publish_capabilities(room_id, self.ids.bot_mxid)
        return room_id, member, True

    async def _record_direct(self, mxid: str, other: str, room_id: str) -> None:
        try:
            await self.hs.record_direct(mxid, other, room_id)
        except MatrixRequestError as error:
            log.warning("Could not record %s as direct for %s (%s)", room_id, mxid, error.errcode)

    async def _apply_policy(self, room_id: str, ghost_mxid: str, direct_with: str | None) -> None:
        """The inviter's room: the ghost applies what its power level lets it of the portal
        policy (ACL, invite-only, members-only history, no guests) and records a direct chat."""
        if direct_with is not None:
            await self._record_direct(ghost_mxid, direct_with, room_id)
        try:
            changed, refused = await self.hs.apply_room_policy(
                ghost_mxid, room_id, self.hs.trust.acl()
            )
        except MatrixRequestError as error:
            log.warning("Could not apply the room policy in %s (%s)", room_id, error.errcode)
            return
        if changed:
            log.info("Room policy in %s: set %s", room_id, ", ".join(changed))
        if refused:
            log.warning(
                "Room policy in %s: %s lacks the power level to set %s",
                room_id,
                ghost_mxid,
                ", ".join(refused),
            )

    async def publish_capabilities(self, room_id: str, voice: str) -> None:
        """Room state saying what each vendor in the room can show (one event per connector).

        Clients and people can see ahead of time that, say, reactions become short messages.
        """
        for link in await self.stores.portals.links(room_id):
            connector = self.connectors.get(link.connector)
            if connector is None:
                continue
            content = {
                "connector": link.connector,
                "type": connector.type_name,
                "capabilities": connector.capabilities.to_json(),
            }
            try:
                await self.hs.intent(voice).send_state_event(
                    RoomID(room_id), CAPABILITIES_EVENT, content, state_key=link.connector
                )
            except MatrixRequestError as error:
                log.warning("Could not publish capabilities in %s (%s)", room_id, error.errcode)
            except IntentError:
                # A room a Matrix user opened without giving the bridge that power: the
                # capabilities stay unpublished; the conversation is bridged all the same.
                log.info("No power level to publish capabilities in %s", room_id)
                return

    async def _queue_conversation(
        self, room_id: str, connector_id: str, title: str | None, everyone: list[Member], *, conn
    ) -> None:
        """Link the room to a vendor conversation that the outbox will open, before any message."""
        await self.stores.portals.add_link(room_id, connector_id, None, conn=conn)
        # The conversation will be opened with everyone in it: nobody is to be added again.
        await self.stores.portals.add_participants(
            room_id, connector_id, [m.mxid for m in everyone], conn=conn
        )
        create = op.CreateConversation(
            title=title,
            members=tuple(m.idnps for m in everyone if m.connector == connector_id and m.idnps),
            external=tuple(m for m in everyone if m.connector != connector_id),
        )
        await self.stores.outbox.enqueue(
            connector_id, room_id, create.kind, f"create:{room_id}", create.to_json(), conn=conn
        )

    async def _leave_unencrypted(self, room_id: str, ghost_mxid: str) -> None:
        """``encryption.require``: a room that is not end-to-end encrypted is not bridged."""
        reason = _("this bridge carries end-to-end encrypted rooms only: enable encryption first")
        log.info("Leaving unencrypted room %s (encryption.require)", room_id)
        with contextlib.suppress(MatrixRequestError):
            await self.hs.send_event(
                ghost_mxid,
                room_id,
                "m.room.message",
                {"msgtype": "m.notice", "body": _("Not bridged: {reason}.").format(reason=reason)},
                txn_id=derived_txn_id("unencrypted", room_id, ghost_mxid),
            )
        with contextlib.suppress(MatrixRequestError):
            await self.hs.intent(ghost_mxid).leave_room(
                RoomID(room_id),
                reason=reason,
                extra_content={"reason": reason, BRIDGE_LEAVE: "unencrypted"},
            )

    async def _refuse_invite(self, room_id: str, ghost_mxid: str, reason: str) -> None:
        log.info("Refusing an invite for %s: %s", ghost_mxid, reason)
        try:
            await self.hs.intent(ghost_mxid).leave_room(RoomID(room_id), reason=reason)
        except MatrixRequestError as error:
            log.warning("Could not refuse the invite for %s (%s)", ghost_mxid, error.errcode)


def unreachable_notice(people: list[str]) -> str:
    """What the room (and the vendors' users) read about people a vendor user named that
    nobody can reach."""
    return _(
        "Could not add to this conversation (not known to any connected service, or not "
        "reachable): {people}."
    ).format(people=", ".join(people))


def refused_notice(people: list[str]) -> str:
    """What the room (and the vendors' users) read about people who may not be added (each
    with its reason)."""
    # Translators: the separator between the people of a list that already uses commas.
    separator = _("; ")
    return _("Could not add to this conversation: {people}.").format(people=separator.join(people))


def not_in_directory(who: str) -> str:
    """One of the people ``refused_notice`` lists: not in the national directory."""
    return _("{who} (not in the national directory)").format(who=who)
