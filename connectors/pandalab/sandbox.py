"""The PandaLab-style sandbox: the vendor API of API.md (OAuth2, webhook push, uploads) on the
kernel."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import unquote_plus

from aiohttp import web
from pydantic import Field
from yarl import URL

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
    MAX_MENTIONS,
    UNSET,
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
    MAX_BODY_BYTES,
    Body,
    background_delivery,
    iso8601,
    query_int,
    query_time,
    query_user_page,
    read_body,
)

log = logging.getLogger("eimis.sandbox.pandalab")

CLIENT_ID = "eimis-bridge"
CLIENT_SECRET = "pandalab-sandbox-secret"
DEFAULT_TOKEN_LIFETIME = 3600.0

USERS: tuple[SandboxUser, ...] = (
    SandboxUser(Idnps("810000001916"), "Camille", "Martin", "Infirmier"),
    SandboxUser(Idnps("899700218896"), "Julien", "Bernard", "Médecin généraliste"),
    SandboxUser(Idnps("810000005479"), "Sophie", "Dubois", "Pharmacien"),
    SandboxUser(Idnps("810000012343"), "Léa", "Moreau", "Sage-femme"),
    SandboxUser(Idnps("810000023456"), "Thomas", "Lefèvre", "Masseur-kinésithérapeute"),
)
"""The sandbox's users (none of them is also a Medipeps sandbox user)."""

_USER_NAMESPACE = uuid.UUID("5a3c7f0e-8d1b-4f6a-9c2e-2b7d4e9f1a60")
_REALM = 'realm="PandaLab sandbox"'
MAX_KEY_LENGTH = 255
MAX_FILE_BYTES = 512 * 1024 * 1024
"""Largest file (512 MiB): a larger declared size is refused with 413 ``file_too_large``."""
MAX_ID_LENGTH = 64
DEFAULT_HISTORY = 50


def user_uuid(user: SandboxUser) -> str:
    """The user's PandaLab id: a UUID stable across sandbox restarts."""
    return str(uuid.uuid5(_USER_NAMESPACE, str(user.idnps)))


def pandalab_error(error: SandboxError) -> dict[str, Any]:
    return {"error": error.code, "message": error.message}


SIGNATURES = SignedWebhook("X-PandaLab-Timestamp", "X-PandaLab-Signature", max_signatures=1)
"""How the sandbox signs its webhooks: ``sha256=<hex HMAC-SHA256(secret, "<ts>.<body>")>``."""


def _same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


# --- OAuth2 tokens ----------------------------------------------------------------------------


class TokenIssuer:
    """Access tokens of the client-credentials grant, remembered only by their SHA-256."""

    def __init__(self, lifetime: float, clock: Callable[[], float]) -> None:
        self.lifetime = lifetime
        self._clock = clock
        self._expiry: dict[bytes, float] = {}

    def issue(self) -> str:
        now = self._clock()
        self._expiry = {h: t for h, t in self._expiry.items() if t > now}
        token = secrets.token_urlsafe(32)
        self._expiry[self._digest(token)] = now + self.lifetime
        return token

    def valid(self, token: str) -> bool:
        expiry = self._expiry.get(self._digest(token))
        return expiry is not None and self._clock() < expiry

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "replace")).digest()


# --- Webhook push -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    secret: str


@dataclass(frozen=True)
class FileUrl:
    """Where an event says a file can be downloaded; rendered to an absolute URL when the event
    is first sent (the API's origin is the one the bridge reaches the sandbox at)."""

    file_id: str


@dataclass
class PendingEvent:
    id: str
    type: str
    envelope: dict[str, Any]
    body: bytes | None = None


_MENTION_NAME_SPECIALS = re.compile(r"([\\\[\]])")


def markdown_with_mentions(text: str, mentions: Sequence[External]) -> str:
    """The user's text as PandaLab Markdown: each ``@Display Name`` of a mentioned person
    becomes ``@[Display Name](ref)`` (a backslash escapes ``\\``, ``[`` and ``]`` in the name)."""
    refs = {m.display_name: m.ref for m in mentions if m.display_name}
    if not refs:
        return text
    names = sorted(refs, key=len, reverse=True)  # "@Jean Dupont" before "@Jean"
    pattern = re.compile("@(" + "|".join(re.escape(n) for n in names) + r")(?!\w)")

    def markup(match: re.Match[str]) -> str:
        name = match.group(1)
        escaped = _MENTION_NAME_SPECIALS.sub(r"\\\1", name)
        return f"@[{escaped}]({refs[name]})"

    return pattern.sub(markup, text)


