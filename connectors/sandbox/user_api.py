"""The user-side API of USER_API.md: what a person would do in the vendor's app, at /_sandbox/."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import Field

from connectors.sandbox.kernel import Conversation, Kernel, Message, SandboxUser
from connectors.sandbox.webtools import Body, iso8601, read_body

MAX_PARTICIPANTS = 100


class NewConversationBody(Body):
    with_: list[str] = Field(alias="with", min_length=1, max_length=MAX_PARTICIPANTS)
    title: str | None = Field(default=None, max_length=255)


class NewMessageBody(Body):
    text: str


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
        "members": [str(m) for m in conversation.members],
        "external": [e.ref for e in conversation.external],
    }


def inbox_json(message: Message) -> dict[str, Any]:
    return {
        "conversation_id": message.conversation_id,
        "message_id": message.id,
        "sender": message.sender_ref,
        "sender_name": message.sender_name,
        "text": message.text,
        "ts": iso8601(message.created_at),
    }


def add_user_routes(app: web.Application, kernel: Kernel) -> None:
    """Mount the user-side API on ``app``, working on ``kernel``."""
    routes = web.RouteTableDef()

    @routes.get("/_sandbox/users")
    async def list_users(request: web.Request) -> web.Response:
        return web.json_response({"users": [user_json(u) for u in kernel.users.values()]})

    @routes.post("/_sandbox/users/{idnps}/conversations")
    async def create_conversation(request: web.Request) -> web.Response:
        user = kernel.user(request.match_info["idnps"])
        body = await read_body(request, NewConversationBody)
        conversation = kernel.user_creates_conversation(user, body.with_, body.title)
        return web.json_response({"conversation_id": conversation.id}, status=201)

    @routes.get("/_sandbox/users/{idnps}/conversations")
    async def list_conversations(request: web.Request) -> web.Response:
        user = kernel.user(request.match_info["idnps"])
        conversations = kernel.conversations_of(user.idnps)
        return web.json_response({"conversations": [conversation_json(c) for c in conversations]})

    @routes.post("/_sandbox/users/{idnps}/conversations/{conversation_id}/messages")
    async def write_message(request: web.Request) -> web.Response:
        user = kernel.user(request.match_info["idnps"])
        body = await read_body(request, NewMessageBody)
        message = kernel.user_writes(user, request.match_info["conversation_id"], body.text)
        return web.json_response({"message_id": message.id}, status=201)

    @routes.get("/_sandbox/users/{idnps}/inbox")
    async def inbox(request: web.Request) -> web.Response:
        user = kernel.user(request.match_info["idnps"])
        return web.json_response({"messages": [inbox_json(m) for m in kernel.inbox(user.idnps)]})

    app.add_routes(routes)
