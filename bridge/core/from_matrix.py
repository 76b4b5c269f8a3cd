"""Matrix -> vendors: what happens in a portal room becomes outbox deliveries, per connector.

Never back to the connector whose ghost did it (echo suppression); the bridge's own notices and
statuses are not bridged, and a closed link (nobody of that vendor left) gets nothing new.
Joins, departures, names and topics are ``membership.py``'s. Rendering for each vendor happens
at delivery time (``delivery.py``).
What a sender may say about another event (edit, redaction, relation into another portal) is
checked first (``authority.py``): a refused event reaches no vendor, and its sender is told.
Nothing a portal member says is dropped silently: polls, stickers and events of other types that
carry a text are made messages (``matrix_content.py``); anything else gets a FAIL send status.

``handle`` returns the deliveries to queue as writes: the router commits them together with the
inbox item's own completion, so an event is either fully routed or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mautrix.errors import MatrixRequestError
from mautrix.types import PaginationDirection, RoomID

from bridge.core import matrix_content as mc
from bridge.core import operations as op
from bridge.core.admin_hook import AdminHook
from bridge.core.authority import Authority, Refused
from bridge.core.members import Member
from bridge.core.membership import Membership
from bridge.core.portals import Portals
from bridge.core.room_policy import exposure, stripped_state
from bridge.db.group_commit import Write
from bridge.db.portal import Portal
from bridge.db.stores import Stores
from bridge.i18n import _
from bridge.matrix.homeserver import Homeserver

log = logging.getLogger("eimis.from_matrix")

BRIDGED_MSGTYPES = {
    "m.text",
    "m.notice",
    "m.emote",
    "m.image",
    "m.file",
    "m.audio",
    "m.video",
    "m.location",
}


class FromMatrix:
    def __init__(
        self,
        stores: Stores,
        homeserver: Homeserver,
        portals: Portals,
        *,
        admin: AdminHook | None = None,
        on_refused: Callable[[str, str, str], Awaitable[None]] | None = None,
        on_unsupported: Callable[[str, str, str], Awaitable[None]] | None = None,
        decrypt: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.stores = stores
        self.hs = homeserver
        self.portals = portals
        self.ids = portals.ids
        self._typing: dict[str, set[str]] = {}
        self.untrusted_dropped = 0
        """Events from servers outside the trust list that were dropped (never delivered)."""
        self.admin = admin
        """The operators' admin rooms (``bridge/admin``): their events are commands."""
        self.authority = Authority(homeserver, stores)
        self.membership = Membership(stores, homeserver, portals)
        """Joins, departures, names and topics of portals (``membership.py``)."""
        self.on_refused: Callable[[str, str, str], Awaitable[None]] = on_refused or _nothing
        """Told (room, event, reason in French) of an event its sender may not send."""
        self.on_unsupported: Callable[[str, str, str], Awaitable[None]] = (
            on_unsupported or on_refused or _nothing
        )
        """Told (room, event, reason in French) of an event no vendor can take in any form."""
        self.decrypt = decrypt
        """Decrypts an event fetched from an encrypted room (a poll a vote refers to)."""
        self.polls = mc.PollMemory()

    async def handle(self, raw: dict[str, Any]) -> list[Write]:
        """The outbox writes this event calls for (none for what is not bridged)."""
        if not isinstance(raw.get("content", {}), dict):
            log.warning("Skipping a %s event with malformed content", raw.get("type"))
            return []
        kind = raw.get("type")
        sender = raw.get("sender")
        if isinstance(sender, str) and not self.hs.trust.is_trusted(sender):
            return await self._untrusted(raw)
        if self.admin is not None and await self.admin.handles(raw):
            return []
        if kind == "m.room.member":
            return await self._membership(raw)
        if kind in ("m.room.name", "m.room.topic"):
            return await self.membership.renamed(raw)
        try:
            if kind == "m.room.message":
                return await self._message(raw)
            if kind == "m.reaction":
                return await self._reaction(raw)
            if kind == "m.room.redaction":
                return await self._redaction(raw)
            if _other_content(raw):
                return await self._converted(raw)
        except Refused as refusal:
            await self._refused(raw, refusal)
            return []
        if kind == "m.receipt":
            return await self._receipts(raw)
        if kind == "m.typing":
            await self._typing_changed(raw)
        return []

    # Trust -------------------------------------------------------------------------------------

    async def _untrusted(self, raw: dict[str, Any]) -> list[Write]:
        """An event whose sender is on a server outside the trust list: never delivered to a
        vendor (logged without content, counted); an invite of ours from there is refused."""
        self.untrusted_dropped += 1
        sender = str(raw.get("sender"))
        log.warning(
            "Dropped %s event %s in %s: sender's server %s is not in the trust list",
            raw.get("type"),
            raw.get("event_id"),
            raw.get("room_id"),
            sender.split(":", 1)[-1],
        )
        content = _obj(raw.get("content"))
        target = raw.get("state_key")
        if raw.get("type") == "m.room.member" and isinstance(target, str):
            self.portals.member_changed(raw["room_id"], target, content.get("membership"))
            if content.get("membership") == "invite" and self.ids.in_namespace(target):
                await self._refuse(
                    raw["room_id"],
                    target,
                    _("the inviter's server is not in the EIMIS trust space"),
                )
        return []

    async def _refused(self, raw: dict[str, Any], refusal: Refused) -> None:
        """An event its sender may not send: nothing reaches a vendor, the sender is told."""
        log.warning(
            "Refused %s event %s of %s in %s: %s",
            raw.get("type"),
            raw.get("event_id"),
            raw.get("sender"),
            raw.get("room_id"),
            refusal.code,
        )
        await self.on_refused(str(raw["room_id"]), str(raw.get("event_id")), refusal.reason)

    async def _refuse(self, room_id: str, invitee: str, reason: str) -> None:
        """Decline an invite of one of ours with a reason the inviter sees."""
        log.info("Refusing an invite for %s in %s: %s", invitee, room_id, reason)
        try:
            await self.hs.intent(invitee).leave_room(RoomID(room_id), reason=reason)
        except MatrixRequestError as error:
            log.warning("Could not refuse the invite for %s (%s)", invitee, error.errcode)

    # Membership --------------------------------------------------------------------------------

    async def _membership(self, raw: dict[str, Any]) -> list[Write]:
        content = _obj(raw.get("content"))
        target = raw.get("state_key", "")
        self.portals.member_changed(raw["room_id"], target, content.get("membership"))
        if target == self.ids.bot_mxid and self.admin is not None:
            if content.get("membership") == "invite":
                await self.admin.on_bot_invite(raw["room_id"], str(raw.get("sender")))
            elif content.get("membership") in ("leave", "ban"):
                await self.admin.on_bot_left(raw["room_id"])
            return []
        if content.get("membership") != "invite":
            return await self.membership.changed(raw)
        if not self.ids.in_namespace(target):
            return []
        if target == self.ids.bot_mxid:
            return []  # no admin room configured: the bot stays out
        if self.ids.in_namespace(raw["sender"]):
            return []  # the bridge invited its own ghost while opening a portal: already handled
        if (exposed := exposure(stripped_state(raw))) is not None:
            await self._refuse(raw["room_id"], target, exposed)
            return []
        ref = self.ids.parse(target)
        if ref is not None:
            reason = await self.portals.invite_refusal(raw["sender"], target, ref.idnps)
            if reason is not None:
                await self._refuse(raw["room_id"], target, reason)
                return []
        opened = await self.portals.open_from_invite(
            raw["room_id"],
            raw["sender"],
            target,
            bool(content.get("is_direct")),
            encrypted=_invited_to_encrypted_room(raw),
        )
        if not opened:
            return []
        return await self._catch_up(raw["room_id"], target, int(raw.get("origin_server_ts") or 0))

    async def _catch_up(self, room_id: str, viewer: str, since_ts: int) -> list[Write]:
        """Route what was said between the invite and the ghost's join.

        The homeserver only sends an appservice the events of rooms where one of its users is
        joined, so a message written right after inviting a ghost would otherwise never arrive.
        Outbox items are keyed by event id, so a message that does arrive later is not doubled.
        """
        missed: list[dict[str, Any]] = []
        from_token = None
        for _page in range(10):  # at most 10 pages of 50 events back to the invite
            page = await self.hs.intent(viewer).get_messages(
                RoomID(room_id), PaginationDirection.BACKWARD, from_token=from_token, limit=50
            )
            events = [e.serialize() for e in page.events]
            missed.extend(
                e
                for e in events
                if e.get("type") in CAUGHT_UP_TYPES and e.get("origin_server_ts", 0) >= since_ts
            )
            if not events or min(e.get("origin_server_ts", 0) for e in events) < since_ts:
                break
            from_token = page.end
        writes: list[Write] = []
        for event in reversed(missed):
            event.setdefault("room_id", room_id)
            writes += await self.handle(event)
        return writes

    # Room events -------------------------------------------------------------------------------

    async def _targets(self, raw: dict[str, Any]) -> tuple[Portal, list[str]] | None:
        """The portal and the connectors an event of this sender goes to, or None."""
        sender = raw.get("sender", "")
        if sender == self.ids.bot_mxid:
            return None
        portal = await self.stores.portals.get(raw["room_id"])
        if portal is None:
            return None
        source = self.ids.parse(sender)
        if source is None and self.ids.in_namespace(sender):
            return None
        targets = [
            link.connector
            for link in await self.stores.portals.open_links(portal.room_id)
            if (source is None or link.connector != source.connector)
            and link.connector in self.portals.connectors
        ]
        return (portal, targets) if targets else None

    def _enqueue(
        self,
        raw: dict[str, Any],
        operation: op.Operation,
        targets: list[str],
        dedup_key: str | None = None,
    ) -> list[Write]:
        """One delivery per target connector, keyed by the event (a repeat changes nothing)."""
        payload = operation.to_json()
        return [
            self.stores.outbox.enqueue_write(
                connector_id, raw["room_id"], operation.kind, dedup_key or raw["event_id"], payload
            )
            for connector_id in targets
        ]

    async def _sender(self, raw: dict[str, Any], portal: Portal) -> Member:
        return await self.portals.sender(raw["room_id"], raw["sender"], portal.voice)

    async def _message(self, raw: dict[str, Any]) -> list[Write]:
        found = await self._targets(raw)
        if found is None:
            return []
        portal, targets = found
        content = _obj(raw.get("content"))
        if not content:
            return []  # redacted before we saw it: nothing left to bridge
        relates = _obj(content.get("m.relates_to"))
        sender = await self._sender(raw, portal)
        if relates.get("rel_type") == "m.replace" and isinstance(relates.get("event_id"), str):
            new_content = content.get("m.new_content")
            if not isinstance(new_content, dict):
                return []
            await self.authority.may_edit(
                raw["room_id"], raw["sender"], relates["event_id"], portal.voice
            )
            edit = op.EditMessage(
                event_id=raw["event_id"],
                target_event=relates["event_id"],
                sender=sender,
                content=new_content,
                ts=raw.get("origin_server_ts"),
            )
            return self._enqueue(raw, edit, targets)
        if not isinstance(content.get("body", ""), str):
            content = {**content, "body": ""}
        if content.get("msgtype") not in BRIDGED_MSGTYPES:
            # Unknown message types still reach vendors as their plain-text body (the spec's
            # fallback), and the sender is told through the send status.
            content = {
                "msgtype": "m.text",
                "body": str(content.get("body") or ""),
                "eimis.unknown_msgtype": str(content.get("msgtype")),
            }
        reply_to = _obj(relates.get("m.in_reply_to")).get("event_id")
        if isinstance(reply_to, str):
            # A reply quoting another portal's message is refused like any relation across
            # portals (the quote would carry that portal's content here).
            await self.authority.same_portal(raw["room_id"], reply_to)
        message = op.SendMessage(
            event_id=raw["event_id"],
            sender=sender,
            content=content,
            ts=raw.get("origin_server_ts"),
            reply_to_event=reply_to if isinstance(reply_to, str) else None,
        )
        return self._enqueue(raw, message, targets)

    async def _converted(self, raw: dict[str, Any]) -> list[Write]:
        """A poll, a sticker or an event of another type, as the message it can be made
        (``matrix_content.py``); its sender is told when it cannot be made one."""
        found = await self._targets(raw)
        if found is None:
            return []
        portal, _found = found
        content = _obj(raw.get("content"))
        if not content:
            return []  # redacted before we saw it
        relates = _obj(content.get("m.relates_to"))
        if relates.get("rel_type") == "m.replace":
            new = await self._as_message(raw, portal, _obj(content.get("m.new_content")))
            if new is None:
                return []
            edit = {**new, "m.new_content": new, "m.relates_to": relates}
            return await self._message({**raw, "type": "m.room.message", "content": edit})
        message = await self._as_message(raw, portal, content)
        if message is None:
            kind, event_id = str(raw.get("type")), str(raw.get("event_id"))
            log.info("Unsupported %s event %s in %s", kind[:64], event_id, raw["room_id"])
            await self.on_unsupported(raw["room_id"], event_id, mc.unsupported(kind))
            return []
        return await self._message({**raw, "type": "m.room.message", "content": message})

    async def _as_message(
        self, raw: dict[str, Any], portal: Portal, content: dict[str, Any]
    ) -> dict[str, Any] | None:
        kind = str(raw.get("type"))
        room_id = raw["room_id"]
        if kind in mc.POLL_START:
            poll = mc.poll_of(content)
            if poll is not None:
                self.polls.remember(room_id, str(raw.get("event_id")), poll)
            return mc.poll_start_message(content)
        if kind in mc.POLL_RESPONSE or kind in mc.POLL_END:
            target = _obj(content.get("m.relates_to")).get("event_id")
            poll = None
            if isinstance(target, str):
                poll = await self._poll(room_id, target, portal.voice)
            if kind in mc.POLL_END:
                return mc.poll_end_message(content, poll)
            name = (await self._sender(raw, portal)).display_name
            return mc.poll_response_message(content, name, poll)
        if kind == mc.STICKER:
            return mc.sticker_message(content)
        return mc.other_event_message(kind, content)

    async def _poll(self, room_id: str, event_id: str, viewer: str) -> mc.Poll | None:
        """The poll ``event_id`` of ``room_id``: remembered, or read from the homeserver
        (decrypted in an encrypted room); None when it cannot be found or read."""
        known = self.polls.get(room_id, event_id)
        if known is not None:
            return known
        event = await self.hs.event_in_room(viewer, room_id, event_id)
        if event is not None and event.get("type") == "m.room.encrypted" and self.decrypt:
            try:
                event = await self.decrypt(event)
            except Exception as error:  # the vote still goes, as a generic sentence
                log.info("Could not read the poll %s (%s)", event_id, type(error).__name__)
                return None
        if event is None or event.get("type") not in mc.POLL_START:
            return None
        poll = mc.poll_of(_obj(event.get("content")))
        if poll is not None:
            self.polls.remember(room_id, event_id, poll)
        return poll

    async def _reaction(self, raw: dict[str, Any]) -> list[Write]:
        relates = _obj(_obj(raw.get("content")).get("m.relates_to"))
        if relates.get("rel_type") != "m.annotation":
            return []
        key, target = relates.get("key"), relates.get("event_id")
        if not isinstance(key, str) or not isinstance(target, str) or not key:
            return []
        found = await self._targets(raw)
        if found is None:
            return []
        portal, targets = found
        await self.authority.same_portal(raw["room_id"], target)
        reaction = op.AddReaction(
            event_id=raw["event_id"],
            target_event=target,
            sender=await self._sender(raw, portal),
            key=key[:64],
            ts=raw.get("origin_server_ts"),
        )
        return self._enqueue(raw, reaction, targets)

    async def _redaction(self, raw: dict[str, Any]) -> list[Write]:
        target = raw.get("redacts") or _obj(raw.get("content")).get("redacts")
        if not isinstance(target, str):
            return []
        found = await self._targets(raw)
        if found is None:
            return []
        portal, targets = found
        await self.authority.may_redact(raw["room_id"], raw["sender"], target, portal.voice)
        redaction = op.Redact(
            event_id=raw["event_id"],
            target_event=target,
            sender=await self._sender(raw, portal),
            ts=raw.get("origin_server_ts"),
        )
        return self._enqueue(raw, redaction, targets)

    # Ephemeral ---------------------------------------------------------------------------------

    async def _receipts(self, raw: dict[str, Any]) -> list[Write]:
        room_id = raw.get("room_id")
        content = raw.get("content")
        if not isinstance(room_id, str) or not isinstance(content, dict):
            return []
        portal = await self.stores.portals.get(room_id)
        if portal is None:
            return []
        links = [
            link.connector
            for link in await self.stores.portals.open_links(room_id)
            if (c := self.portals.connectors.get(link.connector)) is not None
            and c.capabilities.read_receipts
        ]
        if not links:
            return []
        writes: list[Write] = []
        for event_id, by_type in content.items():
            readers = (by_type or {}).get("m.read") if isinstance(by_type, dict) else None
            if not isinstance(readers, dict):
                continue
            for reader in readers:
                if self.ids.in_namespace(reader):
                    continue  # our ghosts' receipts are the vendors' own read markers
                if not self.hs.trust.is_trusted(reader):
                    self.untrusted_dropped += 1
                    continue
                fake = {"room_id": room_id, "sender": reader, "event_id": event_id}
                read = op.MarkRead(event_id=event_id, sender=await self._sender(fake, portal))
                writes += self._enqueue(fake, read, links, dedup_key=f"read:{reader}:{event_id}")
        return writes

    async def _typing_changed(self, raw: dict[str, Any]) -> None:
        """Typing is best effort: delivered at once, never queued or retried."""
        room_id = raw.get("room_id")
        user_ids = _obj(raw.get("content")).get("user_ids")
        if not isinstance(room_id, str) or not isinstance(user_ids, list):
            return
        now = {
            u
            for u in user_ids
            if isinstance(u, str) and not self.ids.in_namespace(u) and self.hs.trust.is_trusted(u)
        }
        before = self._typing.get(room_id, set())
        self._typing[room_id] = now
        changes = [(u, True) for u in now - before] + [(u, False) for u in before - now]
        if not changes or await self.stores.portals.get(room_id) is None:
            return
        for link in await self.stores.portals.open_links(room_id):
            connector = self.portals.connectors.get(link.connector)
            if connector is None or not connector.capabilities.typing or not link.conversation_id:
                continue
            for user_id, typing in changes:
                portal = await self.stores.portals.get(room_id)
                assert portal is not None
                member = await self.portals.sender(room_id, user_id, portal.voice)
                try:
                    await connector.set_typing(link.conversation_id, member.as_sender(), typing)
                except Exception as error:  # best effort by design
                    log.debug(
                        "Typing not delivered to %s: %s", link.connector, type(error).__name__
                    )