class WebhookPusher(Pusher):
    """Queues events and pushes them in order to the webhook, redelivering each until a 2xx.

    Events published before a webhook is registered wait for it. After a failed attempt the
    pusher waits ``retry_initial * 2**n`` seconds (at most ``retry_max``), or less when the
    webhook is registered again.
    """

    def __init__(
        self,
        *,
        retry_initial: float,
        retry_max: float,
        wall_clock: Callable[[], float] = time.time,
        file_url: Callable[[str], str] = lambda file_id: f"/api/v1/files/{file_id}",
    ) -> None:
        super().__init__(backoff=Backoff(retry_initial, retry_max, jitter=False), log=log)
        self.file_url = file_url
        self._wall_clock = wall_clock
        self._pending: deque[PendingEvent] = deque()
        self._target: WebhookTarget | None = None

    @property
    def target(self) -> WebhookTarget | None:
        return self._target

    def register(self, target: WebhookTarget) -> None:
        self._target = target
        self.interrupt()

    # EventPublisher -------------------------------------------------------------------------

    def conversation_created(self, conversation: Conversation) -> None:
        assert conversation.created_by is not None
        self._publish(
            "conversation.created",
            {
                "conversation": {
                    "id": conversation.id,
                    "title": conversation.title,
                    "description": conversation.description,
                    "created_by": str(conversation.created_by),
                    "members": [str(m) for m in conversation.members],
                    "external_participants": [{"ref": e.ref} for e in conversation.external],
                }
            },
        )

    def message_created(self, conversation: Conversation, message: Message) -> None:
        self._publish("message.created", {"message": message_json(message)})

    def message_edited(self, conversation: Conversation, message: Message) -> None:
        assert message.author is not None and message.edited_at is not None
        self._publish(
            "message.edited",
            {
                "message": {
                    "id": message.id,
                    "conversation_id": conversation.id,
                    "author": str(message.author),
                    "markdown": markdown_with_mentions(message.text, message.mentions),
                    "mentions": _mentions_json(message.mentions),
                    "edited_at": iso8601(message.edited_at),
                }
            },
        )

    def message_deleted(self, conversation: Conversation, message: Message) -> None:
        assert message.author is not None and message.deleted_at is not None
        self._publish(
            "message.deleted",
            {
                "message": {
                    "id": message.id,
                    "conversation_id": conversation.id,
                    "author": str(message.author),
                    "deleted_at": iso8601(message.deleted_at),
                }
            },
        )

    def reaction_added(self, conversation: Conversation, reaction: Reaction) -> None:
        self._publish("reaction.added", _reaction_json(reaction, reaction.created_at))

    def reaction_removed(self, conversation: Conversation, reaction: Reaction) -> None:
        assert reaction.removed_at is not None
        self._publish("reaction.removed", _reaction_json(reaction, reaction.removed_at))

    def conversation_read(
        self, conversation: Conversation, reader: Idnps, up_to: Message, at: datetime
    ) -> None:
        self._publish(
            "conversation.read",
            {
                "read": {
                    "conversation_id": conversation.id,
                    "reader": str(reader),
                    "up_to": up_to.id,
                    "at": iso8601(at),
                }
            },
        )

    def typing_changed(
        self, conversation: Conversation, who: Idnps, typing: bool, at: datetime
    ) -> None:
        self._publish(
            "conversation.typing",
            {
                "typing": {
                    "conversation_id": conversation.id,
                    "who": str(who),
                    "typing": typing,
                    "at": iso8601(at),
                }
            },
        )

    def participants_added(
        self,
        conversation: Conversation,
        by: Idnps,
        members: tuple[Idnps, ...],
        external: tuple[External, ...],
        at: datetime,
    ) -> None:
        self._publish(
            "conversation.participants_added",
            _participants_json(conversation, by, members, external),
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
            "conversation.participants_removed",
            _participants_json(conversation, by, members, external),
        )

    def member_left(self, conversation: Conversation, who: Idnps, at: datetime) -> None:
        self._publish(
            "conversation.member_left", {"conversation_id": conversation.id, "member": str(who)}
        )

    def conversation_updated(
        self, conversation: Conversation, by: Idnps, changes: Mapping[str, str | None], at: datetime
    ) -> None:
        self._publish(
            "conversation.updated",
            {"conversation_id": conversation.id, "by": str(by), **changes},
        )

    def _publish(self, event_type: str, data: dict[str, Any]) -> None:
        event_id = str(uuid.uuid4())
        envelope = {
            "id": event_id,
            "type": event_type,
            "created_at": iso8601(datetime.now(UTC)),
            "data": data,
        }
        self._pending.append(PendingEvent(event_id, event_type, envelope))
        self.wake()

    def _body(self, event: PendingEvent) -> bytes:
        """The event's JSON, rendered once (a redelivery sends the very same bytes)."""
        if event.body is None:

            def render(value: Any) -> str:
                if isinstance(value, FileUrl):
                    return self.file_url(value.file_id)
                raise TypeError(f"cannot render {type(value).__name__}")

            event.body = json.dumps(
                event.envelope, ensure_ascii=False, separators=(",", ":"), default=render
            ).encode()
        return event.body

    # Delivery -------------------------------------------------------------------------------

    def next_delivery(self) -> Delivery | None:
        target = self._target
        if not self._pending or target is None:
            return None
        event = self._pending[0]
        body = self._body(event)
        headers = {
            "Content-Type": "application/json",
            **SIGNATURES.headers([target.secret], body, self._wall_clock()),
        }
        return Delivery(target.url, body, headers, f"webhook: event {event.id} ({event.type})")

    def delivered(self) -> None:
        self._pending.popleft()


