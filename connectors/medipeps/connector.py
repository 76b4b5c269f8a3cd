"""The Medipeps connector: REST calls out, a polled event feed in."""

from __future__ import annotations

import asyncio
import base64
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, SecretStr

from connectors.base import (
    AttachmentSource,
    Capabilities,
    Connector,
    ConnectorContext,
    ConnectorError,
    DeletionHandling,
    DeliveryReport,
    DeliveryStatusHandling,
    FileLimit,
    HistorySource,
    Idnps,
    MessageReceived,
    NewConversation,
    OutboundAttachment,
    OutboundMessage,
    ParticipantAdding,
    ParticipantChange,
    ReadReceiptHandling,
    RemoteAttachment,
    RemoteEvent,
    RemoteUser,
    Sender,
    TitleHandling,
    UserListing,
    UserPage,
)
from connectors.kit import listing
from connectors.kit.backoff import Backoff
from connectors.kit.feed import Page, PolledFeed
from connectors.kit.ids import InvalidRemoteId, check_event_ids
from connectors.medipeps import convert
from connectors.medipeps.client import MedipepsClient
from connectors.payload import InvalidPayload

CURSOR_KEY = "cursor"
MAX_FILE_SIZE = 1024 * 1024
"""Medipeps' inline file limit (1 MiB decoded)."""
FILE_MIME_TYPES = frozenset({"image/jpeg", "image/png", "application/pdf"})
HISTORY_PAGE_SIZE = 500
"""Messages asked per page of a conversation's own feed (Medipeps' largest page)."""
_DECODE_STEP = 4 * 16 * 1024
"""Base64 characters decoded at a time when streaming an inline file (48 KiB of bytes)."""


class InvalidStoredCursor(Exception):
    """The cursor in the store is not a non-negative integer (the poller keeps retrying)."""


class MedipepsSettings(BaseModel):
    """The ``settings`` block of a Medipeps connector."""

    model_config = ConfigDict(extra="forbid")

    api_url: HttpUrl | str
    api_key: SecretStr
    poll_interval_s: float = Field(default=1.0, gt=0)
    page_size: int = Field(default=100, ge=1, le=500)


