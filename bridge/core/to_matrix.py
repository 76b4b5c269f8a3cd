"""Vendors -> Matrix: a vendor event becomes what its sender's ghost does in the portal room.

Every send uses a transaction id derived from the vendor event, so a retry after a crash cannot
duplicate it, and the message map is checked first, so a redelivered event changes nothing.

What a ghost sends is also relayed at once to the room's other connectors (``relay``, the same
routing as for any room event): the vendors need not wait for the homeserver to push the event
back, and a push the homeserver loses or delays (it happens around restarts) loses nothing. When
the push does arrive, its deliveries are already queued under the same keys and it adds nothing.

Who is in a conversation and what it is called (people added or removed, a member leaving, a
title or topic) are ``vendor_changes.py``'s; a new portal's earlier messages, ``backfill.py``'s.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from mautrix.api import Method, Path
from mautrix.errors import MatrixRequestError
from mautrix.types import EventID, RoomID

from bridge.config import BackfillConfig, MediaConfig
from bridge.core import filetypes
from bridge.core import operations as op
from bridge.core.audit_trail import Trail
from bridge.core.backfill import Backfill
from bridge.core.degradation import safe_filename
from bridge.core.errors import NotInDirectory, PermanentFailure
from bridge.core.portals import Portals
from bridge.core.send_status import StatusReporter, report_to_vendor
from bridge.core.vendor_changes import VENDOR_CHANGES, VendorChanges
from bridge.crypto.attachments import Encryptor, encrypt_stream
from bridge.crypto.machine import Crypto
from bridge.db.group_commit import Write
from bridge.db.stores import Stores
from bridge.formatting import worker
from bridge.formatting.convert import markdown_to_html, plain_to_html
from bridge.formatting.mentions import mentions_to_pills
from bridge.i18n import N_, _
from bridge.matrix.homeserver import Homeserver, derived_txn_id
from bridge.matrix.media import MediaError, MediaRepository
from connectors.base import (
    AttachmentSource,
    Capabilities,
    Connector,
    ConversationCreated,
    ConversationRenamed,
    DeliveryReport,
    Mention,
    MessageDeleted,
    MessageEdited,
    MessageReceived,
    ReactionAdded,
    ReactionRemoved,
    ReadUpTo,
    RemoteAttachment,
    RemoteEvent,
    TopicChanged,
    TypingChanged,
)

log = logging.getLogger("eimis.to_matrix")

SOURCE_KEY = "eu.eimis.source"
"""Marks a ghost's message with the vendor message it carries (``<connector>:<message id>``)."""
KIND_MSGTYPES = {"text": "m.text", "notice": "m.notice", "emote": "m.emote"}
TYPING_TIMEOUT_MS = 30_000

# What a vendor user is told (their vendor's delivery status) when the bridge refuses an event
# (translated where it is told: ``_(EDIT_NOT_AUTHOR)``).
EDIT_NOT_AUTHOR = N_("Edit refused: only a message's author can edit it.")
DELETE_NOT_AUTHOR = N_(
    "Deletion refused: this message was written outside this service, only its author can "
    "delete it."
)
NOT_IN_DIRECTORY = N_(
    "Message not delivered: the sender is not listed in the national directory of health "
    "professionals used by the EIMIS gateway."
)
NOT_BRIDGED = N_("Message not delivered: this conversation is not relayed outside this service.")

Relay = Callable[[dict[str, Any]], Awaitable[list[Write]]]
"""Routes a room event to the vendors: ``FromMatrix.handle``."""


