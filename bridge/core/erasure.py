"""Erasure (the right to be forgotten): what the bridge holds of a professional, and what their
ghosts left on Matrix. One implementation for the admin room's ``forget`` and the CLI's.

In order, each step idempotent (an erasure interrupted half way is finished by running it
again):

1. Queued content: outbox deliveries (pending, failing, dead-lettered) and inbox items
   (pending, waiting, failed) *authored* by the person, found by reading each item's parsed
   payload (its sender's Matrix ID or IDNPS), never by a substring of the stored text.
2. The rows that name them: directory entry and Matrix IDs, permissions, ghost rows.
3. Their ghosts' crypto material (device account, Olm and Megolm sessions).
4. On Matrix, for each ghost: every event it sent in the rooms it is in is redacted (its
   messages, reactions, and its membership events, which carry its name), it leaves those rooms,
   its devices are deleted and its profile (display name, avatar) is cleared. This part is
   recorded (``erasure`` table) before it is tried: when the homeserver does not answer, it
   waits there, and the running bridge (or the next ``forget``) finishes it.
5. An audit record of the erasure: who asked, whom, and counts; never content.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mautrix.api import Method, Path
from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.types import RoomID, UserID

from bridge.db.audit import AuditRecord
from bridge.db.clock import now_ms
from bridge.db.crypto import CryptoStore
from bridge.db.directory import GHOST
from bridge.db.inbox import CRYPTO_ORIGIN, MATRIX_ORIGIN
from bridge.db.stores import Stores
from bridge.i18n import N_, _
from bridge.matrix.homeserver import Homeserver, derived_txn_id

log = logging.getLogger("eimis.erasure")

REASON = "erased at the professional's request"
LEAVE_REASON = N_("Data erased at the person's request (right to erasure).")
"""The reason of each of their ghosts' leaves (room members read it): ``_(LEAVE_REASON)``."""
ERASURE = "erasure"
"""The audit log's direction and kind of an erasure record."""
PAGE = 100


@dataclass
class MatrixPart:
    """What was done on Matrix; ``pending``: what is still to do (homeserver down): ghosts'
    Matrix IDs and ``"<room> <event>"`` redactions."""

    redacted: int = 0
    rooms_left: int = 0
    pending: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class ErasureReport:
    idnps: str
    ghosts: list[str]
    directory_rows: int
    outbox_items: int
    inbox_items: int
    crypto_users: int
    matrix: MatrixPart

    def lines(self) -> list[str]:
        """For the operator (English, ids and counts only)."""
        lines = [
            f"Erased {self.idnps}: {self.directory_rows} directory/permission/ghost row(s), "
            f"{self.outbox_items} queued delivery(ies) and {self.inbox_items} inbox item(s) "
            f"of theirs, crypto material of {self.crypto_users} ghost(s).",
            f"On Matrix: {self.matrix.redacted} event(s) redacted, {self.matrix.rooms_left} "
            "room(s) left, profiles cleared"
            + (" except those below." if self.matrix.pending else "."),
        ]
        if self.matrix.pending:
            ghosts = [step for step in self.matrix.pending if step.startswith("@")]
            events = len(self.matrix.pending) - len(ghosts)
            lines.append(
                f"The homeserver did not answer ({self.matrix.error}): the Matrix part for "
                f"{', '.join(ghosts) or 'no ghost'} ({events} more redaction(s)) is queued; the "
                "running bridge finishes it when the homeserver answers."
            )
        lines.append("An audit record of the erasure was written (no content).")
        return lines


def authored_by(payload: dict[str, Any], idnps: str, mxids: set[str]) -> bool:
    """Whether a queued outbox payload is something this person did (sent, edited, reacted,
    redacted, read): its ``sender`` is one of their Matrix IDs or carries their IDNPS."""
    sender = payload.get("sender")
    if not isinstance(sender, dict):
        return False
    return sender.get("mxid") in mxids or (idnps != "" and sender.get("idnps") == idnps)


