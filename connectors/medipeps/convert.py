"""Medipeps JSON to the bridge's types and back (feed events, professionals, request bodies)."""

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
from connectors.payload import int_field as _int
from connectors.payload import list_field as _list
from connectors.payload import obj as _obj
from connectors.payload import str_field as _str

# --- Vendor -> bridge -----------------------------------------------------------------------------


def event_seq(raw: Any) -> int | None:
    """The ``seq`` of a feed event, or None when it has none (for logging a bad event)."""
    seq = raw.get("seq") if isinstance(raw, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def event_from_feed(raw: Any) -> RemoteEvent:
    """One ``/mp/events`` entry as a ``RemoteEvent``; ``event_id`` is stable across re-reads."""
    event = _obj(raw, "the event")
    kind = event.get("type")
    if kind == "NEW_CONV":
        return _new_conv(event)
    if kind == "NEW_MSG":
        return _new_msg(event)
    raise InvalidPayload(f"unknown event type {str(kind)[:60]!r}")


def _new_conv(event: dict[str, Any]) -> RemoteEvent:
    conv = _obj(event.get("conv"), "conv")
    conv_id = _int(conv, "conv", "conv")
    subject = conv.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise InvalidPayload("conv.subject is not a string")
    return ConversationCreated(
        event_id=f"conv-{conv_id}",
        conversation_id=str(conv_id),
        timestamp=from_epoch_ms(_int(event, "at", "the event")),
        creator=_idnps(conv.get("owner"), "conv.owner"),
        members=tuple(
            _idnps(p, f"conv.participants[{i}]")
            for i, p in enumerate(_list(conv, "participants", "conv"))
        ),
        participants=tuple(
            participant_from_ref(_ref(g, f"conv.guests[{i}]"))
            for i, g in enumerate(_list(conv, "guests", "conv"))
        ),
        title=subject,
    )


def _new_msg(event: dict[str, Any]) -> RemoteEvent:
    msg = _obj(event.get("msg"), "msg")
    msg_id = _int(msg, "msg", "msg")
    body = msg.get("body")
    if not isinstance(body, str):
        raise InvalidPayload("msg.body is missing or not a string")
    return MessageReceived(
        event_id=f"msg-{msg_id}",
        conversation_id=str(_int(msg, "conv", "msg")),
        timestamp=from_epoch_ms(_int(msg, "at", "msg")),
        message_id=str(msg_id),
        sender=_idnps(msg.get("author"), "msg.author"),
        text=body,
    )


def participant_from_ref(ref: str) -> Participant:
    return payload.participant(ref, "a guest")


def user_from_json(body: dict[str, Any]) -> RemoteUser:
    """``GET /mp/professionals/{idnps}`` as a ``RemoteUser``."""
    return RemoteUser(
        idnps=_idnps(body.get("idnps"), "professional.idnps"),
        given_name=_str(body, "first", "professional"),
        family_name=_str(body, "last", "professional"),
        profession=_str(body, "job", "professional"),
    )


def from_epoch_ms(ms: int) -> datetime:
    """Epoch milliseconds as an aware UTC datetime."""
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise InvalidPayload("a timestamp is out of range") from exc


def to_epoch_ms(moment: datetime) -> int:
    """An aware datetime as epoch milliseconds."""
    if moment.tzinfo is None:
        raise ValueError("a naive datetime has no defined epoch time")
    return round(moment.timestamp() * 1000)


# --- Bridge -> vendor -----------------------------------------------------------------------------


def conversation_body(conversation: NewConversation) -> dict[str, Any]:
    """The ``POST /mp/conversations`` body; ``request_ref`` makes a repeat harmless."""
    return {
        "subject": conversation.title,
        "participants": [str(m) for m in conversation.members],
        "guests": [{"ref": _sender_ref(s), "label": s.display_name} for s in conversation.external],
        "request_ref": conversation.request_id,
    }


def message_body(message: OutboundMessage) -> dict[str, Any]:
    """The ``POST /mp/conversations/{conv}/messages`` body (plain text)."""
    return {
        "author_ref": _sender_ref(message.sender),
        "author_label": message.sender.display_name,
        "body": message.text,
        "request_ref": message.request_id,
    }


def parse_conversation_id(conversation_id: str) -> int:
    """The bridge's conversation id back to Medipeps' integer ``conv``."""
    if not conversation_id.isascii() or not conversation_id.isdigit():
        raise ValueError("a Medipeps conversation id is a non-negative integer")
    return int(conversation_id)


def _sender_ref(sender: Sender) -> str:
    return str(sender.idnps) if sender.idnps else sender.mxid


# --- Field readers --------------------------------------------------------------------------------


def _ref(guest: Any, where: str) -> str:
    return _str(_obj(guest, where), "ref", where)
