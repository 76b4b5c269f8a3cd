"""Delivery: carries outbox items to the vendors, in order per (connector, portal room).

Each call carries an idempotency key (the portal room for a new conversation, the Matrix event id
for a message, reaction or edit), so a retry after a timeout or a crash never shows anything
twice. What a vendor cannot show is degraded (``degradation.py``) and the sender is told
(``status.py``): nothing is silently lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from bridge.config import MediaConfig
from bridge.core import operations as op
from bridge.core.audit_trail import Trail
from bridge.core.connectors import ConnectorSet
from bridge.core.degradation import (
    FileRef,
    Undeliverable,
    check_content,
    check_file,
    file_ref,
    location,
    location_as_text,
    message_kind,
    render_text_bounded,
)
from bridge.core.errors import NotThere, PermanentFailure
from bridge.core.filetypes import content_type, peek
from bridge.core.health import ConnectorHealth
from bridge.core.lanes import LaneScheduler
from bridge.core.members import Member
from bridge.core.portals import Portals
from bridge.core.send_status import StatusReporter
from bridge.crypto.attachments import AttachmentError, decrypt_stream
from bridge.db.group_commit import GroupCommit, Write
from bridge.db.message_map import MessageMapStore
from bridge.db.outbox import OutboxItem
from bridge.db.portal import PortalLink
from bridge.db.stores import Stores
from bridge.logs import log_context
from bridge.matrix.homeserver import Homeserver
from bridge.matrix.media import MediaError, MediaRepository
from bridge.metrics import TO_VENDOR
from connectors.base import (
    Connector,
    ConnectorError,
    Mention,
    NewConversation,
    OutboundAttachment,
    OutboundMessage,
)
from connectors.idnps import Idnps

log = logging.getLogger("eimis.delivery")

_MAPPED = MessageMapStore.add_write("", "", "", "").sql


class Delivery:
    def __init__(
        self,
        stores: Stores,
        homeserver: Homeserver,
        connectors: ConnectorSet,
        media: MediaRepository,
        media_config: MediaConfig,
        status: StatusReporter,
        max_attempts: int = 10,
        success_statuses: bool = False,
        trail: Trail | None = None,
        portals: Portals | None = None,
    ) -> None:
        self.stores = stores
        self.hs = homeserver
        self.connectors = connectors
        self.media = media
        self.media_config = media_config
        self.status = status
        self.max_attempts = max_attempts
        self.success_statuses = success_statuses
        self.portals = portals
        """How members are shown to vendors (a native user never as a bare free name)."""
        self.trail = trail or Trail(stores.audit)
        """Each delivery's audit row (committed with it) and metrics."""
        self.health = ConnectorHealth(self._vendor_back)
        # Its own group commit: on PostgreSQL, completed deliveries commit while the router's
        # batch (other rows) is committing.
        self._commit = GroupCommit(stores.db)
        self._scheduler: LaneScheduler[OutboxItem] | None = None
        self._attempts: dict[int, int] = {}
        self._told_retrying: set[int] = set()
        self._media_tries: dict[int, int] = {}
        """Failed tries at fetching an item's file (not the homeserver down), by seq."""

    def attach(self, scheduler: LaneScheduler[OutboxItem]) -> None:
        self._scheduler = scheduler

    def _vendor_back(self, connector: str) -> None:
        if self._scheduler is not None:
            self._scheduler.retry_now(f"{connector}\x1f")

    async def handle(self, item: OutboxItem) -> None:
        """Deliver one item; raises only for failures worth retrying."""
        with log_context(connector=item.connector, room=item.room_id):
            await self._handle(item)

    async def _handle(self, item: OutboxItem) -> None:
        writes: list[Write] = []
        seen: dict[str, str] = {}
        why: str | None = None
        try:
            notes = await self._deliver(item, writes, seen)
        except NotThere as gone:
            notes, why = None, gone.why
        except ConnectorError as error:
            if error.unreachable:
                self.health.unreachable(item.connector)
                raise
            if error.credentials_rejected:
                self.health.rejected(item.connector)
                raise
            self.health.answered(item.connector)
            if not error.retriable:
                await self._give_up(item, str(error), unsupported=False, why="vendor_refused")
                return
            attempts = self._attempts.get(item.seq, item.attempts) + 1
            self._attempts[item.seq] = attempts
            if attempts >= self.max_attempts:
                await self._dead_letter(item, str(error), attempts)
                return
            raise
        except MediaError as error:
            if error.homeserver_down:
                raise  # the homeserver's trouble, not this message's: no budget spent
            tries = self._media_tries.pop(item.seq, 0) + 1
            if error.retriable and tries < self.media_config.fetch_attempts:
                self._media_tries[item.seq] = tries
                raise  # this file's trouble: its budget, then this message alone fails
            log.warning("Delivery %d: a file could not be fetched: %s", item.seq, error)
            await self._give_up(item, _unfetchable(error, tries), unsupported=False, why="media")
            return
        except Undeliverable as refusal:
            await self._give_up(item, str(refusal), unsupported=True, why="unsupported")
            return
        except PermanentFailure as failure:
            await self._give_up(item, str(failure), unsupported=False, why="permanent")
            return
        self.health.answered(item.connector)
        # None: nothing to do there (an edit of a message that never reached this vendor...).
        audit = self.trail.to_vendor(
            item,
            "delivered" if notes is not None else "skipped",
            recipient=seen.get("conversation"),
            remote_ids=[str(w.args[1]) for w in writes if w.sql == _MAPPED],
            detail=why or ("degraded" if notes else None),
        )
        done = [*writes, audit, self.stores.outbox.done_write(item.seq)]
        await self._commit.commit(done)
        self.trail.committed(done, item.created_at)
        self._told_retrying.discard(item.seq)
        self._attempts.pop(item.seq, None)
        self._media_tries.pop(item.seq, None)
        if notes or (notes is not None and self.success_statuses):
            await self._report(item, "SUCCESS", "; ".join(notes))

    async def record_error(self, item: OutboxItem, error: Exception) -> None:
        self.trail.retried(item.connector, TO_VENDOR)
        await self.stores.outbox.record_attempt(item.seq, _describe(error))
        if item.seq not in self._told_retrying and "sender" in item.payload:
            self._told_retrying.add(item.seq)
            await self._report(
                item,
                "FAIL_RETRIABLE",
                "le fichier n'a pas encore pu être récupéré ; le pont réessaie"
                if isinstance(error, MediaError)
                else f"{item.connector} is not answering; the bridge keeps trying",
            )

    async def _report(
        self, item: OutboxItem, outcome: Any, detail: str, unsupported: bool = False
    ) -> None:
        if "sender" not in item.payload or item.operation == op.MARK_READ:
            return
        await self.status.report(
            room_id=item.room_id,
            event_id=item.payload["event_id"],
            sender=Member.from_json(item.payload["sender"]),
            target=item.connector,
            outcome=outcome,
            detail=detail,
            unsupported=unsupported,
        )

    async def _dead_letter(self, item: OutboxItem, reason: str, attempts: int) -> None:
        """The retry budget is spent: park the delivery and hold the rest of its conversation."""
        log.warning(
            "Delivery %d to %s is a dead letter after %d attempts: %s",
            item.seq,
            item.connector,
            attempts,
            reason,
        )
        await self._audit(item, "dead_letter", "retries_exhausted")
        await self.stores.outbox.mark_dead(item.seq, reason)
        self._attempts.pop(item.seq, None)
        self._told_retrying.discard(item.seq)
        if self._scheduler is not None:
            self._scheduler.drop_backlog(item.lane)
        detail = (
            f"{item.connector} refused it {attempts} times ({reason}); later messages of "
            "this conversation wait until an operator retries or discards it"
        )
        if item.operation == op.CREATE_CONVERSATION:
            await self.status.notice(
                item.room_id,
                f"This conversation is held: {detail}",
                txn_id=f"eimis.dead.{item.seq}",
            )
        else:
            await self._report(item, "FAIL_PERMANENT", detail)

    async def _give_up(self, item: OutboxItem, reason: str, *, unsupported: bool, why: str) -> None:
        """``why``: the reason's class, for the audit log (the reason's text stays out)."""
        log.warning("Delivery %d to %s failed for good: %s", item.seq, item.connector, reason)
        await self._audit(item, "refused" if unsupported else "failed", why)
        await self.stores.outbox.mark_failed(item.seq, reason)
        self._told_retrying.discard(item.seq)
        if item.operation == op.CREATE_CONVERSATION:
            await self.status.notice(
                item.room_id,
                f"This conversation could not be opened on {item.connector}: {reason}",
                txn_id=f"eimis.create-failed.{item.seq}",
            )
        else:
            await self._report(item, "FAIL_PERMANENT", reason, unsupported)

    async def _audit(self, item: OutboxItem, outcome: str, why: str) -> None:
        """The audit row of a delivery that did not happen, committed before the item's fate
        (a crash between the two records it twice rather than never)."""
        link = await self.stores.portals.link(item.room_id, item.connector)
        write = self.trail.to_vendor(
            item,
            outcome,
            recipient=link.conversation_id if link is not None else None,
            detail=why,
        )
        await self._commit.commit([write])
        self.trail.committed([write], item.created_at)

    # Dispatch ----------------------------------------------------------------------------------

    async def _deliver(
        self, item: OutboxItem, writes: list[Write], seen: dict[str, str] | None = None
    ) -> list[str] | None:
        """Do the operation; return the degradations made (None: nothing was done there, so
        nothing to report).

        The message ids it maps are added to ``writes``, committed with the item's completion;
        ``seen`` gets the vendor ``conversation`` it went to (for the audit log).
        """
        seen = {} if seen is None else seen
        connector = self.connectors.get(item.connector)
        if connector is None:
            raise PermanentFailure(f"connector {item.connector!r} is not running")
        link = await self.stores.portals.link(item.room_id, item.connector)
        if link is None:
            raise PermanentFailure(f"the room is not linked to {item.connector}")
        if link.conversation_id is not None:
            seen["conversation"] = link.conversation_id
        if item.operation == op.CREATE_CONVERSATION:
            created = await self._create_conversation(item, connector, link)
            if created is None:
                return None  # opened before
            seen["conversation"] = created
            return []
        if link.conversation_id is None:
            raise PermanentFailure(f"the {item.connector} conversation was never opened")
        conversation = link.conversation_id
        handlers = {
            op.SEND_MESSAGE: self._send_message,
            op.EDIT_MESSAGE: self._edit_message,
            op.REDACT: self._redact,
            op.ADD_REACTION: self._add_reaction,
            op.MARK_READ: self._mark_read,
        }
        handler = handlers.get(item.operation)
        if handler is None:
            raise PermanentFailure(f"unknown outbox operation {item.operation!r}")
        return await handler(item, connector, conversation, writes)

    async def _create_conversation(
        self, item: OutboxItem, connector: Connector, link: PortalLink
    ) -> str | None:
        """The conversation opened (None when it already was)."""
        if link.conversation_id is not None:
            return None
        conversation_id = await connector.create_conversation(
            NewConversation(
                request_id=item.room_id,
                title=item.payload.get("title"),
                members=tuple(Idnps(m) for m in item.payload["members"]),
                external=tuple(Member.from_json(m).as_sender() for m in item.payload["external"]),
            )
        )
        await self.stores.portals.set_conversation(item.room_id, item.connector, conversation_id)
        log.info("Opened %s conversation %s for %s", item.connector, conversation_id, item.room_id)
        return conversation_id

    # Messages ----------------------------------------------------------------------------------

    async def _send_message(
        self, item: OutboxItem, connector: Connector, conversation: str, writes: list[Write]
    ) -> list[str]:
        payload = item.payload
        content: dict[str, Any] = payload["content"]
        caps = connector.capabilities
        vendor = item.connector
        sender = Member.from_json(payload["sender"])
        notes: list[str] = []
        if content.get("eimis.unknown_msgtype"):
            notes.append(
                f"{content['eimis.unknown_msgtype']} is not a bridged message type: "
                "sent as its text"
            )
        reply_to = await self._reply_target(item, connector, notes)
        base = dict(
            sender=sender.as_sender(),
            timestamp=_when(payload.get("ts")),
            message_kind=message_kind(content),
            reply_to=reply_to,
        )
        ref = file_ref(content)
        place = location(content)
        if ref is not None:
            ceiling = check_file(
                ref, caps, vendor, self.media_config.max_file_size, self.media_config.allows
            )
            real = await self._real_type(ref, ceiling)
            ref, corrected = check_content(ref, real, caps, vendor, self.media_config.allows)
            if corrected:
                notes.append(corrected)
            attachment = OutboundAttachment(
                name=ref.name,
                mime_type=ref.mime_type,
                size=max(ref.size, 0),
                open=lambda: self._stream(ref.mxc, ceiling, ref.encrypted),
            )
            messages = [
                OutboundMessage(
                    request_id=payload["event_id"], text="", attachment=attachment, **base
                )
            ]
        elif place is not None and caps.locations:
            messages = [
                OutboundMessage(request_id=payload["event_id"], text="", location=place, **base)
            ]
        elif place is not None:
            notes.append(f"{vendor} cannot show locations: sent as a map link")
            messages = [
                OutboundMessage(
                    request_id=payload["event_id"], text=location_as_text(place), **base
                )
            ]
        else:
            rendered = await render_text_bounded(content, caps, sender.display_name, vendor)
            notes.extend(rendered.notes)
            mentions = await self._mentions(item, rendered.mention_mxids, notes)
            messages = [
                OutboundMessage(
                    request_id=payload["event_id"] if i == 0 else f"{payload['event_id']}#{i}",
                    text=part,
                    html=rendered.html if len(rendered.parts) == 1 else None,
                    mentions=mentions,
                    **{**base, "reply_to": reply_to if i == 0 else None},
                )
                for i, part in enumerate(rendered.parts)
            ]
        for message in messages:
            remote_id = await self._send_quoting(connector, conversation, message, notes)
            writes.append(
                self.stores.messages.add_write(vendor, remote_id, item.room_id, payload["event_id"])
            )
        return notes

    async def _reply_target(
        self, item: OutboxItem, connector: Connector, notes: list[str]
    ) -> str | None:
        reply_event = item.payload.get("reply_to_event")
        if not reply_event:
            return None
        if not connector.capabilities.replies:
            notes.append(f"{item.connector} has no replies: sent without the quoted message")
            return None
        target = await self._message_ref(item.connector, reply_event, item.room_id)
        if target is None:
            notes.append(
                f"the message it answers never reached {item.connector}: sent without the quote"
            )
        return target

    async def _send_quoting(
        self, connector: Connector, conversation: str, message: OutboundMessage, notes: list[str]
    ) -> str:
        """Send ``message``; when the vendor refuses it for good while it quotes a message (the
        quoted one may be gone there), send it again without the quote rather than lose it."""
        try:
            return await connector.send_message(conversation, message)
        except ConnectorError as error:
            if message.reply_to is None or error.retriable or error.unreachable:
                raise
        notes.append("le message cité n'existe plus chez le destinataire : envoyé sans la citation")
        return await connector.send_message(
            conversation,
            dataclasses.replace(
                message, reply_to=None, request_id=f"{message.request_id}#unquoted"
            ),
        )

    async def _message_ref(self, connector_id: str, event_id: str, room_id: str) -> str | None:
        """The vendor id of a message this portal carried (never one of another portal)."""
        for ref in await self.stores.messages.remotes_for(connector_id, event_id, room_id=room_id):
            if op.parse_reaction_ref(ref) is None:
                return ref
        return None

    async def _mentions(
        self, item: OutboxItem, mxids: list[str], notes: list[str] | None = None
    ) -> tuple[Mention, ...]:
        """The people ``mxids`` names, as the vendor lists them: past its ``max_mentions``, the
        others stay plain names in the text (and ``notes`` tells the sender)."""
        if not mxids:
            return ()
        people = list(dict.fromkeys(mxids))
        connector = self.connectors.get(item.connector)
        limit = connector.capabilities.max_mentions if connector is not None else None
        if limit is not None and len(people) > limit:
            if notes is not None:
                notes.append(
                    f"{item.connector} accepte au plus {limit} mentions par message : "
                    f"les {len(people) - limit} autres sont écrites comme de simples noms"
                )
            people = people[:limit]
        portal = await self.stores.portals.get(item.room_id)
        found = []
        for mxid in people:
            ghost = await self.stores.ghosts.get(mxid)
            if ghost is not None:
                found.append(Mention(ghost.display_name or mxid, Idnps(ghost.idnps), mxid))
            elif portal is not None and self.portals is not None:
                member = await self.portals.sender(item.room_id, mxid, portal.voice)
                found.append(Mention(member.display_name, None, mxid))
            elif portal is not None:
                name = await self.hs.display_name(item.room_id, mxid, viewer=portal.voice)
                found.append(Mention(f"{name} ({mxid})" if name != mxid else mxid, None, mxid))
        return tuple(found)

    async def _real_type(self, ref: FileRef, ceiling: int) -> str:
        """The file's type as its first bytes (decrypted) show it, before it is sent. Fetching
        them first also makes a file that cannot be fetched fail before the vendor sees
        anything of the message."""
        async with self._stream(ref.mxc, ceiling, ref.encrypted) as chunks:
            head, rest = await peek(chunks)
            for stream in (rest, chunks):
                with contextlib.suppress(Exception):
                    await stream.aclose()  # type: ignore[attr-defined]
        return await content_type(head)

    @contextlib.asynccontextmanager
    async def _stream(
        self, mxc: str, ceiling: int, encrypted: dict[str, Any] | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """The file's bytes from the homeserver, refusing to pass more than ``ceiling``;
        decrypted on the way when it was sent in an encrypted room (``encrypted``)."""
        async with self.media.download(mxc) as chunks:

            async def bounded() -> AsyncIterator[bytes]:
                seen = 0
                async for chunk in chunks:
                    seen += len(chunk)
                    if seen > ceiling:
                        raise Undeliverable("the file is larger than announced and than allowed")
                    yield chunk

            if encrypted is None:
                yield bounded()
                return

            async def decrypted() -> AsyncIterator[bytes]:
                try:
                    async for chunk in decrypt_stream(bounded(), encrypted):
                        yield chunk
                except AttachmentError as error:
                    raise Undeliverable(f"the encrypted file cannot be read: {error}") from None

            yield decrypted()

    async def _edit_message(
        self, item: OutboxItem, connector: Connector, conversation: str, writes: list[Write]
    ) -> list[str] | None:
        payload = item.payload
        target = await self._message_ref(item.connector, payload["target_event"], item.room_id)
        if target is None:
            return None  # the original never reached this vendor: nothing to correct there
        sender = Member.from_json(payload["sender"])
        caps = connector.capabilities
        rendered = await render_text_bounded(
            payload["content"], caps, sender.display_name, item.connector
        )
        mentions = await self._mentions(item, rendered.mention_mxids)
        notes = list(rendered.notes)
        text = rendered.parts[0]
        if len(rendered.parts) > 1:
            notes.append("the correction was cut to the vendor's length limit")
        if caps.edits:
            await connector.edit_message(
                conversation,
                target,
                OutboundMessage(
                    request_id=payload["event_id"],
                    sender=sender.as_sender(),
                    text=text,
                    timestamp=_when(payload.get("ts")),
                    html=rendered.html,
                    mentions=mentions,
                ),
            )
            return notes
        notes.append(f"{item.connector} has no edits: sent as a marked correction")
        remote_id = await connector.send_message(
            conversation,
            OutboundMessage(
                request_id=payload["event_id"],
                sender=sender.as_sender(),
                text=f"✏️ Correction: {text}",
                timestamp=_when(payload.get("ts")),
                reply_to=target if caps.replies else None,
                mentions=mentions,
            ),
        )
        writes.append(
            self.stores.messages.add_write(
                item.connector, remote_id, item.room_id, payload["event_id"]
            )
        )
        return notes

    async def _redact(
        self, item: OutboxItem, connector: Connector, conversation: str, writes: list[Write]
    ) -> list[str] | None:
        payload = item.payload
        refs = await self.stores.messages.remotes_for(
            item.connector, payload["target_event"], room_id=item.room_id
        )
        if not refs:
            return None  # it never reached this vendor
        sender = Member.from_json(payload["sender"]).as_sender()
        caps = connector.capabilities
        notes: list[str] = []
        removed = gone = 0
        for ref in refs:
            reaction = op.parse_reaction_ref(ref)
            if reaction is not None:
                if caps.reactions:
                    found = await connector.remove_reaction(
                        conversation, reaction[0], reaction[1], sender
                    )
                    removed, gone = removed + (found is not False), gone + (found is False)
            elif caps.deletions:
                found = await connector.delete_message(conversation, ref, sender)
                removed, gone = removed + (found is not False), gone + (found is False)
            else:
                notes.append(f"{item.connector} cannot delete messages: its users were told")
                remote_id = await connector.send_message(
                    conversation,
                    OutboundMessage(
                        request_id=f"{payload['event_id']}:{ref}",
                        sender=sender,
                        text=f"🗑 {sender.display_name} deleted a message.",
                        timestamp=_when(payload.get("ts")),
                        reply_to=ref if caps.replies else None,
                    ),
                )
                writes.append(
                    self.stores.messages.add_write(
                        item.connector, remote_id, item.room_id, payload["event_id"]
                    )
                )
        if gone and not removed and not writes:
            raise NotThere("vendor_404")  # nothing left there to delete: not "delivered"
        return notes

    async def _add_reaction(
        self, item: OutboxItem, connector: Connector, conversation: str, writes: list[Write]
    ) -> list[str] | None:
        payload = item.payload
        target = await self._message_ref(item.connector, payload["target_event"], item.room_id)
        if target is None:
            return None
        sender = Member.from_json(payload["sender"]).as_sender()
        caps = connector.capabilities
        if caps.reactions:
            reaction_id = await connector.add_reaction(
                conversation, target, sender, payload["key"], payload["event_id"]
            )
            writes.append(
                self.stores.messages.add_write(
                    item.connector,
                    op.reaction_ref(target, reaction_id),
                    item.room_id,
                    payload["event_id"],
                )
            )
            return []
        remote_id = await connector.send_message(
            conversation,
            OutboundMessage(
                request_id=payload["event_id"],
                sender=sender,
                text=f"{sender.display_name} reacted {payload['key']}",
                timestamp=_when(payload.get("ts")),
                message_kind="notice",
                reply_to=target if caps.replies else None,
            ),
        )
        writes.append(
            self.stores.messages.add_write(
                item.connector, remote_id, item.room_id, payload["event_id"]
            )
        )
        return [f"{item.connector} has no reactions: sent as a short message"]

    async def _mark_read(
        self, item: OutboxItem, connector: Connector, conversation: str, writes: list[Write]
    ) -> list[str] | None:
        target = await self._message_ref(item.connector, item.payload["event_id"], item.room_id)
        if target is not None and connector.capabilities.read_receipts:
            reader = Member.from_json(item.payload["sender"]).as_sender()
            await connector.mark_read(conversation, reader, target)
            return []  # marked (read markers get no send status: see ``_report``)
        return None


def _when(ts: Any) -> datetime:
    return datetime.fromtimestamp((ts or 0) / 1000, tz=UTC)


def _unfetchable(error: MediaError, tries: int) -> str:
    """Why a file's message fails, for its sender (in French)."""
    if error.retriable:
        answered = f", réponse {error.status}" if error.status else ""
        return (
            f"le fichier n'a pas pu être récupéré par le serveur Matrix après {tries} essais "
            f"(serveur d'origine injoignable ou refusé{answered}) : ce message n'est pas "
            "transmis, la conversation continue"
        )
    if error.status is None:
        return "l'adresse du fichier n'est pas valide : ce message n'est pas transmis"
    if error.status == 404:
        return "le fichier est introuvable sur le serveur Matrix : ce message n'est pas transmis"
    return (
        f"le serveur Matrix refuse de fournir le fichier (réponse {error.status}) : "
        "ce message n'est pas transmis"
    )


def _describe(error: Exception) -> str:
    if isinstance(error, ConnectorError | MediaError):
        return str(error)[:300]
    return type(error).__name__