def message_json(message: Message) -> dict[str, Any]:
    """A message as ``message.created`` and the history show it (the file URL is rendered when
    the JSON is written)."""
    assert message.author is not None
    attachment = message.attachment
    location = message.location
    return {
        "id": message.id,
        "conversation_id": message.conversation_id,
        "author": str(message.author),
        "markdown": markdown_with_mentions(message.text, message.mentions),
        "created_at": iso8601(message.created_at),
        "kind": message.kind,
        "reply_to": message.reply_to,
        "mentions": _mentions_json(message.mentions),
        "attachment": None
        if attachment is None
        else {**attachment_json(attachment), "url": FileUrl(attachment.id)},
        "location": None
        if location is None
        else {"lat": location.lat, "lon": location.lon, "label": location.label},
    }


def conversation_json(conversation: Conversation) -> dict[str, Any]:
    """A conversation as the participant and update calls answer it."""
    return {
        "id": conversation.id,
        "title": conversation.title,
        "description": conversation.description,
        "members": [str(m) for m in conversation.members],
        "external_participants": [
            {"ref": e.ref, "display_name": e.display_name} for e in conversation.external
        ],
    }


def _participants_json(
    conversation: Conversation,
    by: Idnps,
    members: tuple[Idnps, ...],
    external: tuple[External, ...],
) -> dict[str, Any]:
    return {
        "conversation_id": conversation.id,
        "by": str(by),
        "members": [str(m) for m in members],
        "external_participants": [{"ref": e.ref} for e in external],
    }


def _mentions_json(mentions: Sequence[External]) -> list[dict[str, str]]:
    return [{"ref": m.ref, "display_name": m.display_name} for m in mentions]


def _reaction_json(reaction: Reaction, at: datetime) -> dict[str, Any]:
    assert reaction.author is not None
    return {
        "reaction": {
            "id": reaction.id,
            "message_id": reaction.message_id,
            "conversation_id": reaction.conversation_id,
            "author": str(reaction.author),
            "emoji": reaction.emoji,
            "created_at": iso8601(at),
        }
    }


# --- Uploads ----------------------------------------------------------------------------------


@dataclass
class Upload:
    """A file announced by ``POST /api/v1/uploads``, waiting for (or given) its bytes."""

    file_id: str
    name: str
    mime_type: str
    size: int
    state: Literal["pending", "receiving", "done"] = "pending"


# --- Request bodies ---------------------------------------------------------------------------


class ExternalBody(Body):
    ref: str = Field(max_length=255)
    display_name: str = Field(min_length=1, max_length=255)


class NewConversationBody(Body):
    title: str | None = Field(default=None, max_length=255)
    members: list[str] = Field(min_length=1, max_length=100)
    external_participants: list[ExternalBody] = Field(default_factory=list, max_length=100)


