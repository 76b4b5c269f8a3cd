"""Who may say what about another event of a portal, before anything reaches a vendor.

As Matrix clients apply them: an edit (``m.replace``) replaces only its own sender's message; a
redaction removes its sender's own event, or another's when the sender's power level reaches the
room's ``redact`` level. And every relation (reply, edit, reaction, redaction) points to an event
of its own portal. The homeserver is asked about the original (its sender is in clear even when
it is encrypted), as the portal's voice; the message map tells an event another portal carried.

A refused event is never delivered; its sender is told why, in the bridge's locale
(``Refused.reason``, from the catalogs).
"""

from __future__ import annotations

from bridge.db.stores import Stores
from bridge.i18n import N_, _
from bridge.matrix.homeserver import Homeserver

# Catalog texts (translated where a refusal is raised).
OTHER_PORTAL = N_("it refers to a message of another conversation")
UNKNOWN_TARGET = N_("the message it refers to cannot be found in this conversation")
NOT_YOUR_MESSAGE = N_("only the author of a message may edit it")
NO_POWER_TO_REDACT = N_(
    "only the author of a message, or a moderator of the conversation, may delete it"
)


class Refused(Exception):
    """An event its sender may not send through the bridge: ``reason`` is for that sender (in
    the bridge's locale), ``code`` for the logs and the operators."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(code)
        self.code = code
        self.reason = reason


class Authority:
    def __init__(self, homeserver: Homeserver, stores: Stores) -> None:
        self.hs = homeserver
        self.stores = stores

    async def same_portal(self, room_id: str, event_id: str) -> None:
        """Refuse a relation to an event another portal carried (a reply, a reaction...)."""
        rooms = await self.stores.messages.rooms_of(event_id)
        if rooms and room_id not in rooms:
            raise Refused("other_portal", _(OTHER_PORTAL))

    async def may_edit(self, room_id: str, sender: str, target: str, viewer: str) -> None:
        """Refuse an edit of a message ``sender`` did not write."""
        original = await self._original(room_id, target, viewer)
        if original.get("sender") != sender:
            raise Refused("not_the_author", _(NOT_YOUR_MESSAGE))

    async def may_redact(self, room_id: str, sender: str, target: str, viewer: str) -> None:
        """Refuse a redaction of another's event by a member without the power to."""
        original = await self._original(room_id, target, viewer)
        if original.get("sender") == sender:
            return
        if not await self.hs.may_redact_others(viewer, room_id, sender):
            raise Refused("no_power_to_redact", _(NO_POWER_TO_REDACT))

    async def _original(self, room_id: str, event_id: str, viewer: str) -> dict[str, object]:
        await self.same_portal(room_id, event_id)
        original = await self.hs.event_in_room(viewer, room_id, event_id)
        if original is None:
            raise Refused("unknown_target", _(UNKNOWN_TARGET))
        return original
