"""The Medipeps-style sandbox: the vendor API of API.md (API key, polled events feed, inline
files) on the kernel. Medipeps-style has no edits, reactions, typing, locations or conversation
descriptions, and its users cannot remove others from a conversation."""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import Field

from connectors.idnps import Idnps
from connectors.sandbox.app import new_sandbox_app
from connectors.sandbox.errors import SandboxError, bad_request, file_too_large
from connectors.sandbox.files import FileStore, StoredFile, sanitize_name
from connectors.sandbox.kernel import (
    MAX_TEXT_BYTES,
    AttachmentSource,
    Conversation,
    External,
    FileRules,
    IdKind,
    Kernel,
    Message,
    Reaction,
    SandboxUser,
)
from connectors.sandbox.webtools import Body, epoch_ms, query_int, query_user_page, read_body

API_KEY = "medipeps-sandbox-key"
MAX_EVENTS_LIMIT = 500
DEFAULT_EVENTS_LIMIT = 100

MAX_FILE_BYTES = 1024 * 1024
"""Largest inline file, decoded (1 MiB)."""
FILE_MIME_TYPES = frozenset({"image/jpeg", "image/png", "application/pdf"})
MAX_FILE_B64_CHARS = 4 * ((MAX_FILE_BYTES + 2) // 3)
MAX_MESSAGE_BODY_BYTES = MAX_FILE_B64_CHARS + 3 * MAX_TEXT_BYTES + 64 * 1024
"""A message body may carry an inline file: room for its base64 and the longest text."""
FEED_PAGE_INLINE_BUDGET = 8 * 1024 * 1024
"""A feed page stops early (but holds at least one event) once its inline files reach this many
base64 characters, so no page is hundreds of megabytes."""

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
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    416: "RANGE_NOT_SATISFIABLE",
    501: "NOT_IMPLEMENTED",
}


def medipeps_error(error: SandboxError) -> dict[str, Any]:
    return {"code": _CODES.get(error.status, "ERROR"), "detail": error.message}


@dataclass(frozen=True)
class _Stored:
    """A kept feed event; an inline file is read from disk only when a page is served."""

    event: dict[str, Any]
    file: StoredFile | None = None


