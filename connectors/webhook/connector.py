"""The generic webhook connector: any vendor that implements openapi.yaml, no Python needed.

The vendor pushes its users' actions to ``POST /events`` (receiver.py) and serves the bridge's
deliveries (client.py); both directions are signed with the secret the operator shares with
the vendor. What the vendor can show is what it declared at registration (settings.py).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, ClassVar

import aiohttp
from aiohttp import web
from pydantic import BaseModel

from connectors import http
from connectors.base import (
    AttachmentSource,
    Capabilities,
    Connector,
    ConnectorContext,
    ConnectorError,
    DeliveryReport,
    Idnps,
    MessageReceived,
    NewConversation,
    OutboundAttachment,
    OutboundMessage,
    ParticipantChange,
    RemoteAttachment,
    RemoteUser,
    Sender,
    UserListing,
    UserPage,
    derive_capabilities,
    operation_protocols,
    with_protocols,
)
from connectors.kit import listing
from connectors.kit.backoff import Backoff
from connectors.kit.ids import InvalidRemoteId, check_event_ids
from connectors.kit.tasks import cancel_and_wait
from connectors.webhook import convert
from connectors.webhook.client import WebhookClient, derived_key, idempotency_key
from connectors.webhook.receiver import EventReceiver, TokenBucket
from connectors.webhook.settings import WebhookSettings

MAX_HISTORY_LIMIT = 1000
"""Most messages asked of a vendor's conversation history at once."""
MAX_HISTORY_BYTES = 64 * 1024 * 1024
"""Longest history answer read (1,000 messages, each at most 65,536 characters)."""

CONTRACT_VERSION = "1.0"
"""``info.version`` of openapi.yaml, announced to the vendor."""


