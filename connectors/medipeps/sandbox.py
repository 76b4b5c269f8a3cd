"""The Medipeps-style sandbox: the vendor API of API.md (API key, polled events feed)."""

from __future__ import annotations

import hmac
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from pydantic import Field

from bridge.directory.idnps import Idnps
from connectors.sandbox.app import new_sandbox_app
from connectors.sandbox.kernel import (
    Conversation,
    External,
    IdKind,
    Kernel,
    Message,
    SandboxError,
    SandboxUser,
    bad_request,
)
from connectors.sandbox.webtools import Body, epoch_ms, read_body

API_KEY = "medipeps-sandbox-key"
MAX_EVENTS_LIMIT = 500
DEFAULT_EVENTS_LIMIT = 100

USERS: tuple[SandboxUser, ...] = (
    SandboxUser(Idnps("810000034560"), "Nathalie", "Girard", "Médecin généraliste"),
    SandboxUser(Idnps("810000045673"), "Pierre", "Roux", "Infirmier"),
    SandboxUser(Idnps("810000056787"), "Chloé", "Fournier", "Sage-femme"),
    SandboxUser(Idnps("810000067891"), "Antoine", "Mercier", "Pharmacien"),
    SandboxUser(Idnps("810000078906"), "Manon", "Lambert", "Masseur-kinésithérapeute"),
)
"""The sandbox's users (none of them is also a PandaLab sandbox user)."""

_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
}


def medipeps_error(error: SandboxError) -> dict[str, Any]:
    return {"code": _CODES.get(error.status, "ERROR"), "detail": error.message}


class EventFeed:
    """The kept, ordered events feed (``seq`` 1, 2, ...) that the bridge polls with a cursor."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def read(self, after: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """Events with ``seq > after`` (at most ``limit``), and the cursor to read from next."""
        events = self._events[after : after + limit]
        return events, (events[-1]["seq"] if events else after)

    # EventPublisher -------------------------------------------------------------------------

    def conversation_created(self, conversation: Conversation) -> None:
        assert conversation.created_by is not None
        self._append(
            "NEW_CONV",
            epoch_ms(conversation.created_at),
            conv={
                "conv": int(conversation.id),
                "subject": conversation.title,
                "owner": str(conversation.created_by),
                "participants": [str(m) for m in conversation.members],
                "guests": [{"ref": e.ref} for e in conversation.external],
            },
        )

    def message_created(self, conversation: Conversation, message: Message) -> None:
        assert message.author is not None
        at = epoch_ms(message.created_at)
        self._append(
            "NEW_MSG",
            at,
            msg={
                "msg": int(message.id),
                "conv": int(conversation.id),
                "author": str(message.author),
                "body": message.text,
                "at": at,
            },
        )

    def _append(self, event_type: str, at: int, **payload: Any) -> None:
        self._events.append({"seq": len(self._events) + 1, "type": event_type, "at": at, **payload})


class GuestBody(Body):
    ref: str = Field(max_length=255)
    label: str = Field(min_length=1, max_length=255)


class NewConversationBody(Body):
    subject: str | None = Field(default=None, max_length=255)
    participants: list[str] = Field(min_length=1, max_length=100)
    guests: list[GuestBody] = Field(default_factory=list, max_length=100)
    request_ref: str = Field(min_length=1, max_length=255)


class NewMessageBody(Body):
    author_ref: str = Field(max_length=255)
    author_label: str = Field(min_length=1, max_length=255)
    body: str
    request_ref: str = Field(min_length=1, max_length=255)


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise bad_request(f"The query parameter '{name}' must be a non-negative integer.")
    value = int(raw)
    if not low <= value <= high:
        raise bad_request(f"The query parameter '{name}' must be between {low} and {high}.")
    return value


def _conv_id(request: web.Request) -> str:
    raw = request.match_info["conv"]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise SandboxError(
            404, "conversation_not_found", f"No conversation has the id {raw[:40]!r}."
        )
    return str(int(raw))


FEED_KEY = web.AppKey("medipeps_feed", EventFeed)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(*, api_key: str = API_KEY, users: Sequence[SandboxUser] = USERS) -> web.Application:
    """The Medipeps-style sandbox app; every ``/mp/*`` call needs ``X-Api-Key: <api_key>``."""
    counters: dict[IdKind, itertools.count[int]] = {
        "conversation": itertools.count(1),
        "message": itertools.count(1),
    }
    kernel = Kernel(users, vendor_name="Medipeps", new_id=lambda kind: str(next(counters[kind])))
    feed = EventFeed()
    kernel.publisher = feed
    expected_key = api_key.encode()

    app = new_sandbox_app(kernel, medipeps_error)
    app[FEED_KEY] = feed

    @web.middleware
    async def require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/mp/"):
            given = request.headers.get("X-Api-Key")
            if given is None:
                raise SandboxError(403, "forbidden", "The X-Api-Key header is missing.")
            if not hmac.compare_digest(given.encode("utf-8", "replace"), expected_key):
                raise SandboxError(403, "forbidden", "The X-Api-Key header holds a wrong key.")
        return await handler(request)

    app.middlewares.append(require_api_key)
    routes = web.RouteTableDef()

    @routes.get("/mp/professionals/{idnps}")
    async def get_professional(request: web.Request) -> web.Response:
        user = kernel.user(request.match_info["idnps"])
        return web.json_response(
            {
                "idnps": str(user.idnps),
                "first": user.given_name,
                "last": user.family_name,
                "job": user.profession,
            }
        )

    @routes.post("/mp/conversations")
    async def create_conversation(request: web.Request) -> web.Response:
        body = await read_body(request, NewConversationBody)
        guests = [External(g.ref, g.label) for g in body.guests]
        conversation, _ = kernel.api_creates_conversation(
            body.request_ref, body.subject, body.participants, guests
        )
        return web.json_response({"conv": int(conversation.id)})

    @routes.post("/mp/conversations/{conv}/messages")
    async def post_message(request: web.Request) -> web.Response:
        conv = _conv_id(request)
        body = await read_body(request, NewMessageBody)
        author = External(body.author_ref, body.author_label)
        message, _ = kernel.api_writes(body.request_ref, conv, author, body.body)
        return web.json_response({"msg": int(message.id), "at": epoch_ms(message.created_at)})

    @routes.get("/mp/events")
    async def events(request: web.Request) -> web.Response:
        after = _int_query(request, "after", 0, 0, 2**62)
        limit = _int_query(request, "limit", DEFAULT_EVENTS_LIMIT, 1, MAX_EVENTS_LIMIT)
        page, cursor = feed.read(after, limit)
        return web.json_response({"events": page, "cursor": cursor})

    app.add_routes(routes)
    return app