CAUGHT_UP_TYPES = frozenset({"m.room.message", "m.reaction", *mc.CONVERTIBLE_TYPES})
"""What a ghost invited into a room catches up on (what was said before it joined)."""
HANDLED_ELSEWHERE = frozenset(
    {
        "m.room.member",
        "m.room.name",
        "m.room.topic",
        "m.room.message",
        "m.reaction",
        "m.room.redaction",
        "m.receipt",
        "m.typing",
        "m.presence",
    }
)


def _other_content(raw: dict[str, Any]) -> bool:
    """Whether a room event is something a person said that is not a message: a poll, a
    sticker, or an event of a type the bridge does not know (not state, not ephemeral, not
    protocol between clients)."""
    kind = raw.get("type")
    return (
        isinstance(kind, str)
        and "state_key" not in raw
        and isinstance(raw.get("event_id"), str)
        and isinstance(raw.get("sender"), str)
        and kind not in HANDLED_ELSEWHERE
        and kind not in mc.NOT_CONTENT
    )


async def _nothing(*_: str) -> None:
    return None


def _obj(value: Any) -> dict[str, Any]:
    """A JSON object from an event, or {} when the sender put something else there."""
    return value if isinstance(value, dict) else {}


def _invited_to_encrypted_room(raw: dict[str, Any]) -> bool:
    """Whether an invite's stripped room state (``unsigned.invite_room_state``, which
    homeservers fill with the room's m.room.encryption) says the room is encrypted."""
    unsigned = _obj(raw.get("unsigned"))
    state = unsigned.get("invite_room_state")
    return isinstance(state, list) and any(
        isinstance(e, dict) and e.get("type") == "m.room.encryption" for e in state
    )
