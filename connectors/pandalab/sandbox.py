"""The PandaLab-style sandbox: the vendor API of API.md (OAuth2, webhook push) on the kernel."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import web
from pydantic import Field
from yarl import URL

from bridge.directory.idnps import Idnps
from connectors.sandbox.app import new_sandbox_app
from connectors.sandbox.kernel import (
    Conversation,
    External,
    Kernel,
    Message,
    SandboxError,
    SandboxUser,
    bad_request,
)
from connectors.sandbox.webtools import MAX_BODY_BYTES, Body, iso8601, read_body

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


def user_uuid(user: SandboxUser) -> str:
    """The user's PandaLab id: a UUID stable across sandbox restarts."""
    return str(uuid.uuid5(_USER_NAMESPACE, str(user.idnps)))


def pandalab_error(error: SandboxError) -> dict[str, Any]:
    return {"error": error.code, "message": error.message}


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-PandaLab-Signature`` value: ``sha256=<hex HMAC-SHA256(secret, "<ts>.<body>")>``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


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
class PendingEvent:
    id: str
    type: str
    body: bytes


class WebhookPusher:
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
    ) -> None:
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._wall_clock = wall_clock
        self._pending: deque[PendingEvent] = deque()
        self._target: WebhookTarget | None = None
        self._work = asyncio.Event()
        self._target_changed = asyncio.Event()

    @property
    def target(self) -> WebhookTarget | None:
        return self._target

    def register(self, target: WebhookTarget) -> None:
        self._target = target
        self._target_changed.set()
        self._work.set()

    # EventPublisher -------------------------------------------------------------------------

    def conversation_created(self, conversation: Conversation) -> None:
        assert conversation.created_by is not None
        self._publish(
            "conversation.created",
            {
                "conversation": {
                    "id": conversation.id,
                    "title": conversation.title,
                    "created_by": str(conversation.created_by),
                    "members": [str(m) for m in conversation.members],
                    "external_participants": [{"ref": e.ref} for e in conversation.external],
                }
            },
        )

    def message_created(self, conversation: Conversation, message: Message) -> None:
        assert message.author is not None
        self._publish(
            "message.created",
            {
                "message": {
                    "id": message.id,
                    "conversation_id": conversation.id,
                    "author": str(message.author),
                    "markdown": message.text,
                    "created_at": iso8601(message.created_at),
                }
            },
        )

    def _publish(self, event_type: str, data: dict[str, Any]) -> None:
        event_id = str(uuid.uuid4())
        envelope = {
            "id": event_id,
            "type": event_type,
            "created_at": iso8601(datetime.now(UTC)),
            "data": data,
        }
        body = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()
        self._pending.append(PendingEvent(event_id, event_type, body))
        self._work.set()

    # Delivery -------------------------------------------------------------------------------

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Deliver forever (until cancelled)."""
        failures = 0
        while True:
            target = self._target
            if not self._pending or target is None:
                self._work.clear()
                await self._work.wait()
                continue
            event = self._pending[0]
            if await self._deliver(session, target, event, failures + 1):
                self._pending.popleft()
                failures = 0
                continue
            failures += 1
            delay = min(self.retry_max, self.retry_initial * 2 ** min(failures - 1, 30))
            self._target_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._target_changed.wait(), delay)
                failures = 0

    async def _deliver(
        self,
        session: aiohttp.ClientSession,
        target: WebhookTarget,
        event: PendingEvent,
        attempt: int,
    ) -> bool:
        timestamp = str(int(self._wall_clock()))
        headers = {
            "Content-Type": "application/json",
            "X-PandaLab-Timestamp": timestamp,
            "X-PandaLab-Signature": sign(target.secret, timestamp, event.body),
        }
        try:
            async with session.post(
                target.url, data=event.body, headers=headers, allow_redirects=False
            ) as resp:
                delivered = 200 <= resp.status < 300
                status = str(resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            delivered, status = False, type(exc).__name__
        if delivered:
            log.debug("webhook: event %s (%s) delivered", event.id, event.type)
        else:
            log.info(
                "webhook: event %s (%s) attempt %d not acknowledged (%s); will retry",
                event.id,
                event.type,
                attempt,
                status,
            )
        return delivered


# --- Request bodies ---------------------------------------------------------------------------


class ExternalBody(Body):
    ref: str = Field(max_length=255)
    display_name: str = Field(min_length=1, max_length=255)


class NewConversationBody(Body):
    title: str | None = Field(default=None, max_length=255)
    members: list[str] = Field(min_length=1, max_length=100)
    external_participants: list[ExternalBody] = Field(default_factory=list, max_length=100)


class NewMessageBody(Body):
    sender: ExternalBody
    markdown: str


class WebhookBody(Body):
    url: str = Field(max_length=2048)
    secret: str = Field(min_length=1, max_length=1024)


def _idempotency_key(request: web.Request) -> str:
    key = request.headers.get("Idempotency-Key", "").strip()
    if not key:
        raise bad_request("The Idempotency-Key header is required on this call.")
    if len(key) > MAX_KEY_LENGTH:
        raise bad_request(f"The Idempotency-Key header is longer than {MAX_KEY_LENGTH} characters.")
    return key


def _webhook_url(text: str) -> str:
    try:
        url = URL(text)
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise bad_request("The webhook url must be an absolute http:// or https:// URL.")
    return text


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
) -> web.Application:
    """The PandaLab-style sandbox app.

    ``token_lifetime`` is in seconds, measured on ``clock`` (tests pass a fake clock);
    ``retry_initial``/``retry_max`` bound the webhook redelivery backoff, in seconds.
    """
    kernel = Kernel(users, vendor_name="PandaLab", new_id=lambda _kind: str(uuid.uuid4()))
    pusher = WebhookPusher(retry_initial=retry_initial, retry_max=retry_max)
    kernel.publisher = pusher
    tokens = TokenIssuer(token_lifetime, clock)
    by_idnps = {user.idnps: user_uuid(user) for user in kernel.users.values()}

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
        return await handler(request)

    app.middlewares.append(require_token)
    routes = web.RouteTableDef()

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

    @routes.get("/api/v1/users/{idnps}")
    async def get_user(request: web.Request) -> web.Response:
        user = kernel.user(request.match_info["idnps"])
        return web.json_response(
            {
                "id": by_idnps[user.idnps],
                "idnps": str(user.idnps),
                "given_name": user.given_name,
                "family_name": user.family_name,
                "profession": user.profession,
            }
        )

    @routes.post("/api/v1/conversations")
    async def create_conversation(request: web.Request) -> web.Response:
        key = _idempotency_key(request)
        body = await read_body(request, NewConversationBody)
        external = [External(p.ref, p.display_name) for p in body.external_participants]
        conversation, new = kernel.api_creates_conversation(key, body.title, body.members, external)
        return web.json_response(
            {"id": conversation.id, "created_at": iso8601(conversation.created_at)},
            status=201 if new else 200,
        )

    @routes.post("/api/v1/conversations/{conversation_id}/messages")
    async def post_message(request: web.Request) -> web.Response:
        key = _idempotency_key(request)
        body = await read_body(request, NewMessageBody)
        sender = External(body.sender.ref, body.sender.display_name)
        message, new = kernel.api_writes(
            key, request.match_info["conversation_id"], sender, body.markdown
        )
        return web.json_response(
            {"id": message.id, "created_at": iso8601(message.created_at)},
            status=201 if new else 200,
        )

    @routes.put("/api/v1/webhook")
    async def set_webhook(request: web.Request) -> web.Response:
        body = await read_body(request, WebhookBody)
        pusher.register(WebhookTarget(_webhook_url(body.url), body.secret))
        return web.json_response({"url": body.url})

    app.add_routes(routes)

    async def delivery(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=delivery_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            task = asyncio.create_task(pusher.run(session), name="pandalab-sandbox-webhook")
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(delivery)
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
