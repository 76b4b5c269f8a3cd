"""The webhook-contract sandbox: a vendor app implementing the vendor side of openapi.yaml.

Written from the contract alone (it imports nothing of the connector), on the shared sandbox
kernel: it serves every operation of the contract's ``webhooks`` section, checks the bridge's
signatures and idempotency keys as the contract says, and pushes its users' actions, signed, to
the events URL the bridge announces (in order, one event or a batch per request, redelivered
until acknowledged). ``/_sandbox/`` is the user-side API of USER_API.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar
from urllib.parse import unquote

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.idnps import Idnps
from connectors.kit.backoff import Backoff
from connectors.kit.pusher import Delivery, Pusher
from connectors.kit.signing import SignedWebhook
from connectors.sandbox.app import new_sandbox_app
from connectors.sandbox.errors import SandboxError, bad_request, file_too_large
from connectors.sandbox.files import (
    FileStore,
    attachment_json,
    file_response,
    parse_mime_type,
    sanitize_name,
)
from connectors.sandbox.kernel import (
    MAX_HISTORY,
    Conversation,
    External,
    FileRules,
    Kernel,
    Location,
    Message,
    Reaction,
    SandboxUser,
)
from connectors.sandbox.webtools import (
    background_delivery,
    describe_validation_error,
    iso8601,
    query_int,
    query_time,
    query_user_page,
)

log = logging.getLogger("eimis.sandbox.webhook")

SECRET = "webhook-sandbox-demo-secret-6f1c2a9e4b7d"
"""The secret this sandbox shares with the bridge by default: a demo value, never for a real
vendor (at least 32 characters, as the contract asks)."""

USERS: tuple[SandboxUser, ...] = (
    SandboxUser(Idnps("810000900018"), "Inès", "Garnier", "Infirmier"),
    SandboxUser(Idnps("810000900026"), "Hugo", "Chevalier", "Médecin généraliste"),
    SandboxUser(Idnps("810000900034"), "Emma", "Rousseau", "Pharmacien"),
    SandboxUser(Idnps("810000900042"), "Louis", "Faure", "Sage-femme"),
    SandboxUser(Idnps("0750000010"), "Jade", "Morel", "Masseur-kinésithérapeute"),
)
"""The sandbox's users (an ADELI-based IDNPS among them; none is a user of another sandbox)."""

MAX_FILE_BYTES = 50 * 1024 * 1024
CAPABILITIES: dict[str, Any] = {
    "formatting": "markdown",
    "max_text_length": 8000,
    "long_text": "split",
    "message_kinds": ["text", "notice", "emote"],
    "files": {
        kind: {"max_size": MAX_FILE_BYTES, "mime_types": ["*/*"]}
        for kind in ("m.image", "m.file", "m.audio", "m.video")
    },
    "locations": True,
    "mentions": True,
    "replies": True,
    "edits": True,
    "deletions": True,
    "reactions": True,
    "read_receipts": True,
    "typing": True,
    "delivery_status": True,
    "add_participants": True,
    "remove_participants": True,
    "titles": True,
    "topics": True,
    "history": True,
    "system_messages": True,
}
"""What this vendor declares it can show, in the form of the connector's ``capabilities``."""

DEFAULT_HISTORY = 50
REPLAY_WINDOW_S = 300
MAX_SIGNATURES = 5
MAX_BODY_BYTES = 1024 * 1024
USER_API_PREFIX = "/_sandbox/"

