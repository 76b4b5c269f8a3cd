"""Medipeps JSON to the bridge's types and back (feed events, professionals, request bodies)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from connectors import payload
from connectors.base import (
    ConversationCreated,
    ConversationRenamed,
    MemberLeft,
    MessageDeleted,
    MessageReceived,
    NewConversation,
    OutboundMessage,
    Participant,
    ParticipantChange,
    ParticipantsAdded,
    ReadUpTo,
    RemoteAttachment,
    RemoteEvent,
    RemoteUser,
)
from connectors.payload import InvalidPayload
from connectors.payload import idnps as _idnps
from connectors.payload import int_field as _int
from connectors.payload import list_field as _list
from connectors.payload import obj as _obj
from connectors.payload import str_field as _str

INLINE_PREFIX = "inline:"

# --- Vendor -> bridge -----------------------------------------------------------------------------


def event_seq(raw: Any) -> int | None:
    """The ``seq`` of a feed event, or None when it has none (for logging a bad event)."""
    seq = raw.get("seq") if isinstance(raw, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def has_attachment(raw: Any) -> bool:
    """Whether a feed event carries an inline file (pages holding files may be cut short)."""
    msg = raw.get("msg") if isinstance(raw, dict) else None
    return isinstance(msg, dict) and msg.get("attachment") is not None


def event_from_feed(raw: Any) -> RemoteEvent:
    """One ``/mp/events`` entry as a ``RemoteEvent``; ``event_id`` is stable across re-reads."""
    event = _obj(raw, "the event")
    kind = event.get("type")
    if kind == "NEW_CONV":
        return _new_conv(event)
    if kind == "NEW_MSG":
        return _new_msg(event)
    if kind == "DEL_MSG":
        return _del_msg(event)
    if kind == "READ":
        return _read(event)
    if kind == "ADD_PART":
        return _add_part(event)
    if kind == "LEAVE":
        return _leave(event)
    if kind == "SUBJECT":
        return _subject(event)
    # The value is not echoed back (an error names the field and the rule, not content).
    raise InvalidPayload(
        "unknown event type (the type is one of NEW_CONV, NEW_MSG, DEL_MSG, READ, ADD_PART, "
        "LEAVE, SUBJECT)"
    )


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
    return message_from_json(event.get("msg"))


def message_from_json(raw: Any) -> MessageReceived:
    """A ``msg`` object (of a ``NEW_MSG`` event, or of a conversation's own feed) as the
    message event: ``event_id`` ``msg-<msg>`` either way, so a message read twice is one."""
    msg = _obj(raw, "msg")
    msg_id = _int(msg, "msg", "msg")
    body = msg.get("body")
    if body is not None and not isinstance(body, str):
        raise InvalidPayload("msg.body is not a string")
    reply_to = msg.get("reply_to")
    if reply_to is not None:
        reply_to = str(_int(msg, "reply_to", "msg"))
    return MessageReceived(
        event_id=f"msg-{msg_id}",
        conversation_id=str(_int(msg, "conv", "msg")),
        timestamp=from_epoch_ms(_int(msg, "at", "msg")),
        message_id=str(msg_id),
        sender=_idnps(msg.get("author"), "msg.author"),
        text=body or "",
        reply_to=reply_to,
        attachment=_attachment(payload.optional_obj(msg, "attachment", "msg")),
    )


def _del_msg(event: dict[str, Any]) -> RemoteEvent:
    msg = _obj(event.get("msg"), "msg")
    msg_id = _int(msg, "msg", "msg")
    return MessageDeleted(
        event_id=f"del-{msg_id}",
        conversation_id=str(_int(msg, "conv", "msg")),
        timestamp=from_epoch_ms(_int(event, "at", "the event")),
        message_id=str(msg_id),
        sender=_idnps(msg.get("author"), "msg.author"),
    )


def _read(event: dict[str, Any]) -> RemoteEvent:
    read = _obj(event.get("read"), "read")
    conv = _int(read, "conv", "read")
    reader = _idnps(read.get("reader"), "read.reader")
    up_to = _int(read, "up_to", "read")
    return ReadUpTo(
        event_id=f"read-{conv}-{reader}-{up_to}",
        conversation_id=str(conv),
        timestamp=from_epoch_ms(_int(event, "at", "the event")),
        sender=reader,
        message_id=str(up_to),
    )


def _add_part(event: dict[str, Any]) -> RemoteEvent:
    seq = _int(event, "seq", "the event")
    part = _obj(event.get("part"), "part")
    members = tuple(
        _idnps(p, f"part.participants[{i}]")
        for i, p in enumerate(_optional_list(part, "participants", "part"))
    )
    guests = tuple(
        payload.participant(_ref(g, f"part.guests[{i}]"), f"part.guests[{i}].ref")
        for i, g in enumerate(_optional_list(part, "guests", "part"))
    )
    if not members and not guests:
        raise InvalidPayload("part.participants and part.guests are both empty")
    return ParticipantsAdded(
        event_id=f"part-{seq}",
        conversation_id=str(_int(part, "conv", "part")),
        timestamp=from_epoch_ms(_int(event, "at", "the event")),
        sender=_idnps(part.get("by"), "part.by"),
        members=members,
        participants=guests,
    )


def _leave(event: dict[str, Any]) -> RemoteEvent:
    seq = _int(event, "seq", "the event")
    leave = _obj(event.get("leave"), "leave")
    return MemberLeft(
        event_id=f"leave-{seq}",
        conversation_id=str(_int(leave, "conv", "leave")),
        timestamp=from_epoch_ms(_int(event, "at", "the event")),
        sender=_idnps(leave.get("who"), "leave.who"),
    )


def _subject(event: dict[str, Any]) -> RemoteEvent:
    seq = _int(event, "seq", "the event")
    subject = _obj(event.get("subject"), "subject")
    return ConversationRenamed(
        event_id=f"subject-{seq}",
        conversation_id=str(_int(subject, "conv", "subject")),
        timestamp=from_epoch_ms(_int(event, "at", "the event")),
        sender=_idnps(subject.get("by"), "subject.by"),
        title=payload.optional_str(subject, "subject", "subject") or None,
    )


def _attachment(attachment: dict[str, Any] | None) -> RemoteAttachment | None:
    """An inline file: its base64 data travels in ``source`` (``inline:<data>``, at most 1 MiB
    decoded), which ``open_attachment`` decodes."""
    if attachment is None:
        return None
    where = "msg.attachment"
    data = "".join(_str(attachment, "data_b64", where).split())  # tolerate wrapped lines
    try:
        size = len(base64.b64decode(data, validate=True))
    except ValueError as exc:
        raise InvalidPayload(f"{where}.data_b64 is not valid base64") from exc
    return RemoteAttachment(
        name=_str(attachment, "filename", where),
        mime_type=_str(attachment, "mime", where),
        size=size,
        source=INLINE_PREFIX + data,
    )


def inline_data(source: str) -> str:
    """The base64 data of an inline attachment's ``source``; ValueError when it is not one."""
    if not source.startswith(INLINE_PREFIX):
        raise ValueError("the attachment is not an inline Medipeps file")
    return source[len(INLINE_PREFIX) :]


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
        "guests": [{"ref": s.ref, "label": s.display_name} for s in conversation.external],
        "request_ref": conversation.request_id,
    }