class AttachmentBody(Body):
    file_id: str = Field(max_length=MAX_ID_LENGTH)


class LocationBody(Body):
    lat: float
    lon: float
    label: str | None = Field(default=None, max_length=255)


class NewMessageBody(Body):
    sender: ExternalBody
    markdown: str | None = None
    kind: Literal["text", "notice", "emote"] = "text"
    reply_to: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    attachment: AttachmentBody | None = None
    location: LocationBody | None = None
    mentions: list[ExternalBody] = Field(default_factory=list, max_length=MAX_MENTIONS)


class EditBody(Body):
    markdown: str
    mentions: list[ExternalBody] = Field(default_factory=list, max_length=MAX_MENTIONS)


class ReactionBody(Body):
    sender: ExternalBody
    emoji: str = Field(max_length=64)


class ReadBody(Body):
    reader: ExternalBody
    up_to: str = Field(max_length=MAX_ID_LENGTH)


class TypingBody(Body):
    who: ExternalBody
    typing: bool


class DeliveryBody(Body):
    status: Literal["delivered", "degraded", "failed"]
    detail: str = Field(default="", max_length=1000)


class SystemMessageBody(Body):
    text: str


class NewParticipantsBody(Body):
    members: list[str] = Field(default_factory=list, max_length=100)
    external_participants: list[ExternalBody] = Field(default_factory=list, max_length=100)
    added_by: ExternalBody | None = None


class RemovedParticipantsBody(Body):
    members: list[str] = Field(default_factory=list, max_length=100)
    external_participants: list[str] = Field(default_factory=list, max_length=100)
    removed_by: ExternalBody | None = None


class ConversationUpdateBody(Body):
    """Only the keys present change; null clears."""

    title: str | None = Field(default=None, max_length=255)
    description: str | None = Field(default=None, max_length=4000)
    changed_by: ExternalBody


class UploadBody(Body):
    name: str = Field(min_length=1, max_length=1024)
    mime_type: str = Field(max_length=255)
    size: int = Field(ge=0)


class WebhookBody(Body):
    url: str = Field(max_length=2048)
    secret: str = Field(min_length=1, max_length=1024)


def _idempotency_key(request: web.Request, *, required: bool = True) -> str | None:
    key = request.headers.get("Idempotency-Key", "").strip()
    if not key:
        if required:
            raise bad_request("The Idempotency-Key header is required on this call.")
        return None
    if len(key) > MAX_KEY_LENGTH:
        raise bad_request(f"The Idempotency-Key header is longer than {MAX_KEY_LENGTH} characters.")
    return key


def _required_key(request: web.Request) -> str:
    key = _idempotency_key(request)
    assert key is not None
    return key


def _webhook_url(text: str) -> str:
    try:
        url = URL(text)
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise bad_request("The webhook url must be an absolute http:// or https:// URL.")
    return text


def _people(bodies: Sequence[ExternalBody]) -> list[External]:
    return [External(b.ref, b.display_name) for b in bodies]


def _origin(request: web.Request) -> str:
    try:
        return str(request.url.origin())
    except ValueError:
        return f"{request.scheme}://127.0.0.1"


# --- The app ----------------------------------------------------------------------------------


