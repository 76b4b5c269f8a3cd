"""``AddParticipants`` and ``RemoveParticipants`` at a vendor: people joining or leaving the
portal join or leave its conversation there.

The change's idempotency key is the membership event (``request_id``). What the vendor cannot
do is said in its conversation instead, in the bridge's locale, by an "EIMIS" sender (a
stand-in message): people joining where the vendor cannot add anyone, people outside it
leaving where it cannot take them out, and a vendor user removed where the vendor lets nobody
remove its users (that user is told they will no longer receive the conversation). Once no
user of the vendor is left in the portal, its link is closed: that side receives nothing new.
"""

from __future__ import annotations

import logging
from typing import cast

from bridge.core.executors.context import Context, Target
from bridge.core.executors.outcome import Delivered, MessageMapped
from bridge.core.executors.stand_in import eimis, send_stand_in
from bridge.core.members import Member
from bridge.core.operations import AddParticipants, RemoveParticipants
from bridge.i18n import _, ngettext
from connectors.base import MemberRemoval, ParticipantAdding, ParticipantChange, Sender
from connectors.idnps import Idnps

log = logging.getLogger("eimis.executors.membership")


async def add_participants(ctx: Context, target: Target, add: AddParticipants) -> Delivered:
    by = add.by.as_sender() if add.by is not None else None
    if target.caps.add_participants:
        change = ParticipantChange(
            request_id=add.event_id,
            members=add.members,
            external=tuple(m.as_sender() for m in add.external),
            by=by,
        )
        await cast(ParticipantAdding, target.connector).add_participants(
            target.conversation, change
        )
        return Delivered(target.conversation)
    names = await _names(ctx, target, add.members, add.external)
    if by is None:
        text = ngettext(
            "{names} joined the conversation.", "{names} joined the conversation.", len(names)
        ).format(names=_listed(names))
    else:
        text = ngettext(
            "{names} joined the conversation (added by {by}).",
            "{names} joined the conversation (added by {by}).",
            len(names),
        ).format(names=_listed(names), by=by.display_name)
    mapped = await _say(ctx, target, add.event_id, "joined", text)
    return Delivered(target.conversation, (), (mapped,))


async def remove_participants(
    ctx: Context, target: Target, remove: RemoveParticipants
) -> Delivered:
    by = remove.by.as_sender() if remove.by is not None else None
    mapped: list[MessageMapped] = []
    if remove.external:
        if target.caps.add_participants:
            change = ParticipantChange(
                request_id=remove.event_id,
                external=tuple(m.as_sender() for m in remove.external),
                by=by,
                reason=remove.reason,
            )
            await cast(ParticipantAdding, target.connector).remove_external(
                target.conversation, change
            )
        else:
            names = [m.display_name for m in remove.external]
            mapped.append(
                await _say(
                    ctx, target, remove.event_id, "left", _departure(names, by, remove.reason)
                )
            )
    if remove.members:
        if target.caps.remove_participants:
            change = ParticipantChange(
                request_id=remove.event_id, members=remove.members, by=by, reason=remove.reason
            )
            await cast(MemberRemoval, target.connector).remove_members(target.conversation, change)
        else:
            names = await _names(ctx, target, remove.members, ())
            mapped.append(
                await _say(
                    ctx,
                    target,
                    remove.event_id,
                    "removed",
                    _removal(names, by, remove.reason),
                )
            )
        await _close_when_nobody_left(ctx, target)
    return Delivered(target.conversation, (), tuple(mapped))


async def _close_when_nobody_left(ctx: Context, target: Target) -> None:
    """No user of this vendor is joined in the portal any more: its link is closed (that side
    receives nothing new; what was queued before is still delivered)."""
    portal = await ctx.stores.portals.get(target.room_id)
    if portal is None or ctx.portals is None:
        return
    ids = ctx.portals.ids
    for mxid in await ctx.hs.joined_members(target.room_id, viewer=portal.voice):
        ref = ids.parse(mxid)
        if ref is not None and ref.connector == target.connector_id:
            return
    await ctx.stores.portals.close_link(target.room_id, target.connector_id)
    log.info(
        "Closed the %s link of %s: none of its users is left", target.connector_id, target.room_id
    )


async def _say(ctx: Context, target: Target, event_id: str, what: str, text: str) -> MessageMapped:
    return await send_stand_in(
        target,
        event_id=event_id,
        request_id=f"{event_id}:{what}",
        sender=eimis(ctx),
        text=text,
        ts=None,
        about=None,
        message_kind="notice",
    )


async def _names(
    ctx: Context, target: Target, members: tuple[Idnps, ...], external: tuple[Member, ...]
) -> list[str]:
    """How the vendor's users (by their ghosts' names) and the others are named."""
    names: list[str] = []
    for idnps in members:
        name: str | None = None
        if ctx.portals is not None:
            ghost = await ctx.stores.ghosts.get(ctx.portals.ids.mxid(target.connector_id, idnps))
            name = ghost.display_name if ghost is not None else None
        names.append(name or str(idnps))
    return names + [m.display_name for m in external]


def _listed(names: list[str]) -> str:
    if len(names) <= 1:
        return "".join(names)
    return _("{names} and {last}").format(names=", ".join(names[:-1]), last=names[-1])


def _because(text: str, reason: str | None) -> str:
    """``text``, with the reason given for it (when there is one)."""
    if not reason:
        return text
    return _("{text} (reason: {reason})").format(text=text, reason=reason)


def _departure(names: list[str], by: Sender | None, reason: str | None) -> str:
    if by is None:
        text = ngettext(
            "{names} left the conversation", "{names} left the conversation", len(names)
        ).format(names=_listed(names))
    else:
        text = ngettext(
            "{names} was removed from the conversation by {by}",
            "{names} were removed from the conversation by {by}",
            len(names),
        ).format(names=_listed(names), by=by.display_name)
    return f"{_because(text, reason)}."


def _removal(names: list[str], by: Sender | None, reason: str | None) -> str:
    """The vendor's own user, removed where the vendor cannot remove anyone: they are told."""
    if by is not None:
        text = _("{names}: you have been removed from this conversation by {by}").format(
            names=_listed(names), by=by.display_name
        )
    else:
        text = _("{names}: you have been removed from this conversation on Matrix").format(
            names=_listed(names)
        )
    return _("{text}. You will no longer receive the messages of this conversation.").format(
        text=_because(text, reason)
    )
