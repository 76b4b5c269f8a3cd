"""``AddParticipants`` and ``RemoveParticipants`` at a vendor: people joining or leaving the
portal join or leave its conversation there.

The change's idempotency key is the membership event (``request_id``). What the vendor cannot
do is said in its conversation instead, in French, by an "EIMIS" sender (a stand-in message):
people joining where the vendor cannot add anyone, people outside it leaving where it cannot
take them out, and a vendor user removed where the vendor lets nobody remove its users (that
user is told they will no longer receive the conversation). Once no user of the vendor is left
in the portal, its link is closed: that side receives nothing new.
"""

from __future__ import annotations

import logging
from typing import cast

from bridge.core.executors.context import Context, Target
from bridge.core.executors.outcome import Delivered, MessageMapped
from bridge.core.executors.stand_in import eimis, send_stand_in
from bridge.core.members import Member
from bridge.core.operations import AddParticipants, RemoveParticipants
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
    verb = "ont rejoint" if len(names) > 1 else "a rejoint"
    text = f"{_listed(names)} {verb} la conversation"
    if by is not None:
        text += f" (ajout par {by.display_name})"
    mapped = await _say(ctx, target, add.event_id, "joined", f"{text}.")
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
    return f"{', '.join(names[:-1])} et {names[-1]}"


def _because(reason: str | None) -> str:
    return f" (motif : {reason})" if reason else ""


def _departure(names: list[str], by: Sender | None, reason: str | None) -> str:
    plural = len(names) > 1
    if by is None:
        verb = "ont quitté" if plural else "a quitté"
        return f"{_listed(names)} {verb} la conversation{_because(reason)}."
    verb = "ont été retirés" if plural else "a été retiré(e)"
    return f"{_listed(names)} {verb} de la conversation par {by.display_name}{_because(reason)}."


def _removal(names: list[str], by: Sender | None, reason: str | None) -> str:
    """The vendor's own user, removed where the vendor cannot remove anyone: they are told."""
    who = f"par {by.display_name}" if by is not None else "sur Matrix"
    return (
        f"{_listed(names)} : vous avez été retiré(e) de cette conversation {who}"
        f"{_because(reason)}. Vous ne recevrez plus les messages de cette conversation."
    )