class MedipepsConnector(
    Connector,
    AttachmentSource,
    DeletionHandling,
    ReadReceiptHandling,
    DeliveryStatusHandling,
    ParticipantAdding,
    TitleHandling,
    HistorySource,
    UserListing,
):
    """A Medipeps-style vendor: API key, plain text, an event feed the connector polls.

    Deletions, read receipts, delivery reports, adding people (and guests leaving), subjects
    (titles), history and the user listing; no edits, reactions, typing, topics, nor removing a
    Medipeps user (nobody but that user can) (the ``capabilities`` flags follow from the classes
    above)."""

    type_name: ClassVar[str] = "medipeps"
    Settings: ClassVar[type[BaseModel]] = MedipepsSettings
    capabilities: ClassVar[Capabilities] = Capabilities(
        formatting="plain",
        max_text_length=4000,
        long_text="split",
        files={
            "m.image": FileLimit(MAX_FILE_SIZE, frozenset({"image/jpeg", "image/png"})),
            "m.file": FileLimit(
                MAX_FILE_SIZE, frozenset({"application/pdf", "image/jpeg", "image/png"})
            ),
        },
        replies=True,
    )

    backoff_initial_s: float = 1.0
    """First wait after a failed poll; doubles per consecutive failure up to ``backoff_max_s``."""
    backoff_max_s: float = 60.0

    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.settings = _settings(ctx.settings)
        self.client = MedipepsClient(str(self.settings.api_url), self.settings.api_key)
        self._poller: asyncio.Task[None] | None = None

    # Lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start polling the feed from the stored cursor."""
        if self._poller is None or self._poller.done():
            feed = PolledFeed(
                name=f"medipeps {self.ctx.connector_id}",
                read=self._read_page,
                emit=self.ctx.emit_many,
                store=self.ctx.store,
                interval_s=self.settings.poll_interval_s,
                backoff=Backoff(self.backoff_initial_s, self.backoff_max_s),
                log=self.log,
                describe=_reason,
                cursor_key=CURSOR_KEY,
                start="0",
            )
            self._poller = asyncio.create_task(
                feed.run(), name=f"medipeps-poll-{self.ctx.connector_id}"
            )

    async def stop(self) -> None:
        """Cancel the poller (mid-page is safe: the cursor only moves after a whole page)."""
        task, self._poller = self._poller, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        await self.client.close()

    @property
    def polling(self) -> bool:
        return self._poller is not None and not self._poller.done()

    # Bridge -> vendor -----------------------------------------------------------------------------

    async def create_conversation(self, conversation: NewConversation) -> str:
        conv = await self.client.create_conversation(convert.conversation_body(conversation))
        return str(conv)

    async def send_message(self, conversation_id: str, message: OutboundMessage) -> str:
        """Post the message (plain text; a file travels inline, base64-encoded)."""
        conv = _conv(conversation_id)
        attachment = None
        if message.attachment is not None:
            attachment = await _inline_attachment(message.attachment)
        try:
            body = convert.message_body(message, attachment)
        except ValueError as exc:
            raise ConnectorError(f"Medipeps: {exc}", retriable=False) from exc
        msg = await self.client.post_message(conv, body)
        return str(msg)

    async def open_attachment(
        self, attachment: RemoteAttachment
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream an inline file a Medipeps user sent: its base64 data, decoded chunk by chunk."""
        try:
            data = convert.inline_data(attachment.source)
        except ValueError as exc:
            raise ConnectorError(f"Medipeps: {exc}", retriable=False) from exc
        return _decoded(data)

    async def delete_message(self, conversation_id: str, message_id: str, sender: Sender) -> bool:
        del sender  # Medipeps deletes by message id
        return await self.client.delete_message(_conv(conversation_id), _msg(message_id))

    async def mark_read(self, conversation_id: str, reader: Sender, message_id: str) -> None:
        body = {"reader_ref": reader.ref, "up_to": _msg(message_id)}
        await self.client.mark_read(_conv(conversation_id), body)

    async def report_delivery(
        self, conversation_id: str, message_id: str, report: DeliveryReport
    ) -> None:
        body = {"status": report.status, "detail": report.detail}
        await self.client.report_status(_conv(conversation_id), _msg(message_id), body)

    async def add_participants(self, conversation_id: str, change: ParticipantChange) -> None:
        await self.client.add_participants(
            _conv(conversation_id), convert.participants_body(change)
        )

    async def remove_external(self, conversation_id: str, change: ParticipantChange) -> None:
        """Guests leave (``POST .../guests/leave``); a Medipeps user cannot be removed."""
        if not change.external:
            return
        await self.client.guests_leave(_conv(conversation_id), convert.guests_leave_body(change))

    async def set_title(self, conversation_id: str, title: str | None, by: Sender) -> None:
        await self.client.update_conversation(
            _conv(conversation_id), {"subject": title, "by_ref": by.ref}
        )

    async def history(
        self, conversation_id: str, *, limit: int, since: datetime
    ) -> Sequence[MessageReceived]:
        """The conversation's own feed read from its start (``after=0``), keeping the last
        ``limit`` messages written at ``since`` or later; each is the event ``NEW_MSG`` gives
        (``event_id`` ``msg-<msg>``). A malformed message is left out and logged."""
        conv = _conv(conversation_id)
        since = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
        kept: deque[MessageReceived] = deque(maxlen=max(1, limit))
        after = 0
        while True:
            page = await self.client.messages(conv, after=after, limit=HISTORY_PAGE_SIZE)
            for raw in page.events:
                message = self._history_message(conversation_id, raw)
                if message is not None and message.timestamp >= since:
                    kept.append(message)
            if not page.events or page.cursor <= after:
                return list(kept)
            after = page.cursor

    def _history_message(self, conversation_id: str, raw: Any) -> MessageReceived | None:
        try:
            message = convert.message_from_json(raw)
            if message.conversation_id != conversation_id:
                raise InvalidPayload("msg.conv is not the conversation asked")
            check_event_ids(message)
            return message
        except (InvalidPayload, InvalidRemoteId) as exc:
            self.log.error(
                "medipeps %s: left out a malformed history message (%s)",
                self.ctx.connector_id,
                exc,
            )
            return None

    async def get_user(self, idnps: Idnps) -> RemoteUser | None:
        body = await self.client.get_professional(idnps)
        if body is None:
            return None
        try:
            return convert.user_from_json(body)
        except InvalidPayload as exc:
            raise ConnectorError(
                f"Medipeps answered a malformed professional: {exc}", retriable=False
            ) from exc

    async def list_users(self, cursor: str | None, limit: int) -> UserPage:
        """``GET /mp/professionals?after=&limit=`` (at most 1,000 a page), by IDNPS; the cursor
        is Medipeps' ``after``. A malformed professional is left out and logged (its index and
        the rule)."""
        raw, after_last = await self.client.professionals(cursor, listing.page_size(limit))
        return listing.user_page(
            raw,
            after_last,
            cursor,
            convert.user_from_json,
            field="professionals",
            vendor=f"medipeps {self.ctx.connector_id}",
            log=self.log,
        )

    # Vendor -> bridge -----------------------------------------------------------------------------

    async def _read_page(self, cursor: str) -> Page:
        """The page after ``cursor``; more may follow at once after a full page, or one holding
        files (Medipeps cuts those pages short)."""
        after = _cursor(cursor)
        page = await self.client.events(after=after, limit=self.settings.page_size)
        events = [event for raw in page.events if (event := self._parse(raw)) is not None]
        full = len(page.events) >= self.settings.page_size
        more = full or any(convert.has_attachment(raw) for raw in page.events)
        return Page(events, str(page.cursor), more)

    def _parse(self, raw: Any) -> RemoteEvent | None:
        try:
            event = convert.event_from_feed(raw)
            check_event_ids(event)  # an id the intake refuses would stall the feed on this page
            return event
        except (InvalidPayload, InvalidRemoteId) as exc:
            # Skip, do not stall: an event we cannot parse (invalid IDNPS, unknown type ...) would
            # fail the same way on every re-read and block the feed forever. It is not dropped
            # silently either: it is logged at ERROR with its seq and the reason (no content), so
            # an operator can follow up with the vendor.
            self.log.error(
                "medipeps %s: skipped unparsable event seq=%s: %s",
                self.ctx.connector_id,
                convert.event_seq(raw),
                exc,
            )
            return None


def _cursor(stored: str) -> int:
    if not stored.isascii() or not stored.isdigit():
        raise InvalidStoredCursor(
            f"the stored cursor {stored[:30]!r} is not a non-negative integer"
        )
    return int(stored)


def _conv(conversation_id: str) -> int:
    try:
        return convert.parse_conversation_id(conversation_id)
    except ValueError as exc:
        raise ConnectorError(f"Medipeps: {exc}", retriable=False) from exc


def _msg(message_id: str) -> int:
    try:
        return convert.parse_message_id(message_id)
    except ValueError as exc:
        raise ConnectorError(f"Medipeps: {exc}", retriable=False) from exc


async def _inline_attachment(attachment: OutboundAttachment) -> dict[str, str]:
    """The ``attachment`` field of a message: the file base64-encoded chunk by chunk.

    A file Medipeps would refuse (over 1 MiB, another MIME type) is refused here, permanently,
    before anything is read.
    """
    mime_type = attachment.mime_type.split(";", 1)[0].strip().lower()
    if mime_type not in FILE_MIME_TYPES:
        raise ConnectorError(
            f"Medipeps accepts only {', '.join(sorted(FILE_MIME_TYPES))} files, "
            f"not {mime_type[:100]!r}",
            retriable=False,
        )
    if attachment.size > MAX_FILE_SIZE:
        raise ConnectorError(
            f"Medipeps: the file is {attachment.size} bytes, over the {MAX_FILE_SIZE} bytes "
            "(1 MiB) Medipeps accepts",
            retriable=False,
        )
    parts: list[str] = []
    carry = b""
    total = 0
    async with attachment.open() as chunks:
        async for chunk in chunks:
            total += len(chunk)
            if total > MAX_FILE_SIZE:
                raise ConnectorError(
                    f"Medipeps: the file is over the {MAX_FILE_SIZE} bytes (1 MiB) Medipeps "
                    "accepts (longer than declared)",
                    retriable=False,
                )
            data = carry + chunk
            cut = len(data) - len(data) % 3  # whole 3-byte groups encode without padding
            parts.append(base64.b64encode(data[:cut]).decode("ascii"))
            carry = data[cut:]
    parts.append(base64.b64encode(carry).decode("ascii"))
    return {"filename": attachment.name, "mime": mime_type, "data_b64": "".join(parts)}


@asynccontextmanager
async def _decoded(data: str) -> AsyncIterator[AsyncIterator[bytes]]:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), _DECODE_STEP):
            try:
                yield base64.b64decode(data[start : start + _DECODE_STEP], validate=True)
            except ValueError as exc:
                raise ConnectorError(
                    "Medipeps: the inline file is not valid base64", retriable=False
                ) from exc

    yield chunks()


def _settings(settings: BaseModel) -> MedipepsSettings:
    """The context's settings as ``MedipepsSettings`` (validated again if another model)."""
    if isinstance(settings, MedipepsSettings):
        return settings
    return MedipepsSettings.model_validate(settings.model_dump())


def _reason(exc: BaseException) -> str:
    """A one-line reason for a log: our own error messages, else only the exception type.

    ``ConnectorError`` messages are built by the client (status, vendor error code, no secrets);
    anything else (a storage error ...) might quote data, so only its type is logged.
    """
    if isinstance(exc, (ConnectorError, InvalidStoredCursor)):
        return str(exc)
    return type(exc).__name__