class EventFeed:
    """The kept, ordered events feed (``seq`` 1, 2, ...) that the bridge polls with a cursor."""

    def __init__(self, files: FileStore | None = None) -> None:
        self._files = files or FileStore()
        self._events: list[_Stored] = []

    def read(self, after: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """Events with ``seq > after`` (at most ``limit``, fewer once the page's inline files
        reach ``FEED_PAGE_INLINE_BUDGET``), and the cursor to read from next."""
        page: list[dict[str, Any]] = []
        inline = 0
        for stored in self._events[after : after + limit]:
            if stored.file is None:
                page.append(stored.event)
                continue
            if page and inline >= FEED_PAGE_INLINE_BUDGET:
                break
            data = base64.b64encode(self._files.read_bytes(stored.file)).decode("ascii")
            inline += len(data)
            msg = dict(stored.event["msg"])
            msg["attachment"] = {**msg["attachment"], "data_b64": data}
            page.append({**stored.event, "msg": msg})
        return page, (page[-1]["seq"] if page else after)

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
        self._append(
            "NEW_MSG", epoch_ms(message.created_at), file=message.attachment, msg=msg_json(message)
        )

    def message_deleted(self, conversation: Conversation, message: Message) -> None:
        assert message.author is not None and message.deleted_at is not None
        self._append(
            "DEL_MSG",
            epoch_ms(message.deleted_at),
            msg={
                "msg": int(message.id),
                "conv": int(conversation.id),
                "author": str(message.author),
            },
        )

    def conversation_read(
        self, conversation: Conversation, reader: Idnps, up_to: Message, at: datetime
    ) -> None:
        self._append(
            "READ",
            epoch_ms(at),
            read={"conv": int(conversation.id), "reader": str(reader), "up_to": int(up_to.id)},
        )

    def participants_added(
        self,
        conversation: Conversation,
        by: Idnps,
        members: tuple[Idnps, ...],
        external: tuple[External, ...],
        at: datetime,
    ) -> None:
        self._append(
            "ADD_PART",
            epoch_ms(at),
            part={
                "conv": int(conversation.id),
                "by": str(by),
                "participants": [str(m) for m in members],
                "guests": [{"ref": e.ref} for e in external],
            },
        )

    def member_left(self, conversation: Conversation, who: Idnps, at: datetime) -> None:
        self._append("LEAVE", epoch_ms(at), leave={"conv": int(conversation.id), "who": str(who)})

    def conversation_updated(
        self, conversation: Conversation, by: Idnps, changes: Mapping[str, str | None], at: datetime
    ) -> None:
        assert set(changes) == {"title"}, "Medipeps-style has no descriptions"
        self._append(
            "SUBJECT",
            epoch_ms(at),
            subject={"conv": int(conversation.id), "by": str(by), "subject": changes["title"]},
        )

    # Medipeps-style has no edits, reactions, typing, descriptions, and no removal of others: the
    # kernel never publishes them here.

    def participants_removed(
        self,
        conversation: Conversation,
        by: Idnps,
        members: tuple[Idnps, ...],
        external: tuple[External, ...],
        at: datetime,
    ) -> None:
        raise AssertionError("Medipeps-style users cannot remove others")

    def message_edited(self, conversation: Conversation, message: Message) -> None:
        raise AssertionError("Medipeps-style has no edits")

    def reaction_added(self, conversation: Conversation, reaction: Reaction) -> None:
        raise AssertionError("Medipeps-style has no reactions")

    def reaction_removed(self, conversation: Conversation, reaction: Reaction) -> None:
        raise AssertionError("Medipeps-style has no reactions")

    def typing_changed(
        self, conversation: Conversation, who: Idnps, typing: bool, at: datetime
    ) -> None:
        raise AssertionError("Medipeps-style has no typing notifications")

    def _append(
        self, event_type: str, at: int, file: StoredFile | None = None, **payload: Any
    ) -> None:
        event = {"seq": len(self._events) + 1, "type": event_type, "at": at, **payload}
        self._events.append(_Stored(event, file))


def msg_json(message: Message) -> dict[str, Any]:
    """A message as ``NEW_MSG`` shows it (without the inline file's bytes)."""
    assert message.author is not None
    attachment = message.attachment
    return {
        "msg": int(message.id),
        "conv": int(message.conversation_id),
        "author": str(message.author),
        "body": message.text,
        "at": epoch_ms(message.created_at),
        "reply_to": None if message.reply_to is None else int(message.reply_to),
        "attachment": None
        if attachment is None
        else {"filename": attachment.name, "mime": attachment.mime_type, "size": attachment.size},
    }


def conversation_json(conversation: Conversation) -> dict[str, Any]:
    """A conversation as the participant and subject calls answer it."""
    return {
        "conv": int(conversation.id),
        "subject": conversation.title,
        "participants": [str(m) for m in conversation.members],
        "guests": [{"ref": e.ref, "label": e.display_name} for e in conversation.external],
    }


class GuestBody(Body):
    ref: str = Field(max_length=255)
    label: str = Field(min_length=1, max_length=255)


class NewConversationBody(Body):
    subject: str | None = Field(default=None, max_length=255)
    participants: list[str] = Field(min_length=1, max_length=100)
    guests: list[GuestBody] = Field(default_factory=list, max_length=100)
    request_ref: str = Field(min_length=1, max_length=255)


class InlineFileBody(Body):
    filename: str = Field(min_length=1, max_length=1024)
    mime: str = Field(max_length=255)
    data_b64: str


class NewMessageBody(Body):
    author_ref: str = Field(max_length=255)
    author_label: str = Field(min_length=1, max_length=255)
    body: str | None = None
    request_ref: str = Field(min_length=1, max_length=255)
    reply_to: int | None = Field(default=None, ge=0)
    attachment: InlineFileBody | None = None


class ReadBody(Body):
    reader_ref: str = Field(max_length=255)
    up_to: int = Field(ge=0)


class NewParticipantsBody(Body):
    participants: list[str] = Field(default_factory=list, max_length=100)
    guests: list[GuestBody] = Field(default_factory=list, max_length=100)
    by_ref: str | None = Field(default=None, max_length=255)
    request_ref: str = Field(min_length=1, max_length=255)


class GuestsLeaveBody(Body):
    refs: list[str] = Field(min_length=1, max_length=100)
    request_ref: str = Field(min_length=1, max_length=255)


class SubjectBody(Body):
    subject: str | None = Field(max_length=255)
    by_ref: str = Field(max_length=255)


class StatusBody(Body):
    status: Literal["delivered", "degraded", "failed"]
    detail: str = Field(default="", max_length=1000)


RULES = FileRules(max_bytes=MAX_FILE_BYTES, mime_types=FILE_MIME_TYPES)


def decode_inline_file(attachment: InlineFileBody) -> bytes:
    """The file's bytes, checked: 415 for a MIME type Medipeps refuses, 413 over 1 MiB decoded,
    400 for data that is not standard base64."""
    mime = _mime(attachment.mime)
    RULES.check(0, mime)
    encoded = "".join(attachment.data_b64.split())  # tolerate wrapped lines
    if len(encoded) > MAX_FILE_B64_CHARS:
        raise file_too_large(MAX_FILE_BYTES)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("attachment.data_b64 is not valid standard base64.") from None
    RULES.check(len(data), mime)
    return data


def _mime(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def _path_id(request: web.Request, name: str, what: str) -> str:
    raw = request.match_info[name]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise SandboxError(404, f"{what}_not_found", f"No {what} has the id {raw[:40]!r}.")
    return str(int(raw))


def _conv_id(request: web.Request) -> str:
    return _path_id(request, "conv", "conversation")


FEED_KEY = web.AppKey("medipeps_feed", EventFeed)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    *,
    api_key: str = API_KEY,
    users: Sequence[SandboxUser] = USERS,
    files_dir: str | None = None,
) -> web.Application:
    """The Medipeps-style sandbox app; every ``/mp/*`` call needs ``X-Api-Key: <api_key>``.

    Files are kept in a temporary directory under ``files_dir`` (the system's default when
    None), removed when the app is cleaned up.
    """
    counters: dict[IdKind, itertools.count[int]] = {
        "conversation": itertools.count(1),
        "message": itertools.count(1),
        "reaction": itertools.count(1),
    }
    files = FileStore(files_dir)
    kernel = Kernel(
        users,
        vendor_name="Medipeps",
        new_id=lambda kind: str(next(counters[kind])),
        features=(),
        file_rules=RULES,
        files=files,
    )
    feed = EventFeed(files)
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
    msg_path = "/mp/conversations/{conv}/messages/{msg}"

    def professional_json(user: SandboxUser) -> dict[str, Any]:
        return {
            "idnps": str(user.idnps),
            "first": user.given_name,
            "last": user.family_name,
            "job": user.profession,
        }

    @routes.get("/mp/professionals")
    async def list_professionals(request: web.Request) -> web.Response:
        users, after = query_user_page(request, kernel, "after")
        return web.json_response(
            {"professionals": [professional_json(u) for u in users], "after": after}
        )

    @routes.get("/mp/professionals/{idnps}")
    async def get_professional(request: web.Request) -> web.Response:
        return web.json_response(professional_json(kernel.user(request.match_info["idnps"])))

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
        body = await read_body(request, NewMessageBody, max_bytes=MAX_MESSAGE_BODY_BYTES)
        author = External(body.author_ref, body.author_label)
        attachment: AttachmentSource | None = None
        if body.attachment is not None:
            attachment = functools.partial(
                files.put_bytes,
                decode_inline_file(body.attachment),
                name=sanitize_name(body.attachment.filename),
                mime_type=_mime(body.attachment.mime),
                owner=None,
            )
        message, _ = kernel.api_writes(
            body.request_ref,
            conv,
            author,
            body.body or "",
            reply_to=None if body.reply_to is None else str(body.reply_to),
            attachment=attachment,
        )
        return web.json_response({"msg": int(message.id), "at": epoch_ms(message.created_at)})

    @routes.delete(msg_path)
    async def delete_message(request: web.Request) -> web.Response:
        conv = _conv_id(request)
        kernel.api_deletes(conv, _path_id(request, "msg", "message"))
        return web.Response(status=204)

    @routes.post("/mp/conversations/{conv}/read")
    async def mark_read(request: web.Request) -> web.Response:
        conv = _conv_id(request)
        body = await read_body(request, ReadBody)
        kernel.api_reads(conv, External(body.reader_ref, body.reader_ref), str(body.up_to))
        return web.Response(status=204)

    @routes.post(msg_path + "/status")
    async def report_status(request: web.Request) -> web.Response:
        conv = _conv_id(request)
        msg = _path_id(request, "msg", "message")
        body = await read_body(request, StatusBody)
        kernel.api_reports_delivery(conv, msg, body.status, body.detail)
        return web.Response(status=204)

    @routes.post("/mp/conversations/{conv}/participants")
    async def add_participants(request: web.Request) -> web.Response:
        conv = _conv_id(request)
        body = await read_body(request, NewParticipantsBody)
        guests = [External(g.ref, g.label) for g in body.guests]
        return web.json_response(
            conversation_json(kernel.api_adds_participants(conv, body.participants, guests))
        )

    @routes.post("/mp/conversations/{conv}/guests/leave")
    async def guests_leave(request: web.Request) -> web.Response:
        conv = _conv_id(request)
        body = await read_body(request, GuestsLeaveBody)
        kernel.conversation(conv)
        for ref in body.refs:
            if ref in kernel.users:
                raise SandboxError(
                    403,
                    "forbidden",
                    f"{ref} is a Medipeps participant: participants leave by themselves, nobody "
                    "else can remove them.",
                )
        kernel.api_removes_participants(conv, (), body.refs)
        return web.Response(status=204)

    @routes.patch("/mp/conversations/{conv}")
    async def set_subject(request: web.Request) -> web.Response:
        conv = _conv_id(request)
        body = await read_body(request, SubjectBody)
        return web.json_response(conversation_json(kernel.api_updates(conv, title=body.subject)))

    @routes.get("/mp/conversations/{conv}/messages")
    async def history(request: web.Request) -> web.Response:
        conv = _conv_id(request)
        after = query_int(request, "after", 0, 0, 2**62)
        limit = query_int(request, "limit", DEFAULT_EVENTS_LIMIT, 1, MAX_EVENTS_LIMIT)
        page = [m for m in kernel.history(conv) if int(m.id) > after][:limit]
        messages = [msg_json(m) for m in page]
        for shown, message in zip(messages, page, strict=True):
            if message.attachment is not None:
                data = base64.b64encode(files.read_bytes(message.attachment)).decode("ascii")
                shown["attachment"]["data_b64"] = data
        return web.json_response(
            {"messages": messages, "cursor": int(page[-1].id) if page else after}
        )

    @routes.get("/mp/events")
    async def events(request: web.Request) -> web.Response:
        after = query_int(request, "after", 0, 0, 2**62)
        limit = query_int(request, "limit", DEFAULT_EVENTS_LIMIT, 1, MAX_EVENTS_LIMIT)
        page, cursor = feed.read(after, limit)
        return web.json_response({"events": page, "cursor": cursor})

    app.add_routes(routes)
    return app