_ID = r"^[!-~]{1,200}$"
_KEY = re.compile(r"[!-~]{1,255}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP_RFC3339 = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


def webhook_error(error: SandboxError) -> dict[str, Any]:
    return {"error": error.code, "message": error.message}


# --- Signing, as the contract describes it -------------------------------------------------------

SIGNATURES = SignedWebhook("X-Eimis-Timestamp", "X-Eimis-Signature", max_signatures=MAX_SIGNATURES)


def check_signature(
    secrets: Sequence[str], headers: Any, payload: bytes, now: float, window_s: int
) -> None:
    """A 401 unless a listed signature verifies with one of ``secrets`` within the window."""
    reason = SIGNATURES.refusal(
        secrets,
        headers.get(SIGNATURES.timestamp_header),
        headers.get(SIGNATURES.signature_header),
        payload,
        now=now,
        window_s=window_s,
    )
    if reason is not None:
        raise _unauthorized(reason[0].upper() + reason[1:] + ".")


def _unauthorized(message: str) -> SandboxError:
    return SandboxError(401, "unauthorized", message)


# --- Idempotency keys, as the contract describes them --------------------------------------------


@dataclass
class _KeyEntry:
    digest: str
    answer: tuple[int, bytes, str] | None = None
    """(status, body, content type) of the first answer; None while it is being processed."""


class IdempotencyStore:
    """Keys per operation path: a repeat gets the first answer; another body gets 422."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _KeyEntry] = {}

    def begin(self, path: str, key: str, digest: str) -> web.Response | None:
        """The stored answer to replay, None to go on (the key is then in progress)."""
        entry = self._entries.get((path, key))
        if entry is None:
            self._entries[(path, key)] = _KeyEntry(digest)
            return None
        if entry.digest != digest:
            raise SandboxError(
                422,
                "idempotency_key_reused",
                "This Idempotency-Key was used with another body on this operation.",
            )
        if entry.answer is None:
            raise SandboxError(
                409,
                "request_in_progress",
                "A request with this Idempotency-Key is still being processed.",
                {"Retry-After": "1"},
            )
        status, body, content_type = entry.answer
        response = web.Response(status=status, body=body or None)
        if body:
            response.content_type = content_type
        response.headers["Idempotent-Replayed"] = "true"
        return response

    def finish(self, path: str, key: str, response: web.StreamResponse) -> None:
        entry = self._entries.get((path, key))
        if entry is None:
            return
        if 200 <= response.status < 300 and isinstance(response, web.Response):
            body = response.body if isinstance(response.body, bytes) else b""
            entry.answer = (response.status, body, response.content_type)
        else:
            del self._entries[(path, key)]

    def abandon(self, path: str, key: str) -> None:
        entry = self._entries.get((path, key))
        if entry is not None and entry.answer is None:
            del self._entries[(path, key)]


# --- Request bodies (the contract's schemas) -----------------------------------------------------


class Strict(BaseModel):
    """The contract's bodies: strict types, and no field it does not name."""

    model_config = ConfigDict(strict=True, extra="forbid")


IdField = Field(pattern=_ID, max_length=200)
NameField = Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")


class PersonBody(Strict):
    ref: str = Field(max_length=255)
    display_name: str = NameField
    mxid: str = Field(pattern=r"^@[!-9;-~]+:[!-~]+$", max_length=255)


class MentionBody(Strict):
    ref: str = Field(max_length=255)
    display_name: str = NameField


class LocationBody(Strict):
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    description: str | None = Field(default=None, max_length=255)


class FileRefBody(Strict):
    file_id: str = IdField
    name: str = Field(min_length=1, max_length=255)
    mime_type: str = Field(max_length=255)
    size: int = Field(ge=0)


class AnnouncementBody(Strict):
    connector_id: str = Field(min_length=1, max_length=32)
    contract_version: str = Field(max_length=20)
    events_url: str = Field(max_length=2048)


class NewConversationBody(Strict):
    title: str | None = Field(max_length=255)
    members: list[str] = Field(min_length=1, max_length=100)
    external: list[PersonBody] = Field(max_length=100)


class OutgoingMessageBody(Strict):
    sender: PersonBody
    text: str = Field(max_length=65536)
    format: Literal["plain", "markdown"]
    html: str | None = None
    kind: Literal["text", "notice", "emote"]
    reply_to: str | None = Field(default=None, pattern=_ID, max_length=200)
    mentions: list[MentionBody] = Field(max_length=50)
    attachment: FileRefBody | None = None
    location: LocationBody | None = None
    sent_at: str = Field(pattern=_TIMESTAMP_RFC3339)


class EditBody(Strict):
    sender: PersonBody
    text: str = Field(max_length=65536)
    format: Literal["plain", "markdown"]
    html: str | None = None
    mentions: list[MentionBody] = Field(max_length=50)


class ActorBody(Strict):
    sender: PersonBody


class ReactionBody(Strict):
    sender: PersonBody
    key: str = Field(min_length=1, max_length=64)


class ReadBody(Strict):
    reader: PersonBody
    up_to: str = IdField


class TypingBody(Strict):
    who: PersonBody
    typing: bool


class ParticipantsBody(Strict):
    members: list[str] = Field(max_length=100)
    external: list[PersonBody] = Field(max_length=100)
    by: PersonBody | None = None


class RemovedParticipantsBody(ParticipantsBody):
    reason: str | None = Field(default=None, max_length=1000)


class TitleBody(Strict):
    title: str | None = Field(max_length=255, pattern=r"^[^\x00-\x1f\x7f]*$")
    by: PersonBody


class SystemBody(Strict):
    text: str = Field(min_length=1, max_length=4000, pattern=r"^[^\x00]*$")


class TopicBody(Strict):
    topic: str | None = Field(max_length=4000, pattern=r"^[^\x00]*$")
    by: PersonBody


class DeliveryBody(Strict):
    status: Literal["delivered", "degraded", "failed"]
    detail: str = Field(max_length=1000)


M = TypeVar("M", bound=BaseModel)


def parse_body(raw: bytes, model: type[M]) -> M:
    """The JSON object in ``raw`` validated as ``model``, or a 400 naming the field."""
    if not raw.strip():
        raise bad_request("The request body is empty; a JSON object is expected.")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad_request("The request body is not valid UTF-8.") from None
    except (ValueError, RecursionError):
        raise bad_request("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise bad_request(describe_validation_error(exc)) from None


def _person(body: PersonBody | MentionBody) -> External:
    return External(body.ref, body.display_name)


# --- Events pushed to the bridge -----------------------------------------------------------------


@dataclass
class _Batch:
    """One request to the events URL: frozen once made, so a redelivery is the same bytes under
    the same Idempotency-Key."""

    key: str
    body: bytes
    count: int


class EventPusher(Pusher):
    """The kernel's publisher: queues events in the contract's form and pushes them in order.

    Nothing is pushed before the bridge announces its events URL; after a failed request the
    pusher waits ``retry_initial * 2**n`` seconds (at most ``retry_max``), or what the bridge's
    ``Retry-After`` asks within that bound.
    """

    def __init__(
        self,
        secret: Callable[[], str],
        *,
        wall_clock: Callable[[], float] = time.time,
        batch_size: int = 20,
        retry_initial: float = 0.2,
        retry_max: float = 10.0,
    ) -> None:
        super().__init__(
            backoff=Backoff(retry_initial, retry_max, jitter=False),
            log=log,
            honour_retry_after=True,
        )
        self.secret = secret
        self.wall_clock = wall_clock
        self.batch_size = batch_size
        self.events_url: str | None = None
        self.pushed = 0
        """Events the bridge acknowledged so far."""
        self.requests = 0
        """Requests made to the events URL so far (redeliveries included)."""
        self._pending: deque[dict[str, Any]] = deque()
        self._batch: _Batch | None = None

    def announce(self, events_url: str) -> None:
        self.events_url = events_url
        self.wake()

    @property
    def waiting(self) -> int:
        return len(self._pending) + (self._batch.count if self._batch else 0)

    # EventPublisher -----------------------------------------------------------------------------

    def conversation_created(self, conversation: Conversation) -> None:
        assert conversation.created_by is not None
        self._publish(
            "conversation.created",
            conversation.id,
            conversation.created_at,
            creator=str(conversation.created_by),
            members=[str(m) for m in conversation.members],
            participants=[e.ref for e in conversation.external],
            title=conversation.title,
            topic=conversation.description,
        )

    def message_created(self, conversation: Conversation, message: Message) -> None:
        self._pending.append(message_event(message))
        self.wake()

    def message_edited(self, conversation: Conversation, message: Message) -> None:
        assert message.author is not None and message.edited_at is not None
        self._publish(
            "message.edited",
            conversation.id,
            message.edited_at,
            message_id=message.id,
            sender=str(message.author),
            text=message.text,
            mentions=_mentions(message.mentions),
        )

    def message_deleted(self, conversation: Conversation, message: Message) -> None:
        assert message.author is not None and message.deleted_at is not None
        self._publish(
            "message.deleted",
            conversation.id,
            message.deleted_at,
            message_id=message.id,
            sender=str(message.author),
        )

    def reaction_added(self, conversation: Conversation, reaction: Reaction) -> None:
        assert reaction.author is not None
        self._publish(
            "reaction.added",
            conversation.id,
            reaction.created_at,
            reaction_id=reaction.id,
            message_id=reaction.message_id,
            sender=str(reaction.author),
            key=reaction.emoji,
        )

    def reaction_removed(self, conversation: Conversation, reaction: Reaction) -> None:
        assert reaction.author is not None and reaction.removed_at is not None
        self._publish(
            "reaction.removed",
            conversation.id,
            reaction.removed_at,
            reaction_id=reaction.id,
            message_id=reaction.message_id,
            sender=str(reaction.author),
        )

    def conversation_read(
        self, conversation: Conversation, reader: Idnps, up_to: Message, at: datetime
    ) -> None:
        self._publish("read", conversation.id, at, sender=str(reader), message_id=up_to.id)

    def typing_changed(
        self, conversation: Conversation, who: Idnps, typing: bool, at: datetime
    ) -> None:
        self._publish("typing", conversation.id, at, sender=str(who), typing=typing)

    def participants_added(
        self,
        conversation: Conversation,
        by: Idnps,
        members: tuple[Idnps, ...],
        external: tuple[External, ...],
        at: datetime,
    ) -> None:
        self._publish(
            "participants.added",
            conversation.id,
            at,
            sender=str(by),
            members=[str(m) for m in members],
            participants=[e.ref for e in external],
        )

    def participants_removed(
        self,
        conversation: Conversation,
        by: Idnps,
        members: tuple[Idnps, ...],
        external: tuple[External, ...],
        at: datetime,
    ) -> None:
        self._publish(
            "participants.removed",
            conversation.id,
            at,
            sender=str(by),
            members=[str(m) for m in members],
            participants=[e.ref for e in external],
        )

    def member_left(self, conversation: Conversation, who: Idnps, at: datetime) -> None:
        self._publish("member.left", conversation.id, at, sender=str(who))

    def conversation_updated(
        self, conversation: Conversation, by: Idnps, changes: Mapping[str, str | None], at: datetime
    ) -> None:
        if "title" in changes:
            self._publish(
                "conversation.renamed", conversation.id, at, sender=str(by), title=changes["title"]
            )
        if "description" in changes:
            self._publish(
                "conversation.topic",
                conversation.id,
                at,
                sender=str(by),
                topic=changes["description"],
            )

    def _publish(self, event_type: str, conversation_id: str, at: datetime, **fields: Any) -> None:
        event = {
            "id": str(uuid.uuid4()),
            "type": event_type,
            "conversation_id": conversation_id,
            "at": iso8601(at),
            **fields,
        }
        self._pending.append(event)
        self.wake()

    # Delivery -----------------------------------------------------------------------------------

    def _next_batch(self) -> _Batch:
        """The batch being delivered, or a new one from the queue: a lone event travels bare,
        several as ``{"events": [...]}`` (the contract allows both)."""
        if self._batch is None:
            events = [
                self._pending.popleft() for _ in range(min(self.batch_size, len(self._pending)))
            ]
            document: Any = events[0] if len(events) == 1 else {"events": events}
            body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
            self._batch = _Batch(str(uuid.uuid4()), body, len(events))
        return self._batch

    def next_delivery(self) -> Delivery | None:
        url = self.events_url
        if url is None or (self._batch is None and not self._pending):
            return None
        batch = self._next_batch()
        self.requests += 1
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": batch.key,
            **SIGNATURES.headers([self.secret()], batch.body, self.wall_clock()),
        }
        return Delivery(url, batch.body, headers, f"events: request of {batch.count} events")

    def delivered(self) -> None:
        assert self._batch is not None
        self.pushed += self._batch.count
        self._batch = None


_MESSAGE_EVENT_NAMESPACE = uuid.UUID("3f6f1d2e-0b7c-4e55-9a4e-6c1d8a2b7e90")


def message_event(message: Message) -> dict[str, Any]:
    """A vendor user's message as the ``message`` event, pushed and in the history alike (its
    event id derives from the message id, so both carry the same one)."""
    assert message.author is not None
    location = message.location
    return {
        "id": str(uuid.uuid5(_MESSAGE_EVENT_NAMESPACE, message.id)),
        "type": "message",
        "conversation_id": message.conversation_id,
        "at": iso8601(message.created_at),
        "message_id": message.id,
        "sender": str(message.author),
        "text": message.text,
        "kind": message.kind,
        "reply_to": message.reply_to,
        "mentions": _mentions(message.mentions),
        "attachment": attachment_json(message.attachment),
        "location": None
        if location is None
        else {
            "latitude": location.lat,
            "longitude": location.lon,
            "description": location.label,
        },
    }


def _mentions(mentions: Sequence[External]) -> list[dict[str, str]]:
    return [{"ref": m.ref, "display_name": m.display_name or m.ref} for m in mentions]


# --- The app -------------------------------------------------------------------------------------

PUSHER_KEY = web.AppKey("webhook_pusher", EventPusher)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    *,
    secrets: Sequence[str] = (SECRET,),
    users: Sequence[SandboxUser] = USERS,
    retry_initial: float = 0.2,
    retry_max: float = 10.0,
    batch_size: int = 20,
    delivery_timeout: float = 10.0,
    replay_window_s: int = REPLAY_WINDOW_S,
    wall_clock: Callable[[], float] = time.time,
    max_file_bytes: int = MAX_FILE_BYTES,
    files_dir: str | None = None,
) -> web.Application:
    """The webhook-contract sandbox app.

    ``secrets``: what it accepts from the bridge; it signs its own pushes with the first (a
    vendor mid-rotation lists the new one first and the old one after).
    """
    files = FileStore(files_dir)
    kernel = Kernel(
        users,
        vendor_name="Webhook sandbox",
        new_id=lambda _kind: str(uuid.uuid4()),
        file_rules=FileRules(max_bytes=max_file_bytes),
        files=files,
    )
    accepted = list(secrets)
    pusher = EventPusher(
        secret=lambda: accepted[0],
        wall_clock=wall_clock,
        batch_size=batch_size,
        retry_initial=retry_initial,
        retry_max=retry_max,
    )
    kernel.publisher = pusher
    keys = IdempotencyStore()
    app = new_sandbox_app(kernel, webhook_error)
    app[PUSHER_KEY] = pusher

    @web.middleware
    async def contract(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Signature, then idempotency, for every call of the contract (not the user side)."""
        if request.path.startswith(USER_API_PREFIX):
            return await handler(request)
        if request.path == "/files" and request.method == "POST":
            digest = request.headers.get("X-Eimis-Content-SHA256", "")
            if not _DIGEST.fullmatch(digest):
                raise bad_request("X-Eimis-Content-SHA256 (64 lower-case hex digits) is required.")
            payload = digest.encode()
        else:
            payload = await request.read()
            digest = hashlib.sha256(payload).hexdigest()
        check_signature(accepted, request.headers, payload, wall_clock(), replay_window_s)
        if request.method != "POST":
            return await handler(request)
        key = request.headers.get("Idempotency-Key", "")
        if not _KEY.fullmatch(key):
            raise bad_request("The Idempotency-Key header (1 to 255 visible ASCII) is required.")
        replay = keys.begin(request.path, key, digest)
        if replay is not None:
            return replay
        try:
            response = await handler(request)
        except BaseException:
            keys.abandon(request.path, key)
            raise
        keys.finish(request.path, key, response)
        return response

    app.middlewares.append(contract)
    routes = web.RouteTableDef()
    conv = "/conversations/{conversation_id}"
    msg = conv + "/messages/{message_id}"

    def key_of(request: web.Request) -> str:
        return request.headers["Idempotency-Key"]

    async def body(request: web.Request, model: type[M]) -> M:
        return parse_body(await request.read(), model)

    @routes.post("/bridge")
    async def announce(request: web.Request) -> web.Response:
        announcement = await body(request, AnnouncementBody)
        if not re.fullmatch(r"https?://[^\s/?#]+(/\S*)?", announcement.events_url):
            raise bad_request("events_url must be an absolute http:// or https:// URL.")
        pusher.announce(announcement.events_url)
        log.info("events URL announced by connector %s", announcement.connector_id)
        return web.Response(status=204)

    def user_json(user: SandboxUser) -> dict[str, Any]:
        return {
            "idnps": str(user.idnps),
            "given_name": user.given_name,
            "family_name": user.family_name,
            "profession": user.profession,
        }

    @routes.get("/users")
    async def list_users(request: web.Request) -> web.Response:
        # The cursor is opaque to the bridge; this sandbox uses the last IDNPS listed.
        users, cursor = query_user_page(request, kernel, "cursor")
        return web.json_response({"users": [user_json(u) for u in users], "next_cursor": cursor})

    @routes.get("/users/{idnps}")
    async def get_user(request: web.Request) -> web.Response:
        return web.json_response(user_json(kernel.user(request.match_info["idnps"])))

    @routes.post("/conversations")
    async def create_conversation(request: web.Request) -> web.Response:
        new = await body(request, NewConversationBody)
        external = [_person(p) for p in new.external]
        conversation, created = kernel.api_creates_conversation(
            key_of(request), new.title, new.members, external
        )
        return web.json_response(
            {"conversation_id": conversation.id}, status=201 if created else 200
        )

    @routes.post(conv + "/messages")
    async def send_message(request: web.Request) -> web.Response:
        message_body = await body(request, OutgoingMessageBody)
        attachment = None
        if message_body.attachment is not None:
            stored = kernel.api_file(message_body.attachment.file_id)
            attachment = lambda: stored  # noqa: E731
        place = message_body.location
        message, created = kernel.api_writes(
            key_of(request),
            request.match_info["conversation_id"],
            _person(message_body.sender),
            message_body.text,
            kind=message_body.kind,
            reply_to=message_body.reply_to,
            attachment=attachment,
            location=None
            if place is None
            else Location(place.latitude, place.longitude, place.description),
            mentions=[_person(m) for m in message_body.mentions],
        )
        return web.json_response({"message_id": message.id}, status=201 if created else 200)

    @routes.post(conv + "/participants")
    async def add_participants(request: web.Request) -> web.Response:
        change = await body(request, ParticipantsBody)
        kernel.api_adds_participants(
            request.match_info["conversation_id"],
            change.members,
            [_person(p) for p in change.external],
        )
        return web.Response(status=204)

    @routes.post(conv + "/participants/remove")
    async def remove_participants(request: web.Request) -> web.Response:
        change = await body(request, RemovedParticipantsBody)
        kernel.api_removes_participants(
            request.match_info["conversation_id"],
            change.members,
            [p.ref for p in change.external],
        )
        return web.Response(status=204)

    @routes.post(conv + "/title")
    async def set_title(request: web.Request) -> web.Response:
        change = await body(request, TitleBody)
        kernel.api_updates(request.match_info["conversation_id"], title=change.title)
        return web.Response(status=204)

    @routes.post(conv + "/topic")
    async def set_topic(request: web.Request) -> web.Response:
        change = await body(request, TopicBody)
        kernel.api_updates(request.match_info["conversation_id"], description=change.topic)
        return web.Response(status=204)

    @routes.post(conv + "/system")
    async def system_message(request: web.Request) -> web.Response:
        note = await body(request, SystemBody)
        kernel.api_system_message(key_of(request), request.match_info["conversation_id"], note.text)
        return web.Response(status=204)

    @routes.get(conv + "/messages")
    async def history(request: web.Request) -> web.Response:
        limit = query_int(request, "limit", DEFAULT_HISTORY, 1, MAX_HISTORY)
        since = query_time(request, "since")
        messages = kernel.api_history(
            request.match_info["conversation_id"], limit=limit, since=since
        )
        return web.json_response({"messages": [message_event(m) for m in messages]})

    @routes.post(msg + "/edit")
    async def edit_message(request: web.Request) -> web.Response:
        edit = await body(request, EditBody)
        kernel.api_edits(
            key_of(request),
            request.match_info["conversation_id"],
            request.match_info["message_id"],
            edit.text,
            [_person(m) for m in edit.mentions],
        )
        return web.Response(status=204)

    @routes.post(msg + "/delete")
    async def delete_message(request: web.Request) -> web.Response:
        await body(request, ActorBody)
        kernel.api_deletes(request.match_info["conversation_id"], request.match_info["message_id"])
        return web.Response(status=204)

    @routes.post(msg + "/reactions")
    async def add_reaction(request: web.Request) -> web.Response:
        reaction_body = await body(request, ReactionBody)
        reaction, created = kernel.api_reacts(
            key_of(request),
            request.match_info["conversation_id"],
            request.match_info["message_id"],
            _person(reaction_body.sender),
            reaction_body.key,
        )
        return web.json_response({"reaction_id": reaction.id}, status=201 if created else 200)

    @routes.post(msg + "/reactions/{reaction_id}/delete")
    async def remove_reaction(request: web.Request) -> web.Response:
        await body(request, ActorBody)
        kernel.api_unreacts(
            request.match_info["conversation_id"],
            request.match_info["message_id"],
            request.match_info["reaction_id"],
        )
        return web.Response(status=204)

    @routes.post(conv + "/read")
    async def mark_read(request: web.Request) -> web.Response:
        read = await body(request, ReadBody)
        kernel.api_reads(request.match_info["conversation_id"], _person(read.reader), read.up_to)
        return web.Response(status=204)

    @routes.post(conv + "/typing")
    async def set_typing(request: web.Request) -> web.Response:
        typing = await body(request, TypingBody)
        kernel.api_types(request.match_info["conversation_id"], _person(typing.who), typing.typing)
        return web.Response(status=204)

    @routes.post(msg + "/delivery")
    async def report_delivery(request: web.Request) -> web.Response:
        report = await body(request, DeliveryBody)
        kernel.api_reports_delivery(
            request.match_info["conversation_id"],
            request.match_info["message_id"],
            report.status,
            report.detail,
        )
        return web.Response(status=204)

    @routes.post("/files")
    async def upload(request: web.Request) -> web.Response:
        raw_name = request.headers.get("X-Eimis-Filename", "")
        try:
            name = sanitize_name(unquote(raw_name, errors="strict")) if raw_name else ""
        except UnicodeError:
            raise bad_request("X-Eimis-Filename is not percent-encoded UTF-8.") from None
        if not name:
            raise bad_request("X-Eimis-Filename (the file's name, percent-encoded) is required.")
        if request.content_length is None:
            raise SandboxError(411, "length_required", "Content-Length is required.")
        mime_type = parse_mime_type(request.headers.get("Content-Type", ""))
        stored = await files.receive(
            request.content,
            name=name,
            mime_type=mime_type,
            owner=None,
            max_bytes=max_file_bytes,
            too_large=file_too_large(max_file_bytes),
            declared_size=request.content_length,
        )
        if _file_digest(stored.path) != request.headers["X-Eimis-Content-SHA256"]:
            files.discard(stored)
            raise SandboxError(
                400, "digest_mismatch", "The bytes do not match X-Eimis-Content-SHA256."
            )
        files.add(stored)
        return web.json_response({"file_id": stored.id}, status=201)

    @routes.get("/files/{file_id}")
    async def download(request: web.Request) -> web.FileResponse:
        return file_response(kernel.api_file(request.match_info["file_id"]))

    app.add_routes(routes)

    app.cleanup_ctx.append(
        background_delivery(pusher.run, name="webhook-sandbox-events", timeout=delivery_timeout)
    )
    return app


def _file_digest(path: Any) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(256 * 1024), b""):
            sha.update(chunk)
    return sha.hexdigest()
