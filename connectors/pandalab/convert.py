"""PandaLab JSON to the bridge's types and back (webhook events, users, request bodies)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from connectors import payload
from connectors.base import (
    ConversationCreated,
    MessageReceived,
    NewConversation,
    OutboundMessage,
    Participant,
    RemoteEvent,
    RemoteUser,
    Sender,
)
from connectors.payload import InvalidPayload
from connectors.payload import idnps as _idnps
from connectors.payload import list_field as _list
from connectors.payload import obj as _obj
from connectors.payload import str_field as _str
from connectors.payload import text_field as _text

# --- Vendor -> bridge -----------------------------------------------------------------------------


def event_from_webhook(payload: Any) -> RemoteEvent:
    """A webhook body (``{"id", "type", "created_at", "data"}``) as a ``RemoteEvent``."""
    envelope = _obj(payload, "the webhook body")
    event_id = _str(envelope, "id", "the webhook body")
    kind = _str(envelope, "type", "the webhook body")
    data = _obj(envelope.get("data"), "data")
    if kind == "conversation.created":
        created_at = _timestamp(envelope, "created_at", "the webhook body")
        return _conversation_created(event_id, created_at, data)
    if kind == "message.created":
        return _message_created(event_id, data)
    raise InvalidPayload(f"unknown event type {kind[:60]!r}")


def _conversation_created(event_id: str, created_at: datetime, data: dict[str, Any]) -> RemoteEvent:
    conv = _obj(data.get("conversation"), "data.conversation")
    where = "data.conversation"
    title = conv.get("title")
    if title is not None and not isinstance(title, str):
        raise InvalidPayload(f"{where}.title is not a string")
    externals = _list(conv, "external_participants", where)
    return ConversationCreated(
        event_id=event_id,
        conversation_id=_str(conv, "id", where),
        timestamp=created_at,
        creator=_idnps(conv.get("created_by"), f"{where}.created_by"),
        members=tuple(
            _idnps(m, f"{where}.members[{i}]") for i, m in enumerate(_list(conv, "members", where))
        ),
        participants=tuple(
            participant_from_ref(_str(_obj(p, f"{where}.external_participants[{i}]"), "ref", where))
            for i, p in enumerate(externals)
        ),
        title=title,
    )


def _message_created(event_id: str, data: dict[str, Any]) -> RemoteEvent:
    msg = _obj(data.get("message"), "data.message")
    where = "data.message"
    return MessageReceived(
        event_id=event_id,
        conversation_id=_str(msg, "conversation_id", where),
        timestamp=_timestamp(msg, "created_at", where),
        message_id=_str(msg, "id", where),
        sender=_idnps(msg.get("author"), f"{where}.author"),
        text=_text(msg, "markdown", where),
    )


def participant_from_ref(ref: str) -> Participant:
    return payload.participant(ref, "an external participant")


def user_from_json(body: dict[str, Any]) -> RemoteUser:
    """``GET /api/v1/users/{idnps}`` as a ``RemoteUser``."""
    return RemoteUser(
        idnps=_idnps(body.get("idnps"), "user.idnps"),
        given_name=_str(body, "given_name", "user"),
        family_name=_str(body, "family_name", "user"),
        profession=_str(body, "profession", "user"),
    )


# --- Bridge -> vendor -----------------------------------------------------------------------------


def conversation_body(conversation: NewConversation) -> dict[str, Any]:
    """The ``POST /api/v1/conversations`` body."""
    return {
        "title": conversation.title,
        "members": [str(m) for m in conversation.members],
        "external_participants": [_sender_json(s) for s in conversation.external],
    }


def message_body(message: OutboundMessage) -> dict[str, Any]:
    """The ``POST /api/v1/conversations/{id}/messages`` body."""
    return {
        "sender": _sender_json(message.sender),
        "markdown": to_markdown(message.text, message.html),
    }


def to_markdown(text: str, html: str | None) -> str:
    """The Markdown PandaLab shows for a Matrix message. For now the plain body, as is."""
    del html  # HTML -> Markdown conversion is a later issue.
    return text


def _sender_json(sender: Sender) -> dict[str, str]:
    return {
        "ref": str(sender.idnps) if sender.idnps else sender.mxid,
        "display_name": sender.display_name,
    }


# --- Field readers --------------------------------------------------------------------------------


def _timestamp(container: dict[str, Any], key: str, where: str) -> datetime:
    """An ISO-8601 timestamp with a UTC offset, as an aware datetime in UTC."""
    raw = _str(container, key, where)
    try:
        value = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise InvalidPayload(f"{where}.{key} is not an ISO-8601 timestamp") from exc
    if value.tzinfo is None:
        raise InvalidPayload(f"{where}.{key} has no UTC offset")
    return value.astimezone(UTC)
