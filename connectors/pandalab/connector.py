"""The PandaLab connector: REST calls out, signed webhooks in."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, ClassVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, SecretStr

from connectors import http, payload
from connectors.base import (
    FILE_MSGTYPES,
    AttachmentSource,
    Capabilities,
    Connector,
    ConnectorContext,
    ConnectorError,
    DeletionHandling,
    DeliveryReport,
    DeliveryStatusHandling,
    EditHandling,
    FileLimit,
    HistorySource,
    Idnps,
    MemberRemoval,
    MessageReceived,
    NewConversation,
    OutboundAttachment,
    OutboundMessage,
    ParticipantAdding,
    ParticipantChange,
    ReactionHandling,
    ReadReceiptHandling,
    RemoteAttachment,
    RemoteUser,
    Sender,
    SystemMessages,
    TitleHandling,
    TopicHandling,
    TypingHandling,
    UserListing,
    UserPage,
)
from connectors.kit import listing
from connectors.kit.ids import InvalidRemoteId, check_event_ids
from connectors.kit.signing import SignedWebhook
from connectors.pandalab import convert
from connectors.pandalab.client import PandaLabClient
from connectors.payload import InvalidPayload, parse_json

MAX_FILE_SIZE = 512 * 1024 * 1024
"""PandaLab's file size limit (512 MiB: imaging videos), any MIME type."""

MAX_HISTORY_LIMIT = 1000
"""Most messages PandaLab returns from one conversation's history."""


SIGNATURE_HEADER = "X-PandaLab-Signature"
TIMESTAMP_HEADER = "X-PandaLab-Timestamp"
SIGNATURES = SignedWebhook(TIMESTAMP_HEADER, SIGNATURE_HEADER, max_signatures=1)
"""PandaLab signs each webhook with its one secret: one ``sha256=`` value per header."""
SANDBOX_WEBHOOK_SECRET = "pandalab-sandbox-demo-webhook-secret"
"""The fixed webhook secret its sandbox uses (``sandbox_entry.py``): a demo value, never for a
real vendor."""


class PandaLabSettings(BaseModel):
    """The ``settings`` block of a PandaLab connector."""

    model_config = ConfigDict(extra="forbid")

    api_url: HttpUrl | str
    client_id: str
    client_secret: SecretStr
    webhook_secret: SecretStr
    replay_window_s: int = Field(default=300, ge=1)
    max_body_bytes: int = Field(default=1024 * 1024, ge=64 * 1024, le=16 * 1024 * 1024)
    """Largest webhook body read (one event: a message of at most 10,000 characters)."""