PUSHER_KEY = web.AppKey("pandalab_pusher", WebhookPusher)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    *,
    client_id: str = CLIENT_ID,
    client_secret: str = CLIENT_SECRET,
    token_lifetime: float = DEFAULT_TOKEN_LIFETIME,
    users: Sequence[SandboxUser] = USERS,
    retry_initial: float = 0.5,
    retry_max: float = 30.0,
    delivery_timeout: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    max_file_bytes: int = MAX_FILE_BYTES,
    files_dir: str | None = None,
    public_url: str | None = None,
) -> web.Application:
    """The PandaLab-style sandbox app.

    ``token_lifetime`` is in seconds, measured on ``clock`` (tests pass a fake clock);
    ``retry_initial``/``retry_max`` bound the webhook redelivery backoff, in seconds.
    Files are kept in a temporary directory under ``files_dir`` (the system's default when
    None), removed when the app is cleaned up. Upload and download URLs are on ``public_url``
    when given, else on the origin the API client last called the sandbox at.
    """
    files = FileStore(files_dir)
    kernel = Kernel(
        users,
        vendor_name="PandaLab",
        new_id=lambda _kind: str(uuid.uuid4()),
        file_rules=FileRules(max_bytes=max_file_bytes),
        files=files,
    )
    api_origin = [public_url.rstrip("/") if public_url else "http://127.0.0.1"]

    def file_url(file_id: str) -> str:
        return f"{api_origin[0]}/api/v1/files/{file_id}"

    def render_file_url(value: Any) -> str:
        if isinstance(value, FileUrl):
            return file_url(value.file_id)
        raise TypeError(f"cannot render {type(value).__name__}")

    pusher = WebhookPusher(retry_initial=retry_initial, retry_max=retry_max, file_url=file_url)
    kernel.publisher = pusher
    tokens = TokenIssuer(token_lifetime, clock)
    by_idnps = {user.idnps: user_uuid(user) for user in kernel.users.values()}
    uploads: dict[str, Upload] = {}
    upload_keys: dict[str, str] = {}

    app = new_sandbox_app(kernel, pandalab_error)
    app[PUSHER_KEY] = pusher

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/api/"):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _invalid_token("The Authorization: Bearer <access_token> header is missing.")
            if not tokens.valid(token.strip()):
                raise _invalid_token("The access token is unknown or expired; get a new one.")
            if public_url is None:
                api_origin[0] = _origin(request)
        return await handler(request)

    app.middlewares.append(require_token)
    routes = web.RouteTableDef()
    conv = "/api/v1/conversations/{conversation_id}"
    msg = conv + "/messages/{message_id}"

    @routes.post("/oauth/token")
    async def issue_token(request: web.Request) -> web.Response:
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise SandboxError(
                413, "body_too_large", f"The request body is larger than {MAX_BODY_BYTES} bytes."
            ) from None
        except ValueError:
            raise bad_request("The request body is not a valid form.") from None
        credentials = _client_credentials(request, form)
        if credentials is None:
            raise SandboxError(
                401,
                "invalid_client",
                "No client credentials: send client_id and client_secret as form fields "
                "(application/x-www-form-urlencoded) or with HTTP Basic.",
                {"WWW-Authenticate": f"Basic {_REALM}"},
            )
        given_id, given_secret = credentials
        id_ok = _same_secret(given_id, client_id)
        secret_ok = _same_secret(given_secret, client_secret)
        if not (id_ok and secret_ok):
            raise SandboxError(
                401,
                "invalid_client",
                "The client id or client secret is wrong.",
                {"WWW-Authenticate": f"Basic {_REALM}"},
            )
        grant = form.get("grant_type")
        if not grant:
            raise bad_request("The grant_type field is required (grant_type=client_credentials).")
        if grant != "client_credentials":
            raise SandboxError(
                400,
                "unsupported_grant_type",
                "Only grant_type=client_credentials is supported.",
            )
        token = tokens.issue()
        body = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": max(1, round(token_lifetime)),
        }
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    def user_json(user: SandboxUser) -> dict[str, Any]:
        return {
            "id": by_idnps[user.idnps],
            "idnps": str(user.idnps),
            "given_name": user.given_name,
            "family_name": user.family_name,
            "profession": user.profession,
        }

    @routes.get("/api/v1/users")
    async def list_users(request: web.Request) -> web.Response:
        users, after = query_user_page(request, kernel, "after")
        return web.json_response({"users": [user_json(u) for u in users], "next": after})

    @routes.get("/api/v1/users/{idnps}")
    async def get_user(request: web.Request) -> web.Response:
        return web.json_response(user_json(kernel.user(request.match_info["idnps"])))

    @routes.post("/api/v1/conversations")
    async def create_conversation(request: web.Request) -> web.Response:
        key = _required_key(request)
        body = await read_body(request, NewConversationBody)
        external = _people(body.external_participants)
        conversation, new = kernel.api_creates_conversation(key, body.title, body.members, external)
        return web.json_response(
            {"id": conversation.id, "created_at": iso8601(conversation.created_at)},
            status=201 if new else 200,
        )

    @routes.post(conv + "/participants")
    async def add_participants(request: web.Request) -> web.Response:
        _required_key(request)
        body = await read_body(request, NewParticipantsBody)
        conversation = kernel.api_adds_participants(
            request.match_info["conversation_id"],
            body.members,
            _people(body.external_participants),
        )
        return web.json_response(conversation_json(conversation))

    @routes.post(conv + "/participants/remove")
    async def remove_participants(request: web.Request) -> web.Response:
        body = await read_body(request, RemovedParticipantsBody)
        conversation = kernel.api_removes_participants(
            request.match_info["conversation_id"], body.members, body.external_participants
        )
        return web.json_response(conversation_json(conversation))

    @routes.patch(conv)
    async def update_conversation(request: web.Request) -> web.Response:
        body = await read_body(request, ConversationUpdateBody)
        given = body.model_fields_set
        conversation = kernel.api_updates(
            request.match_info["conversation_id"],
            title=body.title if "title" in given else UNSET,
            description=body.description if "description" in given else UNSET,
        )
        return web.json_response(conversation_json(conversation))

    @routes.get(conv + "/messages")
    async def history(request: web.Request) -> web.Response:
        limit = query_int(request, "limit", DEFAULT_HISTORY, 1, MAX_HISTORY)
        since = query_time(request, "since")
        messages = kernel.api_history(
            request.match_info["conversation_id"], limit=limit, since=since
        )
        return web.json_response(
            {"messages": [message_json(m) for m in messages]},
            dumps=lambda value: json.dumps(value, ensure_ascii=False, default=render_file_url),
        )

    @routes.post(conv + "/messages")
    async def post_message(request: web.Request) -> web.Response:
        key = _required_key(request)
        body = await read_body(request, NewMessageBody)
        attachment = None
        if body.attachment is not None:
            stored = kernel.api_file(body.attachment.file_id)
            attachment = lambda: stored  # noqa: E731
        location = None
        if body.location is not None:
            location = Location(body.location.lat, body.location.lon, body.location.label)
        message, new = kernel.api_writes(
            key,
            request.match_info["conversation_id"],
            External(body.sender.ref, body.sender.display_name),
            body.markdown or "",
            kind=body.kind,
            reply_to=body.reply_to,
            attachment=attachment,
            location=location,
            mentions=_people(body.mentions),
        )
        return web.json_response(
            {"id": message.id, "created_at": iso8601(message.created_at)},
            status=201 if new else 200,
        )

    @routes.patch(msg)
    async def edit_message(request: web.Request) -> web.Response:
        key = _required_key(request)
        body = await read_body(request, EditBody)
        message, edited_at = kernel.api_edits(
            key,
            request.match_info["conversation_id"],
            request.match_info["message_id"],
            body.markdown,
            _people(body.mentions),
        )
        return web.json_response({"id": message.id, "edited_at": iso8601(edited_at)})

    @routes.delete(msg)
    async def delete_message(request: web.Request) -> web.Response:
        kernel.api_deletes(request.match_info["conversation_id"], request.match_info["message_id"])
        return web.Response(status=204)

    @routes.post(msg + "/reactions")
    async def add_reaction(request: web.Request) -> web.Response:
        key = _required_key(request)
        body = await read_body(request, ReactionBody)
        reaction, new = kernel.api_reacts(
            key,
            request.match_info["conversation_id"],
            request.match_info["message_id"],
            External(body.sender.ref, body.sender.display_name),
            body.emoji,
        )
        return web.json_response({"id": reaction.id}, status=201 if new else 200)

    @routes.delete(msg + "/reactions/{reaction_id}")
    async def remove_reaction(request: web.Request) -> web.Response:
        kernel.api_unreacts(
            request.match_info["conversation_id"],
            request.match_info["message_id"],
            request.match_info["reaction_id"],
        )
        return web.Response(status=204)

    @routes.post(conv + "/read")
    async def mark_read(request: web.Request) -> web.Response:
        body = await read_body(request, ReadBody)
        reader = External(body.reader.ref, body.reader.display_name)
        kernel.api_reads(request.match_info["conversation_id"], reader, body.up_to)
        return web.Response(status=204)

    @routes.post(conv + "/typing")
    async def set_typing(request: web.Request) -> web.Response:
        body = await read_body(request, TypingBody)
        who = External(body.who.ref, body.who.display_name)
        kernel.api_types(request.match_info["conversation_id"], who, body.typing)
        return web.Response(status=204)

    @routes.post(conv + "/system-messages")
    async def post_system_message(request: web.Request) -> web.Response:
        key = _required_key(request)
        body = await read_body(request, SystemMessageBody)
        message, new = kernel.api_system_message(
            key, request.match_info["conversation_id"], body.text
        )
        return web.json_response(
            {"id": message.id, "created_at": iso8601(message.created_at)},
            status=201 if new else 200,
        )

    @routes.post(msg + "/delivery")
    async def report_delivery(request: web.Request) -> web.Response:
        body = await read_body(request, DeliveryBody)
        kernel.api_reports_delivery(
            request.match_info["conversation_id"],
            request.match_info["message_id"],
            body.status,
            body.detail,
        )
        return web.Response(status=204)

    @routes.post("/api/v1/uploads")
    async def create_upload(request: web.Request) -> web.Response:
        key = _idempotency_key(request, required=False)
        body = await read_body(request, UploadBody)
        mime_type = parse_mime_type(body.mime_type)
        if body.size > max_file_bytes:
            raise file_too_large(max_file_bytes)
        existing = upload_keys.get(key) if key is not None else None
        if existing is not None:
            upload = uploads[existing]
        else:
            upload = Upload(files.new_id(), sanitize_name(body.name), mime_type, body.size)
            uploads[upload.file_id] = upload
            if key is not None:
                upload_keys[key] = upload.file_id
        base = public_url.rstrip("/") if public_url else _origin(request)
        return web.json_response(
            {"file_id": upload.file_id, "upload_url": f"{base}/api/v1/uploads/{upload.file_id}"},
            status=200 if existing is not None else 201,
        )

    @routes.put("/api/v1/uploads/{file_id}")
    async def receive_upload(request: web.Request) -> web.Response:
        upload = uploads.get(request.match_info["file_id"])
        if upload is None:
            raise SandboxError(
                404,
                "file_not_found",
                "No upload has this id; create one with POST /api/v1/uploads.",
            )
        if upload.state != "pending":
            raise SandboxError(
                409,
                "upload_conflict",
                "This file is already uploaded."
                if upload.state == "done"
                else "This file is being uploaded by another request.",
            )
        mismatch = SandboxError(
            400,
            "size_mismatch",
            f"The body must be exactly the {upload.size} bytes declared for this upload.",
        )
        declared = request.content_length
        if declared is not None and declared != upload.size:
            raise mismatch
        upload.state = "receiving"
        try:
            stored = await files.receive(
                request.content,
                name=upload.name,
                mime_type=upload.mime_type,
                owner=None,
                max_bytes=upload.size,
                too_large=mismatch,
                file_id=upload.file_id,
            )
            if stored.size != upload.size:
                files.discard(stored)
                raise mismatch
        except BaseException:
            upload.state = "pending"
            raise
        files.add(stored)
        upload.state = "done"
        log.debug("upload: file %s stored (%d bytes)", stored.id, stored.size)
        return web.Response(status=204)

    @routes.get("/api/v1/files/{file_id}")
    async def download(request: web.Request) -> web.FileResponse:
        return file_response(kernel.api_file(request.match_info["file_id"]))

    @routes.put("/api/v1/webhook")
    async def set_webhook(request: web.Request) -> web.Response:
        body = await read_body(request, WebhookBody)
        pusher.register(WebhookTarget(_webhook_url(body.url), body.secret))
        return web.json_response({"url": body.url})

    app.add_routes(routes)

    app.cleanup_ctx.append(
        background_delivery(pusher.run, name="pandalab-sandbox-webhook", timeout=delivery_timeout)
    )
    return app


def _invalid_token(message: str) -> SandboxError:
    return SandboxError(
        401,
        "invalid_token",
        message,
        {"WWW-Authenticate": f'Bearer {_REALM}, error="invalid_token"'},
    )


def _client_credentials(request: web.Request, form: Any) -> tuple[str, str] | None:
    """Client id and secret from HTTP Basic, else from the form body; None when absent."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return "", ""  # present but unreadable: wrong credentials
        given_id, _, given_secret = decoded.partition(":")
        return unquote_plus(given_id), unquote_plus(given_secret)
    given_id = form.get("client_id")
    given_secret = form.get("client_secret")
    if given_id is None and given_secret is None:
        return None
    if not isinstance(given_id, str) or not isinstance(given_secret, str):
        return "", ""
    return given_id, given_secret
