"""The user-side API of USER_API.md: what a person would do in the vendor's app, at /_sandbox/."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from pydantic import Field

from connectors.sandbox.errors import bad_request, file_too_large
from connectors.sandbox.files import (
    attachment_json,
    file_response,
    parse_mime_type,
    sanitize_name,
)
from connectors.sandbox.kernel import (
    MAX_MENTIONS,
    UNSET,
    Conversation,
    Kernel,
    Location,
    Message,
    SandboxUser,
)
from connectors.sandbox.webtools import Body, iso8601, read_body

log = logging.getLogger("eimis.sandbox")

MAX_PARTICIPANTS = 100
MAX_ID_LENGTH = 64


class NewConversationBody(Body):
    with_: list[str] = Field(alias="with", min_length=1, max_length=MAX_PARTICIPANTS)
    title: str | None = Field(default=None, max_length=255)


class LocationBody(Body):
    lat: float
    lon: float
    label: str | None = Field(default=None, max_length=255)


class NewMessageBody(Body):
    text: str = ""
    reply_to: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    file_id: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    location: LocationBody | None = None
    mentions: list[str] = Field(default_factory=list, max_length=MAX_MENTIONS)


class EditBody(Body):
    text: str
    mentions: list[str] = Field(default_factory=list, max_length=MAX_MENTIONS)


class ReactionBody(Body):
    emoji: str = Field(max_length=64)


class ReadBody(Body):
    up_to: str = Field(max_length=MAX_ID_LENGTH)


class TypingBody(Body):
    typing: bool


class ParticipantsBody(Body):
    add: list[str] = Field(default_factory=list, max_length=MAX_PARTICIPANTS)
    remove: list[str] = Field(default_factory=list, max_length=MAX_PARTICIPANTS)


class UpdateBody(Body):
    """Only the keys present change; null clears."""

    title: str | None = Field(default=None, max_length=255)
    description: str | None = Field(default=None, max_length=4000)


def user_json(user: SandboxUser) -> dict[str, Any]:
    return {
        "idnps": str(user.idnps),
        "given_name": user.given_name,
        "family_name": user.family_name,
        "profession": user.profession,
    }


def conversation_json(conversation: Conversation) -> dict[str, Any]:
    return {
        "conversation_id": conversation.id,
        "title": conversation.title,
        "description": conversation.description,
        "members": [str(m) for m in conversation.members],
        "external": [e.ref for e in conversation.external],
    }


def message_json(message: Message) -> dict[str, Any]:
    """A message as the app shows it: its current state (edits, deletion, reactions)."""
    location = message.location
    return {
        "conversation_id": message.conversation_id,
        "message_id": message.id,
        "sender": message.sender_ref,
        "sender_name": message.sender_name,
        "text": message.text,
        "ts": iso8601(message.created_at),
        "kind": "system" if message.system else message.kind,
        "reply_to": message.reply_to,
        "mentions": [m.ref for m in message.mentions],
        "attachment": attachment_json(message.attachment),
        "location": None
        if location is None
        else {"lat": location.lat, "lon": location.lon, "label": location.label},
        "edited": message.edited_at is not None,
        "deleted": message.deleted,
        "reactions": [
            {"reaction_id": r.id, "sender": r.sender_ref, "emoji": r.emoji}
            for r in message.reactions
        ],
    }


inbox_json = message_json


def conversation_view_json(
    kernel: Kernel, viewer: SandboxUser, conversation: Conversation
) -> dict[str, Any]:
    messages = []
    for message in conversation.messages:
        shown = message_json(message)
        if message.author == viewer.idnps:
            shown["delivery"] = [{"status": d.status, "detail": d.detail} for d in message.delivery]
        messages.append(shown)
    return {
        **conversation_json(conversation),
        "read_up_to": {ref: m.id for ref, m in conversation.read_up_to.items()},
        "typing": kernel.typing_now(conversation),
        "messages": messages,
    }


def _upload_name(request: web.Request) -> str:
    raw = request.headers.get("X-Filename")
    if raw is None or not raw.strip():
        raise bad_request("The X-Filename header (the file's name) is required.")
    try:
        name = unquote(raw, errors="strict")
        name.encode("utf-8")
    except UnicodeError:
        raise bad_request("The X-Filename header is not valid percent-encoded UTF-8.") from None
    return sanitize_name(name)


def add_user_routes(app: web.Application, kernel: Kernel) -> None:
    """Mount the user-side API on ``app``, working on ``kernel``."""
    routes = web.RouteTableDef()
    base = "/_sandbox/users/{idnps}"
    conv = base + "/conversations/{conversation_id}"
    msg = conv + "/messages/{message_id}"

    def user_of(request: web.Request) -> SandboxUser:
        return kernel.user(request.match_info["idnps"])

    @routes.get("/_sandbox/users")
    async def list_users(request: web.Request) -> web.Response:
        return web.json_response({"users": [user_json(u) for u in kernel.users.values()]})

    @routes.post(base + "/conversations")
    async def create_conversation(request: web.Request) -> web.Response:
        user = user_of(request)
        body = await read_body(request, NewConversationBody)
        conversation = kernel.user_creates_conversation(user, body.with_, body.title)
        return web.json_response({"conversation_id": conversation.id}, status=201)

    @routes.get(base + "/conversations")
    async def list_conversations(request: web.Request) -> web.Response:
        user = user_of(request)
        conversations = kernel.conversations_of(user.idnps)
        return web.json_response({"conversations": [conversation_json(c) for c in conversations]})

    @routes.get(conv)
    async def view_conversation(request: web.Request) -> web.Response:
        user = user_of(request)
        conversation = kernel.member_conversation(user, request.match_info["conversation_id"])
        return web.json_response(conversation_view_json(kernel, user, conversation))

    @routes.post(conv + "/messages")
    async def write_message(request: web.Request) -> web.Response:
        user = user_of(request)
        body = await read_body(request, NewMessageBody)
        location = None
        if body.location is not None:
            location = Location(body.location.lat, body.location.lon, body.location.label)
        message = kernel.user_writes(
            user,
            request.match_info["conversation_id"],
            body.text,
            reply_to=body.reply_to,
            file_id=body.file_id,
            location=location,
            mentions=body.mentions,
        )
        return web.json_response({"message_id": message.id}, status=201)

    @routes.patch(msg)
    async def edit_message(request: web.Request) -> web.Response:
        user = user_of(request)
        kernel.require("edit")
        body = await read_body(request, EditBody)
        message = kernel.user_edits(
            user,
            request.match_info["conversation_id"],
            request.match_info["message_id"],
            body.text,
            body.mentions,
        )
        assert message.edited_at is not None
        return web.json_response(
            {"message_id": message.id, "edited_at": iso8601(message.edited_at)}
        )

    @routes.delete(msg)
    async def delete_message(request: web.Request) -> web.Response:
        user = user_of(request)
        kernel.user_deletes(
            user, request.match_info["conversation_id"], request.match_info["message_id"]
        )
        return web.Response(status=204)

    @routes.post(msg + "/reactions")
    async def react(request: web.Request) -> web.Response:
        user = user_of(request)
        kernel.require("react")
        body = await read_body(request, ReactionBody)
        reaction, new = kernel.user_reacts(
            user,
            request.match_info["conversation_id"],
            request.match_info["message_id"],
            body.emoji,
        )
        return web.json_response({"reaction_id": reaction.id}, status=201 if new else 200)

    @routes.delete(msg + "/reactions/{reaction_id}")
    async def unreact(request: web.Request) -> web.Response:
        user = user_of(request)
        kernel.user_unreacts(
            user,
            request.match_info["conversation_id"],
            request.match_info["message_id"],
            request.match_info["reaction_id"],
        )
        return web.Response(status=204)

    @routes.post(conv + "/read")
    async def read(request: web.Request) -> web.Response:
        user = user_of(request)
        body = await read_body(request, ReadBody)
        kernel.user_reads(user, request.match_info["conversation_id"], body.up_to)
        return web.Response(status=204)

    @routes.post(conv + "/typing")
    async def typing(request: web.Request) -> web.Response:
        user = user_of(request)
        kernel.require("typing")
        body = await read_body(request, TypingBody)
        kernel.user_types(user, request.match_info["conversation_id"], body.typing)
        return web.Response(status=204)

    @routes.post(conv + "/participants")
    async def participants(request: web.Request) -> web.Response:
        user = user_of(request)
        body = await read_body(request, ParticipantsBody)
        conversation = kernel.user_changes_participants(
            user, request.match_info["conversation_id"], body.add, body.remove
        )
        return web.json_response(conversation_json(conversation))

    @routes.post(conv + "/leave")
    async def leave(request: web.Request) -> web.Response:
        user = user_of(request)
        kernel.user_leaves(user, request.match_info["conversation_id"])
        return web.Response(status=204)

    @routes.patch(conv)
    async def update(request: web.Request) -> web.Response:
        user = user_of(request)
        body = await read_body(request, UpdateBody)
        given = body.model_fields_set
        if not given & {"title", "description"}:
            raise bad_request("Nothing to change: give 'title' and/or 'description'.")
        conversation = kernel.user_updates(
            user,
            request.match_info["conversation_id"],
            title=body.title if "title" in given else UNSET,
            description=body.description if "description" in given else UNSET,
        )
        return web.json_response(conversation_json(conversation))

    @routes.get(base + "/inbox")
    async def inbox(request: web.Request) -> web.Response:
        user = user_of(request)
        return web.json_response({"messages": [inbox_json(m) for m in kernel.inbox(user.idnps)]})

    @routes.post(base + "/files")
    async def upload(request: web.Request) -> web.Response:
        user = user_of(request)
        name = _upload_name(request)
        mime_type = parse_mime_type(request.headers.get("Content-Type", "application/octet-stream"))
        limit = kernel.file_rules.max_bytes
        stored = await kernel.files.receive(
            request.content,
            name=name,
            mime_type=mime_type,
            owner=str(user.idnps),
            max_bytes=limit,
            too_large=file_too_large(limit),
            declared_size=request.content_length,
        )
        kernel.files.add(stored)
        log.debug("user upload: file %s stored (%d bytes)", stored.id, stored.size)
        return web.json_response(
            {
                "file_id": stored.id,
                "name": stored.name,
                "mime_type": stored.mime_type,
                "size": stored.size,
            },
            status=201,
        )

    @routes.get(base + "/files/{file_id}")
    async def download(request: web.Request) -> web.FileResponse:
        user = user_of(request)
        return file_response(kernel.user_file(user, request.match_info["file_id"]))

    app.add_routes(routes)