class PandaLabConnector(
    Connector,
    AttachmentSource,
    EditHandling,
    DeletionHandling,
    ReactionHandling,
    ReadReceiptHandling,
    TypingHandling,
    DeliveryStatusHandling,
    ParticipantAdding,
    MemberRemoval,
    TitleHandling,
    TopicHandling,
    HistorySource,
    SystemMessages,
    UserListing,
):
    """A PandaLab-style vendor: OAuth2 client credentials, Markdown text, webhook push.

    Every optional operation: edits, deletions, reactions, read receipts, typing, delivery
    reports, adding and removing people, titles, topics (descriptions), history, system
    messages and the user listing (the ``capabilities`` flags follow from the classes above)."""

    type_name: ClassVar[str] = "pandalab"
    Settings: ClassVar[type[BaseModel]] = PandaLabSettings
    capabilities: ClassVar[Capabilities] = Capabilities(
        formatting="markdown",
        max_text_length=10000,
        long_text="split",
        message_kinds=frozenset({"text", "notice", "emote"}),
        files={msgtype: FileLimit(MAX_FILE_SIZE) for msgtype in FILE_MSGTYPES},
        locations=True,
        mentions=True,
        max_mentions=50,
        replies=True,
    )

    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.settings = _settings(ctx.settings)
        self.client = PandaLabClient(
            str(self.settings.api_url), self.settings.client_id, self.settings.client_secret
        )

    # Lifecycle ------------------------------------------------------------------------------------

    @property
    def webhook_url(self) -> str:
        return f"{self.ctx.public_base_url.rstrip('/')}/webhook"

    async def start(self) -> None:
        """Tell PandaLab where to push events (and check the credentials on the way)."""
        await self.client.set_webhook(self.webhook_url, self.settings.webhook_secret)
        self.log.info(
            "pandalab %s: webhook registered at %s", self.ctx.connector_id, self.webhook_url
        )

    async def stop(self) -> None:
        await self.client.close()

    # Bridge -> vendor -----------------------------------------------------------------------------

    async def create_conversation(self, conversation: NewConversation) -> str:
        return await self.client.create_conversation(
            convert.conversation_body(conversation), idempotency_key=conversation.request_id
        )

    async def send_message(self, conversation_id: str, message: OutboundMessage) -> str:
        """Post the message; a file is uploaded first (streamed), then attached by its id."""
        file_id = None
        if message.attachment is not None:
            file_id = await self._upload(message.attachment, message.request_id)
        return await self.client.post_message(
            conversation_id,
            convert.message_body(message, file_id),
            idempotency_key=message.request_id,
        )

    async def _upload(self, attachment: OutboundAttachment, request_id: str) -> str:
        if attachment.size > MAX_FILE_SIZE:
            raise ConnectorError(
                f"PandaLab: the file is {attachment.size} bytes, over the "
                f"{MAX_FILE_SIZE} bytes (512 MiB) PandaLab accepts",
                retriable=False,
            )
        file_id, upload_url = await self.client.create_upload(
            convert.upload_body(attachment), idempotency_key=f"{request_id}:upload"
        )
        await self.client.upload(upload_url, attachment.open, attachment.mime_type)
        return file_id

    async def open_attachment(
        self, attachment: RemoteAttachment
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream a file a PandaLab user sent, from its download URL (with the access token)."""
        return self.client.download(attachment.source)

    async def edit_message(
        self, conversation_id: str, message_id: str, message: OutboundMessage
    ) -> None:
        await self.client.edit_message(
            conversation_id,
            message_id,
            convert.edit_body(message),
            idempotency_key=message.request_id,
        )

    async def delete_message(self, conversation_id: str, message_id: str, sender: Sender) -> bool:
        del sender  # PandaLab deletes by message id; only its poster (this client) may
        return await self.client.delete_message(conversation_id, message_id)

    async def add_reaction(
        self, conversation_id: str, message_id: str, sender: Sender, key: str, request_id: str
    ) -> str:
        body = {"sender": convert.sender_json(sender), "emoji": key}
        return await self.client.add_reaction(
            conversation_id, message_id, body, idempotency_key=request_id
        )

    async def remove_reaction(
        self, conversation_id: str, message_id: str, reaction_id: str, sender: Sender
    ) -> bool:
        del sender
        return await self.client.remove_reaction(conversation_id, message_id, reaction_id)

    async def mark_read(self, conversation_id: str, reader: Sender, message_id: str) -> None:
        body = {"reader": convert.sender_json(reader), "up_to": message_id}
        await self.client.mark_read(conversation_id, body)

    async def set_typing(self, conversation_id: str, who: Sender, typing: bool) -> None:
        body = {"who": convert.sender_json(who), "typing": typing}
        await self.client.set_typing(conversation_id, body)

    async def send_system_message(self, conversation_id: str, text: str, request_id: str) -> None:
        await self.client.post_system_message(conversation_id, text, request_id)

    async def report_delivery(
        self, conversation_id: str, message_id: str, report: DeliveryReport
    ) -> None:
        body = {"status": report.status, "detail": report.detail}
        await self.client.report_delivery(conversation_id, message_id, body)

    async def add_participants(self, conversation_id: str, change: ParticipantChange) -> None:
        await self.client.add_participants(
            conversation_id, convert.participants_body(change), idempotency_key=change.request_id
        )

    async def remove_external(self, conversation_id: str, change: ParticipantChange) -> None:
        await self.client.remove_participants(
            conversation_id,
            convert.removal_body(replace(change, members=())),
            idempotency_key=f"{change.request_id}:remove-external",
        )

    async def remove_members(self, conversation_id: str, change: ParticipantChange) -> None:
        await self.client.remove_participants(
            conversation_id,
            convert.removal_body(change),
            idempotency_key=f"{change.request_id}:remove-members",
        )

    async def set_title(self, conversation_id: str, title: str | None, by: Sender) -> None:
        body = {"title": title, "changed_by": convert.sender_json(by)}
        await self.client.update_conversation(conversation_id, body)

    async def set_topic(self, conversation_id: str, topic: str | None, by: Sender) -> None:
        body = {"description": topic, "changed_by": convert.sender_json(by)}
        await self.client.update_conversation(conversation_id, body)

    async def history(
        self, conversation_id: str, *, limit: int, since: datetime
    ) -> Sequence[MessageReceived]:
        """``GET .../messages``: the last ``limit`` (at most 1,000) messages since ``since``,
        read as the webhook's ``message.created`` (so their ids are the live ones). Each
        ``event_id`` is ``history:<message id>`` (the webhook event id is not in the history).
        A malformed message is left out and logged (its index and the reason, no content)."""
        limit = max(1, min(limit, MAX_HISTORY_LIMIT))
        since = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
        raw = await self.client.messages(
            conversation_id, limit=limit, since=since.astimezone(UTC).isoformat()
        )
        messages: list[MessageReceived] = []
        for i, item in enumerate(raw):
            message = self._history_message(conversation_id, i, item)
            if message is not None and message.timestamp >= since:
                messages.append(message)
        return messages[-limit:]

    def _history_message(
        self, conversation_id: str, index: int, item: Any
    ) -> MessageReceived | None:
        where = f"messages[{index}]"
        try:
            msg = payload.obj(item, where)
            event_id = convert.history_event_id(payload.str_field(msg, "id", where))
            message = convert.message_from_json(event_id, msg, where)
            if message.conversation_id != conversation_id:
                raise InvalidPayload(f"{where}.conversation_id is not the conversation asked")
            check_event_ids(message)
            return message
        except (InvalidPayload, InvalidRemoteId, ValueError, OverflowError) as exc:
            self.log.error(
                "pandalab %s: left out a malformed history message (%s)",
                self.ctx.connector_id,
                exc,
            )
            return None

    async def get_user(self, idnps: Idnps) -> RemoteUser | None:
        body = await self.client.get_user(idnps)
        if body is None:
            return None
        try:
            return convert.user_from_json(body)
        except InvalidPayload as exc:
            raise ConnectorError(
                f"PandaLab answered a malformed user: {exc}", retriable=False
            ) from exc

    async def list_users(self, cursor: str | None, limit: int) -> UserPage:
        """``GET /api/v1/users?after=&limit=`` (at most 1,000 a page), by IDNPS; the cursor is
        PandaLab's ``next``. A malformed user is left out and logged (its index and the rule)."""
        raw, after_last = await self.client.list_users(cursor, listing.page_size(limit))
        return listing.user_page(
            raw,
            after_last,
            cursor,
            convert.user_from_json,
            field="users",
            vendor=f"pandalab {self.ctx.connector_id}",
            log=self.log,
        )

    # Vendor -> bridge -----------------------------------------------------------------------------

    def web_routes(self) -> list[web.RouteDef]:
        return [web.post("/webhook", self._on_webhook)]

    @property
    def max_request_bytes(self) -> int:
        return self.settings.max_body_bytes

    def refuse_unread(self, request: web.BaseRequest) -> web.StreamResponse | None:
        refusal = self._check_headers(
            request.headers.get(TIMESTAMP_HEADER), request.headers.get(SIGNATURE_HEADER)
        )
        return None if refusal is None else self._refuse(401, "unauthorized", refusal)

    async def _on_webhook(self, request: web.Request) -> web.Response:
        """Verify, parse, store; answer 2xx only once stored (else PandaLab redelivers).

        The signature headers (present, timestamp in the replay window), then the declared
        size, are checked before a byte of the body is read; the body is read up to the limit."""
        timestamp = request.headers.get(TIMESTAMP_HEADER)
        signature = request.headers.get(SIGNATURE_HEADER)
        refusal = self._check_headers(timestamp, signature)
        if refusal is not None:
            return self._refuse(401, "unauthorized", refusal)
        assert timestamp is not None and signature is not None  # what _check_headers checked
        limit = self.settings.max_body_bytes
        raw = await http.read_request_body(request, limit)  # a declared larger one: unread
        if raw is None:
            return self._refuse(
                413, "body_too_large", f"the body is larger than the {limit} bytes accepted"
            )
        refusal = self._check_signature(timestamp, signature, raw)
        if refusal is not None:
            return self._refuse(401, "unauthorized", refusal)
        try:
            body = parse_json(raw)
            # A \u escape of a lone surrogate is no character: nothing downstream can encode it.
            json.dumps(body, ensure_ascii=False).encode()
        except (ValueError, RecursionError):  # RecursionError: nested deeper than JSON parses
            return self._refuse(400, "malformed_json", "the body is not valid JSON")
        try:
            events = convert.events_from_webhook(body)
        except InvalidPayload as exc:
            return self._refuse(400, "invalid_event", str(exc))
        except (ValueError, OverflowError):  # a date out of range once in UTC, say
            return self._refuse(400, "invalid_event", "a field is out of range")
        try:
            await self.ctx.emit_many(events)
        except InvalidRemoteId as exc:  # the intake's rule for every vendor's ids
            return self._refuse(400, "invalid_event", str(exc))
        except Exception as exc:  # noqa: BLE001 - any storage failure: let PandaLab redeliver
            self.log.error(
                "pandalab %s: could not store webhook event %s (%s); asking for redelivery",
                self.ctx.connector_id,
                events[0].event_id if events else "?",
                type(exc).__name__,
            )
            return _json_error(503, "not_stored", "the event could not be stored; deliver it again")
        return web.json_response({"ok": True})

    def _check_headers(self, timestamp: str | None, signature: str | None) -> str | None:
        """Why the request cannot be authentic from its headers alone (missing, malformed,
        outside the replay window), or None: checked before the body is read."""
        return SIGNATURES.header_refusal(
            self._secrets(),
            timestamp,
            signature,
            now=time.time(),
            window_s=self.settings.replay_window_s,
        )

    def _check_signature(self, timestamp: str, signature: str, raw: bytes) -> str | None:
        """Why the signature is not the body's (headers already checked), or None."""
        return SIGNATURES.signature_refusal(self._secrets(), timestamp, signature, raw)

    def _secrets(self) -> list[str]:
        return [self.settings.webhook_secret.get_secret_value()]

    def _refuse(self, status: int, code: str, reason: str) -> web.Response:
        self.log.warning(
            "pandalab %s: webhook refused (%s): %s", self.ctx.connector_id, status, reason
        )
        return _json_error(status, code, reason)


def _settings(settings: BaseModel) -> PandaLabSettings:
    """The context's settings as ``PandaLabSettings`` (validated again if another model)."""
    if isinstance(settings, PandaLabSettings):
        return settings
    return PandaLabSettings.model_validate(settings.model_dump())


def _json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)