def message_body(
    message: OutboundMessage, attachment: dict[str, str] | None = None
) -> dict[str, Any]:
    """The ``POST /mp/conversations/{conv}/messages`` body (plain text)."""
    body: dict[str, Any] = {
        "author_ref": message.sender.ref,
        "author_label": message.sender.display_name,
        "body": message.text,
        "request_ref": message.request_id,
    }
    if message.reply_to is not None:
        body["reply_to"] = parse_message_id(message.reply_to)
    if attachment is not None:
        body["attachment"] = attachment
    return body


def participants_body(change: ParticipantChange) -> dict[str, Any]:
    """The ``POST /mp/conversations/{conv}/participants`` body."""
    return {
        "participants": [str(m) for m in change.members],
        "guests": [{"ref": s.ref, "label": s.display_name} for s in change.external],
        "by_ref": None if change.by is None else change.by.ref,
        "request_ref": change.request_id,
    }


def guests_leave_body(change: ParticipantChange) -> dict[str, Any]:
    """The ``POST /mp/conversations/{conv}/guests/leave`` body."""
    return {"refs": [s.ref for s in change.external], "request_ref": change.request_id}


def parse_conversation_id(conversation_id: str) -> int:
    """The bridge's conversation id back to Medipeps' integer ``conv``."""
    if not conversation_id.isascii() or not conversation_id.isdigit():
        raise ValueError("a Medipeps conversation id is a non-negative integer")
    return int(conversation_id)


def parse_message_id(message_id: str) -> int:
    """The bridge's message id back to Medipeps' integer ``msg``."""
    if not message_id.isascii() or not message_id.isdigit():
        raise ValueError("a Medipeps message id is a non-negative integer")
    return int(message_id)


# --- Field readers --------------------------------------------------------------------------------


def _optional_list(container: dict[str, Any], key: str, where: str) -> list[Any]:
    """A list field that may be absent or null (then empty)."""
    value = container.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidPayload(f"{where}.{key} is not a list")
    return value


def _ref(guest: Any, where: str) -> str:
    return _str(_obj(guest, where), "ref", where)