class ToMatrix:
    def __init__(
        self,
        stores: Stores,
        homeserver: Homeserver,
        portals: Portals,
        media: MediaRepository,
        media_config: MediaConfig,
        status: StatusReporter,
        outbox_notify: Any,
        relay: Relay,
        success_statuses: bool = False,
        trail: Trail | None = None,
        crypto: Crypto | None = None,
        backfill: BackfillConfig | None = None,
    ) -> None:
        """``backfill``: how much history a new portal gets (``portal.backfill``)."""
        self.stores = stores
        self.hs = homeserver
        self.crypto = crypto
        """End-to-bridge encryption, when enabled (our own earlier sends decrypt)."""
        self.portals = portals
        self.media = media
        self.media_config = media_config
        self.status = status
        self._outbox_notify = outbox_notify
        self._relay = relay
        self.success_statuses = success_statuses
        self.trail = trail or Trail(stores.audit)
        """What each event sent into Matrix (or refused) leaves in the audit log."""
        self.changes = VendorChanges(
            stores, homeserver, portals, status, self.trail, self._ghost, self._relayed
        )
        """Who is in a conversation, and its title and topic, as its vendor changes them."""
        self.backfill = Backfill(
            stores,
            portals,
            self.trail,
            backfill or BackfillConfig(),
            put=self._backfilled,
            outsiders=self._outsiders,
            outbox_notify=outbox_notify,
        )
        """A new portal's earlier messages (from a vendor that can read them)."""

    async def handle(
        self,
        connector_id: str,
        event: RemoteEvent,
        *,
        retrying: bool = False,
        recovered: bool = True,
    ) -> list[Write]:
        """Do what the event says in its room; return the writes that record it.

        A vendor user the directory must list and does not (``NotInDirectory``) is refused: the
        vendor is told, the operator reads it in the log and the audit trail.
        """
        try:
            return await self._handle(connector_id, event, retrying=retrying, recovered=recovered)
        except NotInDirectory:
            return await self._not_in_directory(connector_id, event)

    async def _handle(
        self,
        connector_id: str,
        event: RemoteEvent,
        *,
        retrying: bool = False,
        recovered: bool = True,
    ) -> list[Write]:
        """``handle``, without the identity refusal.

        ``retrying``: this event failed before, so a send may have happened unseen.
        ``recovered``: it may have been processed before (it was stored before this run began,
        or failed once): the message map is checked first. A fresh message skips that read (the
        inbox already refused a second copy of the vendor event).
        """
        connector = self.portals.connectors.get(connector_id)
        if connector is None:
            raise PermanentFailure(f"connector {connector_id!r} is not running")
        if isinstance(event, ConversationCreated):
            known = await self.stores.portals.by_conversation(connector_id, event.conversation_id)
            await self.portals.open_from_remote(connector_id, event)
            self._outbox_notify()
            room = await self.stores.portals.by_conversation(connector_id, event.conversation_id)
            if room is not None and (known is None or recovered):
                # Before any newer message of the conversation (this lane is ordered); again
                # after a crash midway (what was put in already is skipped).
                await self.backfill.run(
                    connector,
                    connector_id,
                    room,
                    event.conversation_id,
                    rerun=known is not None,
                    members={self.portals.ids.mxid(connector_id, m) for m in event.members},
                )
            if known is not None:
                return []  # opened before: its audit row exists
            return [self.trail.to_matrix(connector_id, event, room, "sent")]
        room_id = await self.stores.portals.by_conversation(connector_id, event.conversation_id)
        if room_id is None:
            if isinstance(event, MessageReceived):
                await self._tell_vendor(connector_id, event.conversation_id, event, _(NOT_BRIDGED))
            raise PermanentFailure(
                f"{connector_id} conversation {event.conversation_id} is not bridged to a room"
            )
        if isinstance(
            event,
            MessageReceived | MessageEdited | ReactionAdded | ConversationRenamed | TopicChanged,
        ):
            outsiders = await self._outsiders(room_id)
            if outsiders:
                return await self._kept_inside(connector_id, room_id, event, outsiders)
        if isinstance(event, MessageReceived):
            # A message the backfill may have put in already is looked up first.
            recovered = recovered or self.backfill.filled(room_id)
            return await self._message(connector, connector_id, room_id, event, retrying, recovered)
        if isinstance(event, VENDOR_CHANGES):
            return await self.changes.handle(connector_id, room_id, event)
        if isinstance(event, MessageEdited):
            return await self._edit(connector, connector_id, room_id, event)
        if isinstance(event, MessageDeleted):
            return await self._delete(connector_id, room_id, event)
        if isinstance(event, ReactionAdded):
            return await self._reaction(connector_id, room_id, event)
        if isinstance(event, ReactionRemoved):
            return await self._unreact(connector_id, room_id, event)
        if isinstance(event, ReadUpTo):
            return await self._read(connector_id, room_id, event)
        if isinstance(event, TypingChanged):
            await self._typing(connector_id, room_id, event)
        return []

    async def _ghost(self, connector_id: str, idnps: Any, room_id: str) -> str:
        ghost = await self.portals.ghost(connector_id, idnps)
        await self.portals.ensure_joined(room_id, ghost.mxid)
        return ghost.mxid

    async def _relayed(
        self,
        room_id: str,
        sender: str,
        event_id: str,
        event_type: str,
        content: dict[str, Any],
        ts_ms: int | None = None,
        **extra: Any,
    ) -> list[Write]:
        """The deliveries of an event a ghost just sent, for the room's other connectors."""
        return await self._relay(
            {
                "type": event_type,
                "room_id": room_id,
                "sender": sender,
                "event_id": event_id,
                "content": content,
                "origin_server_ts": ts_ms or int(datetime.now(UTC).timestamp() * 1000),
                **extra,
            }
        )

    # Messages ----------------------------------------------------------------------------------

    async def _message(
        self,
        connector: Connector,
        connector_id: str,
        room_id: str,
        event: MessageReceived,
        retrying: bool = False,
        recovered: bool = True,
    ) -> list[Write]:
        if recovered and await self.stores.messages.event_for(
            connector_id, event.message_id, room_id=room_id
        ):
            return []
        sender = await self._ghost(connector_id, event.sender, room_id)
        relates: dict[str, Any] = {}
        if event.reply_to:
            target = await self.stores.messages.event_for(
                connector_id, event.reply_to, room_id=room_id
            )
            if target:
                relates = {"m.relates_to": {"m.in_reply_to": {"event_id": target}}}
        if event.attachment is not None:
            content, refusal = await self._file(connector, connector_id, room_id, sender, event)
            if content is None:
                return [
                    self.trail.to_matrix(connector_id, event, room_id, "refused", detail=refusal)
                ]
        elif event.location is not None:
            place = event.location
            label = place.description or "Location"
            content = {
                "msgtype": "m.location",
                "body": label,
                "geo_uri": f"geo:{place.latitude},{place.longitude}",
            }
        else:
            content = await self._text_content(
                connector.capabilities, connector_id, event.text, event.mentions
            )
            content["msgtype"] = KIND_MSGTYPES.get(event.message_kind, "m.text")
        content.update(relates)
        source = f"{connector_id}:{event.message_id}"
        content[SOURCE_KEY] = source
        sent = await self._already_sent(sender, room_id, source) if retrying else None
        ts_ms = _ms(event.timestamp)
        event_id = sent or await self.hs.send_message(
            sender,
            room_id,
            content,
            txn_id=derived_txn_id(connector_id, "message", event.message_id),
            ts_ms=ts_ms,
        )
        writes = [
            self.stores.messages.add_write(connector_id, event.message_id, room_id, event_id),
            self.trail.to_matrix(connector_id, event, room_id, "sent", event_id=event_id),
        ]
        writes += await self._relayed(room_id, sender, event_id, "m.room.message", content, ts_ms)
        if self.success_statuses:
            await self.status.vendor_report(
                connector_id,
                room_id,
                event_id,
                DeliveryReport("delivered", _("delivered to Matrix")),
            )
        if event.text and event.attachment is not None:
            # A caption travels as its own message after the file.
            caption = await self._text_content(
                connector.capabilities, connector_id, event.text, event.mentions
            )
            caption["msgtype"] = "m.text"
            caption[SOURCE_KEY] = f"{source}#caption"
            caption_sent = (
                await self._already_sent(sender, room_id, caption[SOURCE_KEY]) if retrying else None
            )
            caption_id = caption_sent or await self.hs.send_message(
                sender,
                room_id,
                caption,
                txn_id=derived_txn_id(connector_id, "caption", event.message_id),
                ts_ms=ts_ms,
            )
            writes += await self._relayed(
                room_id, sender, caption_id, "m.room.message", caption, ts_ms
            )
        return writes

    async def _backfilled(
        self,
        connector: Connector,
        connector_id: str,
        room_id: str,
        event: MessageReceived,
        rerun: bool,
    ) -> list[Write]:
        """An earlier message, put in as a live one (``Backfill``); already there: nothing."""
        return await self._message(
            connector, connector_id, room_id, event, retrying=rerun, recovered=True
        )

    async def _already_sent(self, sender: str, room_id: str, source: str) -> str | None:
        """The event a previous attempt sent for this vendor message, if it did.

        The derived transaction id protects a resend only while the homeserver remembers it
        (Synapse keeps appservice transaction ids in memory: a restart forgets them), so a retry
        first looks for its own earlier event among the room's latest ones.
        """
        page = await self.hs.timeline_page(sender, room_id, None, 100)
        for event in page.get("chunk") or ():
            if not isinstance(event, dict) or event.get("sender") != sender:
                continue
            if event.get("type") == "m.room.encrypted" and self.crypto is not None:
                # Our own sessions are kept readable: what an earlier attempt sent decrypts.
                with contextlib.suppress(Exception):
                    event = await self.crypto.decrypt(event)
            content = event.get("content")
            if isinstance(content, dict) and content.get(SOURCE_KEY) == source:
                return str(event.get("event_id"))
        return None

    async def _text_content(
        self, caps: Capabilities, connector_id: str, text: str, mentions: tuple[Mention, ...]
    ) -> dict[str, Any]:
        convert = markdown_to_html if caps.formatting == "markdown" else plain_to_html
        # Large text is converted off the event loop, bounded in time and memory.
        html = await worker.bounded(
            convert, text, size=len(text), fallback=lambda: plain_to_html(text)
        )
        pills = []
        for mention in mentions:
            mxid = await self._mention_mxid(connector_id, mention)
            if mxid:
                pills.append((mention.display_name, mxid))
        if pills:
            html = mentions_to_pills(html, pills)
        content: dict[str, Any] = {"body": text}
        if html.strip() != plain_to_html(text).strip() or caps.formatting == "markdown":
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = html
        content["m.mentions"] = {"user_ids": [mxid for _text, mxid in pills]} if pills else {}
        return content

    async def _mention_mxid(self, connector_id: str, mention: Mention) -> str | None:
        if mention.mxid:
            return mention.mxid
        if mention.idnps is None:
            return None
        try:
            return (await self.portals.ghost(connector_id, mention.idnps)).mxid
        except PermanentFailure:
            found = await self.portals.find_professional(mention.idnps, exclude=connector_id)
            return found.mxid if found else None

    async def _file(
        self,
        connector: Connector,
        connector_id: str,
        room_id: str,
        sender: str,
        event: MessageReceived,
    ) -> tuple[dict[str, Any] | None, str | None]:
        """Stream the vendor's file into the media repository: (its message content, None), or
        (None, the refusal's class) when refused (reported to the sender and the room)."""
        attachment = event.attachment
        assert attachment is not None
        mime = attachment.mime_type.lower()
        name = safe_filename(attachment.name)
        refused = file_refusal(connector, attachment, self.media_config)
        refusal, why = refused if refused else (None, None)
        encryptor = Encryptor() if await self._encrypted(room_id) else None
        if refusal is None:
            try:
                stream = await connector.open_attachment(attachment)
                max_size = self.media_config.max_file_size
                async with stream as chunks:
                    # Its type is read from its first bytes, not taken from the vendor's word.
                    allows = self.media_config.allows
                    head, data = await filetypes.peek(_bounded(chunks, max_size))
                    verdict = filetypes.judge(mime, await filetypes.content_type(head), allows)
                    if verdict.refused:
                        raise _WrongType(filetypes.refusal(mime, verdict.real, allows, "Matrix"))
                    mime = verdict.mime_type
                    mxc = await self.media.upload(
                        # Encrypted room: the homeserver gets ciphertext, no name, no type.
                        data if encryptor is None else encrypt_stream(data, encryptor),
                        user_id=sender,
                        mime_type=mime if encryptor is None else "application/octet-stream",
                        filename=name if encryptor is None else None,
                        size=attachment.size,
                    )
            except _TooLarge:
                refusal, why = _("the file is larger than this space accepts"), "too_large"
            except _WrongType as wrong:
                refusal, why = str(wrong), "type_mismatch"
            except MediaError as error:
                if error.retriable:
                    raise
                # (the homeserver's own words, in English, follow the sentence)
                refusal = _("the Matrix server did not take the file ({detail})").format(
                    detail=error
                )
                why = "media"
        if refusal is not None:
            await self._refused(connector_id, room_id, event, refusal)
            return None, why
        msgtype = _file_msgtype(mime)
        info: dict[str, Any] = {"mimetype": mime}
        if attachment.size is not None:
            info["size"] = attachment.size
        content = {"msgtype": msgtype, "body": name, "filename": name, "info": info}
        if encryptor is None:
            content["url"] = mxc
        else:
            content["file"] = encryptor.file(mxc)
        return content, None

    async def _encrypted(self, room_id: str) -> bool:
        return self.crypto is not None and await self.crypto.encryption_of(room_id) is not None

    async def _outsiders(self, room_id: str) -> list[str]:
        portal = await self.stores.portals.get(room_id)
        if portal is None:
            return []
        return await self.portals.outsiders(room_id, portal.voice)

    async def _kept_inside(
        self,
        connector_id: str,
        room_id: str,
        event: MessageReceived | MessageEdited | ReactionAdded | ConversationRenamed | TopicChanged,
        outsiders: list[str],
    ) -> list[Write]:
        """Members of servers outside the trust space are in the room: nothing goes in."""
        reason = _(
            "the conversation includes members of servers outside the EIMIS trust space ({servers})"
        ).format(servers=", ".join(outsiders))
        log.warning(
            "A %s %s was not sent to %s: members of %s are in it",
            connector_id,
            type(event).__name__,
            room_id,
            ", ".join(outsiders),
        )
        if isinstance(event, MessageReceived):
            await self._refused(connector_id, room_id, event, reason, what="message")
        return [
            self.trail.to_matrix(
                connector_id, event, room_id, "refused", detail="untrusted_members"
            )
        ]

    async def _refused(
        self,
        connector_id: str,
        room_id: str,
        event: MessageReceived,
        reason: str,
        *,
        what: str = "file",
    ) -> None:
        """Tell the vendor sender, and the room, that a file (or a message) did not cross."""
        log.info("A %s %s was refused", connector_id, what)
        link = await self.stores.portals.link(room_id, connector_id)
        if link and link.conversation_id:
            await self._tell_vendor(connector_id, link.conversation_id, event, reason)
        ghost = await self.portals.ghost(connector_id, event.sender)
        # The sender's vendor was told above; the others' users read it as a system message.
        if what == "file":
            text = _("{name} sent a file that could not be passed on: {reason}.")
        else:
            text = _("{name} sent a message that could not be passed on: {reason}.")
        await self.status.tell_everyone(
            room_id,
            text.format(name=ghost.display_name, reason=reason),
            txn_id=derived_txn_id(connector_id, "refused", event.message_id),
            exclude=(connector_id,),
        )

    async def _edit(
        self, connector: Connector, connector_id: str, room_id: str, event: MessageEdited
    ) -> list[Write]:
        target = await self.stores.messages.event_for(
            connector_id, event.message_id, room_id=room_id
        )
        if target is None:
            raise PermanentFailure("the edited message was never bridged")
        author = await self._author(room_id, target)
        if author != self.portals.ids.mxid(connector_id, event.sender):
            # Only a message's author edits it (as Matrix clients show edits): not another
            # user of this vendor, nor anyone outside it.
            return await self._not_theirs(connector_id, room_id, event, _(EDIT_NOT_AUTHOR))
        sender = await self._ghost(connector_id, event.sender, room_id)
        new = await self._text_content(
            connector.capabilities, connector_id, event.text, event.mentions
        )
        new["msgtype"] = "m.text"
        content = {
            **{k: v for k, v in new.items() if k != "m.mentions"},
            "body": f"* {new['body']}",
            "m.new_content": new,
            "m.relates_to": {"rel_type": "m.replace", "event_id": target},
        }
        if "formatted_body" in new:
            content["formatted_body"] = f"* {new['formatted_body']}"
        ts_ms = _ms(event.timestamp)
        event_id = await self.hs.send_message(
            sender,
            room_id,
            content,
            txn_id=derived_txn_id(connector_id, "edit", event.event_id),
            ts_ms=ts_ms,
        )
        audit = self.trail.to_matrix(connector_id, event, room_id, "sent", event_id=event_id)
        return [
            audit,
            *await self._relayed(room_id, sender, event_id, "m.room.message", content, ts_ms),
        ]

    async def _delete(self, connector_id: str, room_id: str, event: MessageDeleted) -> list[Write]:
        target = await self.stores.messages.event_for(
            connector_id, event.message_id, room_id=room_id
        )
        if target is None:
            return []  # never bridged: nothing to remove
        author = await self._author(room_id, target)
        ref = self.portals.ids.parse(author) if author else None
        if ref is None or ref.connector != connector_id:
            # A vendor deletes only what its own users wrote (a moderator of the vendor may
            # delete another of its users' messages: below, the bot does it).
            return await self._not_theirs(connector_id, room_id, event, _(DELETE_NOT_AUTHOR))
        sender = await self._ghost(connector_id, event.sender, room_id)
        txn_id = derived_txn_id(connector_id, "delete", event.message_id)
        try:
            event_id = await self.hs.redact(sender, room_id, target, txn_id=txn_id)
        except MatrixRequestError as error:
            if error.http_status != 403:
                raise
            # Someone else's message (e.g. a moderator action on the vendor side): the bot can.
            sender = self.hs.config.bot_mxid
            event_id = await self.hs.redact(sender, room_id, target, txn_id=txn_id)
        audit = self.trail.to_matrix(connector_id, event, room_id, "sent", event_id=str(event_id))
        return [audit, *await self._redacted(room_id, sender, str(event_id), target)]

    async def _author(self, room_id: str, event_id: str) -> str | None:
        """Who sent a room event (its ``sender`` is clear even when its content is encrypted),
        as the portal's voice sees it; None when the homeserver does not show it."""
        portal = await self.stores.portals.get(room_id)
        viewer = portal.voice if portal is not None else self.hs.config.bot_mxid
        try:
            answer = await self.hs.intent(viewer).api.request(
                Method.GET, Path.v3.rooms[RoomID(room_id)].event[EventID(event_id)]
            )
        except MatrixRequestError as error:
            if error.http_status in (403, 404):
                return None
            raise
        sender = answer.get("sender") if isinstance(answer, dict) else None
        return sender if isinstance(sender, str) else None

    async def _not_theirs(
        self,
        connector_id: str,
        room_id: str,
        event: MessageEdited | MessageDeleted | ReactionRemoved,
        reason: str | None,
    ) -> list[Write]:
        """A vendor edited or deleted a message (or reaction) its user did not write: nothing
        changes on Matrix; the vendor is told (``reason``, on the message), the operator reads it
        in the log and the audit trail."""
        log.warning(
            "A %s %s in %s was refused: not written by that user of %s",
            connector_id,
            type(event).__name__,
            room_id,
            connector_id,
        )
        if reason is not None and not isinstance(event, ReactionRemoved):
            await self._tell_vendor(connector_id, event.conversation_id, event, reason)
        return [self.trail.to_matrix(connector_id, event, room_id, "refused", detail="not_author")]

    async def _not_in_directory(self, connector_id: str, event: RemoteEvent) -> list[Write]:
        room_id = await self.stores.portals.by_conversation(connector_id, event.conversation_id)
        log.warning(
            "A %s %s was refused: its user is not in the imported directory "
            "(identity.require_directory_entry)",
            connector_id,
            type(event).__name__,
        )
        if isinstance(event, MessageReceived | MessageEdited):
            await self._tell_vendor(connector_id, event.conversation_id, event, _(NOT_IN_DIRECTORY))
        return [
            self.trail.to_matrix(connector_id, event, room_id, "refused", detail="not_in_directory")
        ]

    async def _tell_vendor(
        self,
        connector_id: str,
        conversation_id: str,
        event: MessageReceived | MessageEdited | MessageDeleted,
        reason: str,
    ) -> None:
        """A failed delivery status on the vendor message the refused event is about (when the
        vendor shows statuses); a vendor that refuses the report is logged, never retried."""
        await report_to_vendor(
            self.portals.connectors.get(connector_id),
            connector_id,
            conversation_id,
            event.message_id,
            DeliveryReport("failed", reason),
        )

    async def _redacted(self, room_id: str, sender: str, event_id: str, target: str) -> list[Write]:
        content = {"redacts": target}
        return await self._relayed(
            room_id, sender, event_id, "m.room.redaction", content, redacts=target
        )

    async def _reaction(self, connector_id: str, room_id: str, event: ReactionAdded) -> list[Write]:
        ref = op.reaction_ref(event.message_id, event.reaction_id)
        if await self.stores.messages.event_for(connector_id, ref, room_id=room_id):
            return []
        target = await self.stores.messages.event_for(
            connector_id, event.message_id, room_id=room_id
        )
        if target is None:
            raise PermanentFailure("the message reacted to was never bridged")
        sender = await self._ghost(connector_id, event.sender, room_id)
        content = {
            "m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": event.key}
        }
        event_id = await self.hs.send_event(
            sender,
            room_id,
            "m.reaction",
            content,
            txn_id=derived_txn_id(connector_id, "reaction", event.reaction_id),
        )
        writes = [
            self.stores.messages.add_write(connector_id, ref, room_id, str(event_id)),
            self.trail.to_matrix(connector_id, event, room_id, "sent", event_id=str(event_id)),
        ]
        return writes + await self._relayed(room_id, sender, str(event_id), "m.reaction", content)

    async def _unreact(
        self, connector_id: str, room_id: str, event: ReactionRemoved
    ) -> list[Write]:
        ref = op.reaction_ref(event.message_id, event.reaction_id)
        target = await self.stores.messages.event_for(connector_id, ref, room_id=room_id)
        if target is None:
            return []
        if await self._author(room_id, target) != self.portals.ids.mxid(connector_id, event.sender):
            # Someone else's reaction (a Matrix user's reaction delivered to this vendor): a
            # ghost the room gave power to could otherwise remove it.
            return await self._not_theirs(connector_id, room_id, event, None)
        sender = await self._ghost(connector_id, event.sender, room_id)
        txn_id = derived_txn_id(connector_id, "unreact", event.reaction_id)
        event_id = await self.hs.redact(sender, room_id, target, txn_id=txn_id)
        audit = self.trail.to_matrix(connector_id, event, room_id, "sent", event_id=str(event_id))
        return [audit, *await self._redacted(room_id, sender, str(event_id), target)]

    async def _read(self, connector_id: str, room_id: str, event: ReadUpTo) -> list[Write]:
        target = await self.stores.messages.event_for(
            connector_id, event.message_id, room_id=room_id
        )
        if target is None:
            return []  # a message the bridge never carried: no Matrix event to mark
        sender = await self._ghost(connector_id, event.sender, room_id)
        await self.hs.intent(sender).send_receipt(RoomID(room_id), EventID(target))
        return [self.trail.to_matrix(connector_id, event, room_id, "sent", event_id=target)]

    async def _typing(self, connector_id: str, room_id: str, event: TypingChanged) -> None:
        age_ms = (datetime.now(UTC) - event.timestamp).total_seconds() * 1000
        if event.typing and age_ms > TYPING_TIMEOUT_MS:
            return  # stale (e.g. replayed after an outage): typing is a live signal only
        sender = await self._ghost(connector_id, event.sender, room_id)
        await self.hs.intent(sender).set_typing(
            RoomID(room_id), timeout=TYPING_TIMEOUT_MS if event.typing else 0
        )