class WebhookConnector(Connector, AttachmentSource, UserListing):
    """A vendor speaking the webhook contract; its capabilities come from its settings.

    It defines every optional operation but inherits only the classes its vendor declared
    (``__new__``): an instance whose vendor declared no edits is no ``EditHandling``, so the
    bridge never asks it for one, and its advertised flags follow. The user listing is always
    there: a vendor without one answers ``GET /users`` with 404 or 501, read as an empty list."""

    type_name: ClassVar[str] = "webhook"
    Settings: ClassVar[type[BaseModel]] = WebhookSettings

    announce_retry_initial_s: float = 1.0
    announce_retry_max_s: float = 60.0

    def __new__(cls, ctx: ConnectorContext) -> WebhookConnector:
        declared = _settings(ctx.settings).capabilities.to_capabilities()
        return super().__new__(with_protocols(cls, operation_protocols(declared)))

    def __init__(self, ctx: ConnectorContext) -> None:
        super().__init__(ctx)
        self.settings = _settings(ctx.settings)
        # Per instance: each vendor declares its own (the bridge reads connector.capabilities).
        declared = self.settings.capabilities.to_capabilities()
        self.capabilities: Capabilities = derive_capabilities(type(self), declared)  # type: ignore[misc]
        self.client = WebhookClient(
            self.settings.base_url, self.signing_secrets, timeout_s=self.settings.timeout_s
        )
        self.receiver = EventReceiver(
            connector_id=ctx.connector_id,
            secrets=self.accepted_secrets,
            store=ctx.emit_many,
            registration=self.registration,
            max_body_bytes=self.settings.max_body_bytes,
            max_events=self.settings.max_events_per_request,
            replay_window_s=self.settings.replay_window_s,
            rate=TokenBucket(self.settings.rate_limit_per_s, self.settings.rate_limit_burst),
            log=self.log,
        )
        self._announcer: asyncio.Task[None] | None = None
        self._said_no_listing = False

    # Secrets ------------------------------------------------------------------------------------

    def accepted_secrets(self) -> Sequence[str]:
        """Secrets an incoming signature may use: the bridge's (current, then those in their
        grace period), else the config's ``secret``. Read at each request: a rotation changes
        them under a running connector."""
        held = list(self.ctx.secrets.accepted())
        if held:
            return held
        current = self.ctx.secrets.current()
        if current is not None:
            return [current]
        return [self.settings.secret.get_secret_value()] if self.settings.secret else []

    def signing_secrets(self) -> Sequence[str]:
        """Outgoing requests are signed with every accepted secret, current first, so a vendor
        still on the previous secret during the grace period keeps accepting them."""
        return self.accepted_secrets()

    # Lifecycle ----------------------------------------------------------------------------------

    @property
    def events_url(self) -> str:
        return f"{self.ctx.public_base_url.rstrip('/')}/events"

    def registration(self) -> dict[str, Any]:
        """``GET /capabilities``: what the bridge holds for this vendor."""
        return {
            "connector_id": self.ctx.connector_id,
            "contract_version": CONTRACT_VERSION,
            "events_url": self.events_url,
            "capabilities": self.capabilities.to_json(),
            "limits": {
                "max_body_bytes": self.settings.max_body_bytes,
                "max_events_per_request": self.settings.max_events_per_request,
                "replay_window_s": self.settings.replay_window_s,
            },
        }

    async def start(self) -> None:
        """Tell the vendor where to push (``POST /bridge``). A vendor that is down or refuses
        does not stop the bridge: the announcement is retried in the background."""
        if not self.accepted_secrets():
            self.log.error(
                "webhook %s: no shared secret; the vendor's requests will be refused until the "
                "operator sets one",
                self.ctx.connector_id,
            )
        if not self.settings.announce:
            return
        try:
            await self.announce()
        except ConnectorError as exc:
            self.log.warning(
                "webhook %s: could not announce the events URL to the vendor (%s); retrying in "
                "the background",
                self.ctx.connector_id,
                exc,
            )
            self._announcer = asyncio.create_task(
                self._announce_until_done(), name=f"webhook-announce-{self.ctx.connector_id}"
            )

    async def announce(self) -> None:
        body = {
            "connector_id": self.ctx.connector_id,
            "contract_version": CONTRACT_VERSION,
            "events_url": self.events_url,
        }
        await self.client.post("/bridge", body, derived_key("bridge", self.events_url))
        self.log.info("webhook %s: events URL announced to the vendor", self.ctx.connector_id)

    async def _announce_until_done(self) -> None:
        backoff = Backoff(self.announce_retry_initial_s, self.announce_retry_max_s)
        failures = 0
        while True:
            failures += 1
            await asyncio.sleep(backoff.delay(failures))
            try:
                await self.announce()
                return
            except ConnectorError as exc:
                self.log.warning(
                    "webhook %s: announcing the events URL failed again (%s)",
                    self.ctx.connector_id,
                    exc,
                )

    async def stop(self) -> None:
        task, self._announcer = self._announcer, None
        if task is not None:
            await cancel_and_wait(task)
        await self.client.close()

    # Bridge -> vendor ---------------------------------------------------------------------------

    async def create_conversation(self, conversation: NewConversation) -> str:
        _, body = await self.client.post(
            "/conversations",
            convert.conversation_body(conversation),
            idempotency_key(conversation.request_id),
        )
        return _answer_id(body, "conversation_id", "conversation")

    async def send_message(self, conversation_id: str, message: OutboundMessage) -> str:
        """Post the message; a file is uploaded first (streamed), then attached by its id."""
        attachment = None
        if message.attachment is not None:
            attachment = await self._upload(message.attachment, message.request_id)
        _, body = await self.client.post(
            f"{_conversation(conversation_id)}/messages",
            convert.message_body(message, self.capabilities.formatting, attachment),
            idempotency_key(message.request_id),
        )
        return _answer_id(body, "message_id", "message")

    async def _upload(self, attachment: OutboundAttachment, request_id: str) -> dict[str, Any]:
        limit = self._file_limit(attachment.mime_type)
        name = convert.file_name(attachment.name)
        mime_type = attachment.mime_type.split(";", 1)[0].strip().lower()
        uploaded = await self.client.upload(
            attachment.open, name, mime_type, idempotency_key(f"{request_id}:file"), limit
        )
        return {
            "file_id": uploaded.file_id,
            "name": name,
            "mime_type": mime_type,
            "size": uploaded.size,
        }

    def _file_limit(self, mime_type: str) -> int:
        """The largest size the vendor declared for a file of this type (the bridge already
        checked the kind of file; this bounds what the upload may stream)."""
        sizes = [
            limit.max_size for limit in self.capabilities.files.values() if limit.allows(mime_type)
        ]
        if not sizes:
            raise ConnectorError(
                f"the vendor declared no files of type {mime_type[:100]!r}", retriable=False
            )
        return max(sizes)

    async def open_attachment(
        self, attachment: RemoteAttachment
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream a file a vendor user sent, from ``GET /files/{file_id}``."""
        return self.client.download(attachment.source)

    async def edit_message(
        self, conversation_id: str, message_id: str, message: OutboundMessage
    ) -> None:
        await self.client.post(
            f"{_message(conversation_id, message_id)}/edit",
            convert.edit_body(message, self.capabilities.formatting),
            idempotency_key(message.request_id),
        )

    async def delete_message(self, conversation_id: str, message_id: str, sender: Sender) -> bool:
        """False when the vendor has no such message (404), which is no error."""
        status, _ = await self.client.post(
            f"{_message(conversation_id, message_id)}/delete",
            {"sender": convert.person_json(sender)},
            derived_key("delete", conversation_id, message_id),
            accept=(404,),
        )
        return status != 404

    async def add_reaction(
        self, conversation_id: str, message_id: str, sender: Sender, key: str, request_id: str
    ) -> str:
        reaction = convert.reaction_key(key)
        if reaction is None:
            raise ConnectorError("the reaction has no printable key", retriable=False)
        _, body = await self.client.post(
            f"{_message(conversation_id, message_id)}/reactions",
            {"sender": convert.person_json(sender), "key": reaction},
            idempotency_key(request_id),
        )
        return _answer_id(body, "reaction_id", "reaction")

    async def remove_reaction(
        self, conversation_id: str, message_id: str, reaction_id: str, sender: Sender
    ) -> bool:
        """False when the vendor has no such reaction (404), which is no error."""
        path = f"{_message(conversation_id, message_id)}/reactions/{http.segment(reaction_id)}"
        status, _ = await self.client.post(
            f"{path}/delete",
            {"sender": convert.person_json(sender)},
            derived_key("unreact", conversation_id, message_id, reaction_id),
            accept=(404,),
        )
        return status != 404

    async def mark_read(self, conversation_id: str, reader: Sender, message_id: str) -> None:
        await self.client.post(
            f"{_conversation(conversation_id)}/read",
            {"reader": convert.person_json(reader), "up_to": message_id},
            derived_key("read", conversation_id, reader.mxid, message_id),
        )

    async def set_typing(self, conversation_id: str, who: Sender, typing: bool) -> None:
        """Best effort: a short timeout; a fresh key each time (a refresh is a new request)."""
        await self.client.post(
            f"{_conversation(conversation_id)}/typing",
            {"who": convert.person_json(who), "typing": typing},
            derived_key("typing", conversation_id, who.mxid, str(random.random())),
            timeout=aiohttp.ClientTimeout(total=self.settings.typing_timeout_s),
        )

    async def report_delivery(
        self, conversation_id: str, message_id: str, report: DeliveryReport
    ) -> None:
        body = convert.delivery_body(report)
        await self.client.post(
            f"{_message(conversation_id, message_id)}/delivery",
            body,
            derived_key("delivery", conversation_id, message_id, body["status"], body["detail"]),
        )

    async def add_participants(self, conversation_id: str, change: ParticipantChange) -> None:
        """``ParticipantAdding``, when the vendor declared ``add_participants``."""
        await self.client.post(
            f"{_conversation(conversation_id)}/participants",
            convert.participants_body(change),
            idempotency_key(change.request_id),
        )

    async def remove_external(self, conversation_id: str, change: ParticipantChange) -> None:
        """``ParticipantAdding``: people from outside leave (only ``external`` is sent)."""
        await self.client.post(
            f"{_conversation(conversation_id)}/participants/remove",
            convert.removal_body(replace(change, members=())),
            idempotency_key(f"{change.request_id}:remove-external"),
        )

    async def remove_members(self, conversation_id: str, change: ParticipantChange) -> None:
        """``MemberRemoval``, when the vendor declared ``remove_participants``."""
        await self.client.post(
            f"{_conversation(conversation_id)}/participants/remove",
            convert.removal_body(change),
            idempotency_key(f"{change.request_id}:remove-members"),
        )

    async def set_title(self, conversation_id: str, title: str | None, by: Sender) -> None:
        """``TitleHandling``, when the vendor declared ``titles``. Setting a title is
        idempotent by itself: each call has its own key (the same key for a later rename back
        to the same title would be answered as a replay, unapplied)."""
        await self.client.post(
            f"{_conversation(conversation_id)}/title",
            {"title": convert.title_text(title), "by": convert.person_json(by)},
            derived_key("title", conversation_id, uuid.uuid4().hex),
        )

    async def send_system_message(self, conversation_id: str, text: str, request_id: str) -> None:
        """``SystemMessages``, when the vendor declared ``system_messages``: the ``system``
        operation, a note to the conversation's members from nobody."""
        await self.client.post(
            f"{_conversation(conversation_id)}/system",
            {"text": text},
            idempotency_key(request_id),
        )

    async def set_topic(self, conversation_id: str, topic: str | None, by: Sender) -> None:
        """``TopicHandling``, when the vendor declared ``topics`` (keys as for titles)."""
        await self.client.post(
            f"{_conversation(conversation_id)}/topic",
            {"topic": convert.topic_text(topic), "by": convert.person_json(by)},
            derived_key("topic", conversation_id, uuid.uuid4().hex),
        )

    async def history(
        self, conversation_id: str, *, limit: int, since: datetime
    ) -> Sequence[MessageReceived]:
        """``HistorySource``, when the vendor declared ``history``: ``GET
        /conversations/{cid}/messages?limit=&since=``, message events as pushed (same ids).
        A malformed one is left out and logged (the field and the rule, no content)."""
        limit = max(1, min(limit, MAX_HISTORY_LIMIT))
        since = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
        _, body = await self.client.get(
            f"{_conversation(conversation_id)}/messages",
            params={"limit": str(limit), "since": convert.iso8601(since)},
            limit=MAX_HISTORY_BYTES,
        )
        items = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise ConnectorError(
                "the vendor answered a message history without a 'messages' array",
                retriable=False,
            )
        messages: list[MessageReceived] = []
        for i, item in enumerate(items):
            message = self._history_message(conversation_id, i, item)
            if message is not None and message.timestamp >= since:
                messages.append(message)
        return messages[-limit:]

    def _history_message(
        self, conversation_id: str, index: int, item: Any
    ) -> MessageReceived | None:
        where = f"messages[{index}]"
        try:
            event = convert.event_from_json(item, where)
            if not isinstance(event, MessageReceived):
                raise convert.InvalidEvent(f"{where}.type must be message")
            if event.conversation_id != conversation_id:
                raise convert.InvalidEvent(f"{where}.conversation_id is not the conversation asked")
            check_event_ids(event)
            return event
        except (convert.InvalidEvent, InvalidRemoteId) as exc:
            self.log.error(
                "webhook %s: left out a malformed history message (%s)", self.ctx.connector_id, exc
            )
            return None

    async def get_user(self, idnps: Idnps) -> RemoteUser | None:
        status, body = await self.client.get(f"/users/{http.segment(idnps)}", accept=(404,))
        if status == 404:
            return None
        try:
            return convert.user_from_json(body, idnps)
        except convert.InvalidAnswer as exc:
            raise ConnectorError(
                f"the vendor answered a malformed user: {exc}", retriable=False
            ) from None

    async def list_users(self, cursor: str | None, limit: int) -> UserPage:
        """``GET /users?cursor=&limit=`` (at most 1,000 a page). A vendor answering 404 or 501
        has no listing: an empty, complete page (said once in the log). A malformed user is
        left out and logged (the field and the rule, no content)."""
        params = {"limit": str(listing.page_size(limit))}
        if cursor is not None:
            params["cursor"] = cursor
        status, body = await self.client.get("/users", params=params, accept=(404, 501))
        if status in (404, 501):
            if not self._said_no_listing:
                self._said_no_listing = True
                self.log.info(
                    "webhook %s: the vendor lists no users (GET /users answered %d)",
                    self.ctx.connector_id,
                    status,
                )
            return UserPage((), None)
        try:
            entries, next_cursor = convert.user_page_from_json(body)
        except convert.InvalidAnswer as exc:
            raise ConnectorError(
                f"the vendor answered a malformed user list: {exc}", retriable=False
            ) from None
        if next_cursor is not None and next_cursor == cursor:
            raise ConnectorError(
                "the vendor answered a user list page that does not move past its cursor",
                retriable=False,
            )
        users: list[RemoteUser] = []
        for entry in entries:
            if isinstance(entry, RemoteUser):
                users.append(entry)
            else:
                self.log.warning(
                    "webhook %s: left out a malformed user of the list (%s)",
                    self.ctx.connector_id,
                    entry,
                )
        return UserPage(tuple(users), next_cursor)

    # Vendor -> bridge ---------------------------------------------------------------------------

    def web_routes(self) -> list[web.RouteDef]:
        return self.receiver.routes()

    @property
    def max_request_bytes(self) -> int:
        return self.settings.max_body_bytes

    def refuse_unread(self, request: web.BaseRequest) -> web.StreamResponse | None:
        return self.receiver.refuse_unread(request)


def _settings(settings: BaseModel) -> WebhookSettings:
    """The context's settings as ``WebhookSettings`` (validated again if another model)."""
    if isinstance(settings, WebhookSettings):
        return settings
    return WebhookSettings.model_validate(settings.model_dump())


def _conversation(conversation_id: str) -> str:
    return f"/conversations/{http.segment(conversation_id)}"


def _message(conversation_id: str, message_id: str) -> str:
    return f"{_conversation(conversation_id)}/messages/{http.segment(message_id)}"


def _answer_id(body: Any, key: str, what: str) -> str:
    try:
        return convert.answer_id(body, key, what)
    except convert.InvalidAnswer as exc:
        raise ConnectorError(
            f"the vendor answered a malformed {what}: {exc}", retriable=False
        ) from None