def inbox_authored_by(origin: str, payload: dict[str, Any], idnps: str, mxids: set[str]) -> bool:
    """Whether an inbox item is an event of this person: a vendor event whose sender is their
    IDNPS, or a Matrix event sent by one of their Matrix IDs."""
    if origin == CRYPTO_ORIGIN:
        return False
    sender = payload.get("sender")
    if origin == MATRIX_ORIGIN:
        return isinstance(sender, str) and sender in mxids
    return isinstance(sender, str) and sender == idnps


class Erasure:
    def __init__(
        self,
        stores: Stores,
        homeserver: Homeserver | None,
        *,
        crypto: Any = None,
        on_dropped: Callable[[list[int]], Awaitable[None]] | None = None,
    ) -> None:
        """``crypto``: the running bridge's crypto machine (forgets its in-memory copies and
        the device on the homeserver); without it, only the stored material is erased and the
        devices go with the Matrix part. ``on_dropped``: told of the outbox items erased (the
        running bridge forgets any copy it holds in memory)."""
        self.stores = stores
        self.hs = homeserver
        self.crypto = crypto
        self.on_dropped = on_dropped
        self.erasures = stores.erasures
        self._matrix_lock = asyncio.Lock()

    async def erase(self, idnps: str, requested_by: str) -> ErasureReport:
        ghosts = [ghost.mxid for ghost in await self.stores.ghosts.of_professional(idnps)]
        listed = await self.stores.directory.mxids(idnps)
        mxids = {m.mxid for m in listed} | set(ghosts)
        # Queued content first: it needs the Matrix IDs the rows below still name.
        outbox = [
            item.seq
            for item in await self.stores.outbox.waiting()
            if authored_by(item.payload, idnps, mxids)
        ]
        dropped = await self.stores.outbox.drop(outbox, REASON)
        if outbox and self.on_dropped is not None:
            await self.on_dropped(outbox)
        inbox = [
            item.seq
            async for item in self.stores.inbox.unprocessed()
            if inbox_authored_by(item.origin, item.payload, idnps, mxids)
        ]
        erased_inbox = await self.stores.inbox.erase(inbox, REASON)
        directory_rows = await self.erasures.erase_rows(idnps)
        for ghost in ghosts:
            self.stores.ghosts.forget(ghost)
        # The bridge's users among their Matrix IDs: ghost rows, and ghosts the directory
        # lists (the Matrix part is theirs; native accounts are their homeserver's).
        ours = sorted(set(ghosts) | {m.mxid for m in listed if m.kind == GHOST})
        for ghost in ours:
            # Which vendor sides were told of them: their ghosts' leaves, next, tell no vendor
            # (an erasure is the bridge forgetting them, not them leaving a conversation).
            await self.stores.portals.forget_person(ghost)
            if self.crypto is not None:
                await self.crypto.forget(ghost)  # its device on the homeserver too
            else:
                await CryptoStore(self.stores.db).forget_user(ghost)
        # What the audit log says their ghosts sent, for the rooms their ghosts have left since
        # (the bot redacts those, where its power allows).
        sent = [f"{room} {event}" for room, event in await self.erasures.events_sent_for(idnps)]
        todo = [*ours, *sent]
        erasure_id = await self.erasures.open(todo)
        matrix = await self._matrix_part(erasure_id, todo)
        report = ErasureReport(
            idnps, ours, directory_rows, dropped, erased_inbox, len(ours), matrix
        )
        await self._audit(requested_by, idnps, report)
        log.info(
            "Erasure %d done for %d ghost(s); Matrix part pending for %d",
            erasure_id,
            len(ours),
            len(matrix.pending),
        )
        return report

    async def resume(self) -> MatrixPart:
        """Finish the Matrix part of erasures that waited for the homeserver."""
        total = MatrixPart()
        for row in await self.erasures.unfinished():
            part = await self._matrix_part(row.id, row.pending)
            total.redacted += part.redacted
            total.rooms_left += part.rooms_left
            total.pending += part.pending
            total.error = part.error or total.error
            if not part.pending:
                await self.stores.audit.record(
                    AuditRecord(
                        at=now_ms(),
                        connector="bridge",
                        direction=ERASURE,
                        kind=ERASURE,
                        outcome="completed",
                        detail=f"erasure {row.id}: matrix part done, {part.redacted} redacted",
                    )
                )
        return total

    # Matrix ------------------------------------------------------------------------------------

    async def _matrix_part(self, erasure_id: int, mxids: Iterable[str]) -> MatrixPart:
        async with self._matrix_lock:
            return await self._matrix_part_locked(erasure_id, mxids)

    async def _matrix_part_locked(self, erasure_id: int, todo: Iterable[str]) -> MatrixPart:
        """``todo``: ghosts (Matrix IDs) to erase, then ``"<room> <event>"`` events to redact in
        rooms those ghosts were no longer in."""
        part = MatrixPart()
        steps = list(todo)
        rooms_done: set[str] = set()
        if self.hs is None:
            part.pending, part.error = steps, "no homeserver"
        else:
            for index, step in enumerate(steps):
                try:
                    if step.startswith("@"):
                        rooms_done |= await self._erase_ghost(step, part)
                    else:
                        room_id, _space, event_id = step.partition(" ")
                        if room_id not in rooms_done:
                            part.redacted += await self._redact_as_bot(room_id, event_id)
                except (MatrixConnectionError, OSError, TimeoutError) as error:
                    part.pending = steps[index:]
                    part.error = type(error).__name__
                    break
                except MatrixRequestError as error:
                    if error.http_status >= 500 or error.http_status == 429:
                        part.pending = steps[index:]
                        part.error = f"{error.http_status} {error.errcode}"
                        break
                    # Refused for good (a ghost the homeserver never registered ...): nothing
                    # more can be done there; the rest goes on.
                    log.warning("Erasure step refused by the homeserver (%s)", error.errcode)
        await self.erasures.remaining(erasure_id, part.pending, part.error)
        return part

    async def _redact_as_bot(self, room_id: str, event_id: str) -> int:
        """Redact one event as the bot, unless it is redacted already; 0 when the bot cannot
        (not in the room, or without the power to)."""
        assert self.hs is not None
        bot = self.hs.config.bot_mxid
        try:
            event = await self.hs.api.user(UserID(bot)).request(
                Method.GET, Path.v3.rooms[RoomID(room_id)].event[event_id]
            )
            unsigned = event.get("unsigned") if isinstance(event, dict) else None
            if not isinstance(event, dict) or not event.get("content"):
                return 0
            if isinstance(unsigned, dict) and unsigned.get("redacted_because"):
                return 0
            await self.hs.redact(
                bot, room_id, event_id, txn_id=derived_txn_id("erasure", room_id, event_id)
            )
        except MatrixRequestError as error:
            if error.http_status >= 500 or error.http_status == 429:
                raise
            log.warning("Could not redact an event in %s as the bot (%s)", room_id, error.errcode)
            return 0
        return 1

    async def _erase_ghost(self, mxid: str, part: MatrixPart) -> set[str]:
        """Redact, leave, delete devices, clear the profile; the rooms it was in."""
        assert self.hs is not None
        api = self.hs.api.user(UserID(mxid))
        answer = await api.request(Method.GET, Path.v3.joined_rooms)
        rooms = answer.get("joined_rooms") if isinstance(answer, dict) else None
        for room_id in rooms if isinstance(rooms, list) else []:
            part.redacted += await self._redact_everything(mxid, str(room_id))
            try:
                await self.hs.intent(mxid).leave_room(RoomID(str(room_id)), reason=_(LEAVE_REASON))
                part.rooms_left += 1
            except MatrixRequestError as error:
                if error.http_status >= 500:
                    raise
                log.warning("Could not leave %s as %s (%s)", room_id, mxid, error.errcode)
        devices = await api.request(Method.GET, Path.v3.devices)
        for device in devices.get("devices", []) if isinstance(devices, dict) else []:
            device_id = device.get("device_id") if isinstance(device, dict) else None
            if isinstance(device_id, str):
                try:
                    await api.request(Method.DELETE, Path.v3.devices[device_id], {})
                except MatrixRequestError as error:
                    if error.http_status >= 500:
                        raise
                    log.warning("Could not delete a device of %s (%s)", mxid, error.errcode)
        await api.request(
            Method.PUT, Path.v3.profile[UserID(mxid)].displayname, {"displayname": ""}
        )
        await api.request(Method.PUT, Path.v3.profile[UserID(mxid)].avatar_url, {"avatar_url": ""})
        return {str(room_id) for room_id in rooms} if isinstance(rooms, list) else set()

    async def _redact_everything(self, mxid: str, room_id: str) -> int:
        """Redact every event ``mxid`` sent in the room that still has content: its messages,
        reactions, and its membership events (they carry its name and avatar)."""
        assert self.hs is not None
        targets: list[str] = []
        token: str | None = None
        query_filter = json.dumps({"senders": [mxid], "lazy_load_members": False})
        while True:
            query = {"dir": "b", "limit": str(PAGE), "filter": query_filter}
            if token is not None:
                query["from"] = token
            page = await self.hs.intent(mxid).api.request(
                Method.GET, Path.v3.rooms[RoomID(room_id)].messages, query_params=query
            )
            events = page.get("chunk") if isinstance(page, dict) else None
            if not isinstance(events, list) or not events:
                break
            for event in events:
                if isinstance(event, dict) and _carries_content(event, mxid):
                    targets.append(str(event["event_id"]))
            token = page.get("end")
            if not isinstance(token, str):
                break
        redacted = 0
        for event_id in targets:
            txn_id = derived_txn_id("erasure", room_id, event_id)
            try:
                await self.hs.redact(mxid, room_id, event_id, txn_id=txn_id)
            except MatrixRequestError as error:
                if error.http_status >= 500:
                    raise
                # The ghost may not redact there: the bot does, where its power allows.
                try:
                    await self.hs.redact(self.hs.config.bot_mxid, room_id, event_id, txn_id=txn_id)
                except MatrixRequestError as bot_error:
                    if bot_error.http_status >= 500:
                        raise
                    log.warning("Could not redact an event in %s (%s)", room_id, error.errcode)
                    continue
            redacted += 1
        return redacted

    # Audit -------------------------------------------------------------------------------------

    async def _audit(self, requested_by: str, idnps: str, report: ErasureReport) -> None:
        await self.stores.audit.record(
            AuditRecord(
                at=now_ms(),
                connector="bridge",
                direction=ERASURE,
                kind=ERASURE,
                outcome="partial" if report.matrix.pending else "done",
                sender=requested_by,
                recipient=idnps,
                detail=(
                    f"ghosts {len(report.ghosts)}, rows {report.directory_rows}, "
                    f"outbox {report.outbox_items}, inbox {report.inbox_items}, "
                    f"redacted {report.matrix.redacted}, rooms left {report.matrix.rooms_left}, "
                    f"matrix pending {len(report.matrix.pending)}"
                ),
            )
        )


def _carries_content(event: dict[str, Any], mxid: str) -> bool:
    """An event of ``mxid`` worth redacting: not redacted yet, with content; state events only
    when they are its own membership (the room's other state is the room's, not the person's)."""
    if event.get("sender") != mxid or not isinstance(event.get("event_id"), str):
        return False
    unsigned = event.get("unsigned")
    if isinstance(unsigned, dict) and unsigned.get("redacted_because"):
        return False
    content = event.get("content")
    if not isinstance(content, dict) or not content:
        return False
    if "state_key" in event:
        if event.get("type") != "m.room.member" or event.get("state_key") != mxid:
            return False
        return any(content.get(key) for key in ("displayname", "avatar_url"))
    return event.get("type") != "m.room.redaction"