class _TooLarge(Exception):
    pass


class _WrongType(Exception):
    """The file's content contradicts its declared type, and its real type is not allowed."""


async def _bounded(chunks: Any, limit: int) -> Any:
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise _TooLarge()
        yield chunk


def _file_msgtype(mime: str) -> str:
    major = mime.split("/", 1)[0]
    return {"image": "m.image", "audio": "m.audio", "video": "m.video"}.get(major, "m.file")


def _ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def file_refusal(
    connector: Connector, attachment: RemoteAttachment, media: MediaConfig
) -> tuple[str, str] | None:
    """Why a vendor's file cannot enter this space (a sentence for its sender, the refusal's
    class), or None when it may."""
    mime = attachment.mime_type.lower()
    if not isinstance(connector, AttachmentSource):
        # A connector that emits a file must be able to fetch it (its contract says so).
        return _("this vendor's connector cannot fetch its files"), "no_attachment_source"
    if not media.allows(mime):
        return _("files of type {mime} are not allowed in this space").format(
            mime=mime
        ), "type_not_allowed"
    if attachment.size is not None and attachment.size > media.max_file_size:
        return (
            _("the file is larger than this space accepts ({size} MiB)").format(
                size=media.max_file_size // (1024 * 1024)
            ),
            "too_large",
        )
    return None
