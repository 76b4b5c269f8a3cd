"""PandaLab JSON to the bridge's types and back (webhook events, users, request bodies)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from connectors import payload
from connectors.base import (
    ConversationCreated,
    ConversationRenamed,
    Location,
    MemberLeft,
    Mention,
    MessageDeleted,
    MessageEdited,
    MessageReceived,
    NewConversation,
    OutboundAttachment,
    OutboundMessage,
    Participant,
    ParticipantChange,
    ParticipantsAdded,
    ParticipantsRemoved,
    ReactionAdded,
    ReactionRemoved,
    ReadUpTo,
    RemoteAttachment,
    RemoteEvent,
    RemoteUser,
    Sender,
    TopicChanged,
    TypingChanged,
)
from connectors.kit.markdown import escape_markdown
from connectors.payload import InvalidPayload
from connectors.payload import idnps as _idnps
from connectors.payload import list_field as _list
from connectors.payload import obj as _obj
from connectors.payload import str_field as _str
from connectors.payload import text_field as _text

# --- Vendor -> bridge -----------------------------------------------------------------------------

MESSAGE_KINDS: frozenset[str] = frozenset({"text", "notice", "emote"})

_MENTION = re.compile(r"@\[((?:\\.|[^\]\\])+)\]\(([^()\s]+)\)")
"""A PandaLab mention in Markdown: ``@[Display Name](ref)``; a backslash escapes a bracket."""
_ESCAPED = re.compile(r"\\(.)")


def events_from_webhook(payload: Any) -> list[RemoteEvent]:
    """A webhook body (``{"id", "type", "created_at", "data"}``) as ``RemoteEvent``s: one, or
    for ``conversation.updated`` one per changed key (a title, a description).

    Every event's ``event_id`` is the webhook event id, which PandaLab keeps across redeliveries
    (``<id>:title`` and ``<id>:description`` for the two halves of an update).
    """
    envelope = _obj(payload, "the webhook body")
    event_id = _str(envelope, "id", "the webhook body")
    kind = _str(envelope, "type", "the webhook body")
    data = _obj(envelope.get("data"), "data")
    if kind == "conversation.created":
        created_at = _timestamp(envelope, "created_at", "the webhook body")
        return [_conversation_created(event_id, created_at, data)]
    changes = _CHANGE_PARSERS.get(kind)
    if changes is not None:
        created_at = _timestamp(envelope, "created_at", "the webhook body")
        return changes(event_id, created_at, data)
    parser = _PARSERS.get(kind)
    if parser is None:
        # The value is not echoed back (an error names the field and the rule, not content).
        known = ", ".join(sorted(["conversation.created", *_PARSERS, *_CHANGE_PARSERS]))
        raise InvalidPayload(f"unknown event type (the type is one of: {known})")
    return [parser(event_id, data)]


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
        topic=payload.optional_str(conv, "description", where) or None,
    )


def _message_created(event_id: str, data: dict[str, Any]) -> RemoteEvent:
    return message_from_json(event_id, _obj(data.get("message"), "data.message"), "data.message")


def history_event_id(message_id: str) -> str:
    """The ``event_id`` of a message read from a conversation's history (the webhook event id
    that carried it live is not there): stable, and apart from webhook event ids."""
    return f"history:{message_id}"


def message_from_json(event_id: str, msg: dict[str, Any], where: str) -> MessageReceived:
    """A PandaLab message object (``message.created`` data, or one of a history page)."""
    text, mentions = from_markdown(_optional_text(msg, "markdown", where), msg, where)
    kind = msg.get("kind")
    return MessageReceived(
        event_id=event_id,
        conversation_id=_str(msg, "conversation_id", where),
        timestamp=_timestamp(msg, "created_at", where),
        message_id=_str(msg, "id", where),
        sender=_idnps(msg.get("author"), f"{where}.author"),
        text=text,
        message_kind=kind if kind in MESSAGE_KINDS else "text",
        reply_to=payload.optional_str(msg, "reply_to", where) or None,
        mentions=mentions,
        attachment=_attachment(msg, where),
        location=_location(msg, where),
    )


def _message_edited(event_id: str, data: dict[str, Any]) -> RemoteEvent:
    msg = _obj(data.get("message"), "data.message")
    where = "data.message"
    text, mentions = from_markdown(_text(msg, "markdown", where), msg, where)
    return MessageEdited(
        event_id=event_id,
        conversation_id=_str(msg, "conversation_id", where),
        timestamp=_timestamp(msg, "edited_at", where),
        message_id=_str(msg, "id", where),
        sender=_idnps(msg.get("author"), f"{where}.author"),
        text=text,
        mentions=mentions,
    )


def _message_deleted(event_id: str, data: dict[str, Any]) -> RemoteEvent:
    msg = _obj(data.get("message"), "data.message")
    where = "data.message"
    return MessageDeleted(
        event_id=event_id,
        conversation_id=_str(msg, "conversation_id", where),
        timestamp=_timestamp(msg, "deleted_at", where),
        message_id=_str(msg, "id", where),
        sender=_idnps(msg.get("author"), f"{where}.author"),
    )


def _reaction_added(event_id: str, data: dict[str, Any]) -> RemoteEvent:
    reaction = _obj(data.get("reaction"), "data.reaction")
    where = "data.reaction"
    return ReactionAdded(
        event_id=event_id,
        conversation_id=_str(reaction, "conversation_id", where),
        timestamp=_timestamp(reaction, "created_at", where),
        reaction_id=_str(reaction, "id", where),
        message_id=_str(reaction, "message_id", where),
        sender=_idnps(reaction.get("author"), f"{where}.author"),
        key=_str(reaction, "emoji", where),
    )


def _reaction_removed(event_id: str, data: dict[str, Any]) -> RemoteEvent:
    reaction = _obj(data.get("reaction"), "data.reaction")
    where = "data.reaction"
    return ReactionRemoved(
        event_id=event_id,
        conversation_id=_str(reaction, "conversation_id", where),
        timestamp=_timestamp(reaction, "created_at", where),
        reaction_id=_str(reaction, "id", where),
        message_id=_str(reaction, "message_id", where),
        sender=_idnps(reaction.get("author"), f"{where}.author"),
    )


def _conversation_read(event_id: str, data: dict[str, Any]) -> RemoteEvent:
    read = _obj(data.get("read"), "data.read")
    where = "data.read"
    return ReadUpTo(
        event_id=event_id,
        conversation_id=_str(read, "conversation_id", where),
        timestamp=_timestamp(read, "at", where),
        sender=_idnps(read.get("reader"), f"{where}.reader"),
        message_id=_str(read, "up_to", where),
    )


def _conversation_typing(event_id: str, data: dict[str, Any]) -> RemoteEvent:
    typing = _obj(data.get("typing"), "data.typing")
    where = "data.typing"
    return TypingChanged(
        event_id=event_id,
        conversation_id=_str(typing, "conversation_id", where),
        timestamp=_timestamp(typing, "at", where),
        sender=_idnps(typing.get("who"), f"{where}.who"),
        typing=payload.bool_field(typing, "typing", where),
    )


def _participants(
    event_id: str, created_at: datetime, data: dict[str, Any], *, added: bool
) -> list[RemoteEvent]:
    where = "data"
    members = tuple(
        _idnps(m, f"{where}.members[{i}]") for i, m in enumerate(_optional_list(data, "members"))
    )
    participants = tuple(
        _external(p, f"{where}.external_participants[{i}]")
        for i, p in enumerate(_optional_list(data, "external_participants"))
    )
    if not members and not participants:
        raise InvalidPayload(f"{where}.members and {where}.external_participants are both empty")
    kind = ParticipantsAdded if added else ParticipantsRemoved
    return [
        kind(
            event_id=event_id,
            conversation_id=_str(data, "conversation_id", where),
            timestamp=created_at,
            sender=_idnps(data.get("by"), f"{where}.by"),
            members=members,
            participants=participants,
        )
    ]


def _external(value: Any, where: str) -> Participant:
    """One of ``external_participants``: ``{"ref": IDNPS or Matrix user id}``."""
    return payload.participant(_str(_obj(value, where), "ref", where), f"{where}.ref")


def _participants_added(
    event_id: str, created_at: datetime, data: dict[str, Any]
) -> list[RemoteEvent]:
    return _participants(event_id, created_at, data, added=True)


def _participants_removed(
    event_id: str, created_at: datetime, data: dict[str, Any]
) -> list[RemoteEvent]:
    return _participants(event_id, created_at, data, added=False)


def _member_left(event_id: str, created_at: datetime, data: dict[str, Any]) -> list[RemoteEvent]:
    return [
        MemberLeft(
            event_id=event_id,
            conversation_id=_str(data, "conversation_id", "data"),
            timestamp=created_at,
            sender=_idnps(data.get("member"), "data.member"),
        )
    ]


def _conversation_updated(
    event_id: str, created_at: datetime, data: dict[str, Any]
) -> list[RemoteEvent]:
    """One event per key that changed: ``title`` (renamed), ``description`` (topic)."""
    common = {
        "conversation_id": _str(data, "conversation_id", "data"),
        "timestamp": created_at,
        "sender": _idnps(data.get("by"), "data.by"),
    }
    events: list[RemoteEvent] = []
    if "title" in data:
        title = payload.optional_str(data, "title", "data") or None
        events.append(ConversationRenamed(event_id=f"{event_id}:title", title=title, **common))
    if "description" in data:
        topic = payload.optional_str(data, "description", "data") or None
        events.append(TopicChanged(event_id=f"{event_id}:description", topic=topic, **common))
    if not events:
        raise InvalidPayload("data has neither a title nor a description")
    return events


_CHANGE_PARSERS: dict[str, Callable[[str, datetime, dict[str, Any]], list[RemoteEvent]]] = {
    "conversation.participants_added": _participants_added,
    "conversation.participants_removed": _participants_removed,
    "conversation.member_left": _member_left,
    "conversation.updated": _conversation_updated,
}
"""Conversation changes: dated by the envelope's ``created_at``."""

_PARSERS: dict[str, Callable[[str, dict[str, Any]], RemoteEvent]] = {
    "message.created": _message_created,
    "message.edited": _message_edited,
    "message.deleted": _message_deleted,
    "reaction.added": _reaction_added,
    "reaction.removed": _reaction_removed,
    "conversation.read": _conversation_read,
    "conversation.typing": _conversation_typing,
}


def from_markdown(
    markdown: str, message: dict[str, Any], where: str
) -> tuple[str, tuple[Mention, ...]]:
    """PandaLab Markdown to the bridge's convention: each ``@[Name](ref)`` becomes ``@Name``
    and a ``Mention``; people listed in ``mentions`` but not written in the text are kept too."""
    mentions: dict[str, Mention] = {}

    def plain(match: re.Match[str]) -> str:
        name = _ESCAPED.sub(r"\1", match.group(1))
        ref = match.group(2)
        mentions.setdefault(ref, payload.mention(ref, name, f"{where}.markdown mention"))
        return "@" + name

    text = _MENTION.sub(plain, markdown)
    listed = message.get("mentions")
    if listed is not None:
        if not isinstance(listed, list):
            raise InvalidPayload(f"{where}.mentions is not a list")
        for i, entry in enumerate(listed):
            item = _obj(entry, f"{where}.mentions[{i}]")
            ref = _str(item, "ref", f"{where}.mentions[{i}]")
            if ref not in mentions:
                name = _str(item, "display_name", f"{where}.mentions[{i}]")
                mentions[ref] = payload.mention(ref, name, f"{where}.mentions[{i}].ref")
    return text, tuple(mentions.values())


def _attachment(message: dict[str, Any], where: str) -> RemoteAttachment | None:
    attachment = payload.optional_obj(message, "attachment", where)
    if attachment is None:
        return None
    where = f"{where}.attachment"
    size = attachment.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise InvalidPayload(f"{where}.size is not a non-negative integer")
    return RemoteAttachment(
        name=_str(attachment, "name", where),
        mime_type=_str(attachment, "mime_type", where),
        size=size,
        source=_str(attachment, "url", where),
    )


def _location(message: dict[str, Any], where: str) -> Location | None:
    location = payload.optional_obj(message, "location", where)
    if location is None:
        return None
    where = f"{where}.location"
    latitude = payload.number_field(location, "lat", where)
    longitude = payload.number_field(location, "lon", where)
    if not (-90 <= latitude <= 90 and -180 <= longitude <= 180):
        raise InvalidPayload(f"{where} is not a valid latitude and longitude")
    return Location(latitude, longitude, payload.optional_str(location, "label", where))


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
        "external_participants": [sender_json(s) for s in conversation.external],
    }


def message_body(message: OutboundMessage, file_id: str | None = None) -> dict[str, Any]:
    """The ``POST /api/v1/conversations/{id}/messages`` body."""
    body: dict[str, Any] = {
        "sender": sender_json(message.sender),
        "markdown": to_markdown(message.text, message.html, message.mentions),
        "kind": message.message_kind,
        "mentions": mentions_json(message.mentions),
    }
    if message.reply_to is not None:
        body["reply_to"] = message.reply_to
    if file_id is not None:
        body["attachment"] = {"file_id": file_id}
    if message.location is not None:
        body["location"] = {
            "lat": message.location.latitude,
            "lon": message.location.longitude,
            "label": message.location.description,
        }
    return body


def edit_body(message: OutboundMessage) -> dict[str, Any]:
    """The ``PATCH .../messages/{message_id}`` body: the new text and its mentions."""
    return {
        "markdown": to_markdown(message.text, message.html, message.mentions),
        "mentions": mentions_json(message.mentions),
    }


def participants_body(change: ParticipantChange) -> dict[str, Any]:
    """The ``POST /api/v1/conversations/{id}/participants`` body."""
    return {
        "members": [str(m) for m in change.members],
        "external_participants": [sender_json(s) for s in change.external],
        "added_by": None if change.by is None else sender_json(change.by),
    }


def removal_body(change: ParticipantChange) -> dict[str, Any]:
    """The ``POST /api/v1/conversations/{id}/participants/remove`` body (``removed_by`` None:
    the people left themselves)."""
    return {
        "members": [str(m) for m in change.members],
        "external_participants": [s.ref for s in change.external],
        "removed_by": None if change.by is None else sender_json(change.by),
    }


def upload_body(attachment: OutboundAttachment) -> dict[str, Any]:
    """The ``POST /api/v1/uploads`` body."""
    return {"name": attachment.name, "mime_type": attachment.mime_type, "size": attachment.size}


def to_markdown(text: str, html: str | None, mentions: Sequence[Mention] = ()) -> str:
    """The Markdown PandaLab shows for a bridge message (already Markdown): each ``@Name`` of a
    mention becomes PandaLab's ``@[Name](ref)``."""
    del html  # the text is already Markdown (the connector's declared formatting)
    refs = {m.display_name: ref for m in mentions if m.display_name and (ref := mention_ref(m))}
    if not refs:
        return text
    # The text is escaped Markdown: a name is found as written there too ("Jean\_X").
    written = {escape_markdown(n, indentation=False): n for n in refs} | {n: n for n in refs}
    names = sorted(written, key=len, reverse=True)  # "@Jean Dupont" before "@Jean"
    pattern = re.compile("@(" + "|".join(re.escape(n) for n in names) + r")(?!\w)")

    def mention(match: re.Match[str]) -> str:
        name = written[match.group(1)]
        return f"@[{_escape_name(name)}]({refs[name]})"

    return pattern.sub(mention, text)


def mention_ref(mention: Mention) -> str | None:
    return str(mention.idnps) if mention.idnps else mention.mxid


def mentions_json(mentions: Sequence[Mention]) -> list[dict[str, str]]:
    return [
        {"ref": ref, "display_name": m.display_name}
        for m in mentions
        if (ref := mention_ref(m)) is not None
    ]


def sender_json(sender: Sender) -> dict[str, str]:
    return {"ref": sender.ref, "display_name": sender.display_name}


def _escape_name(name: str) -> str:
    return re.sub(r"([\\\[\]])", r"\\\1", name)


def _optional_list(container: dict[str, Any], key: str) -> list[Any]:
    """A list field that may be absent or null (then empty)."""
    value = container.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidPayload(f"data.{key} is not a list")
    return value


def _optional_text(container: dict[str, Any], key: str, where: str) -> str:
    """Message text that may be empty or null (a file or a location alone)."""
    return payload.optional_str(container, key, where) or ""


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
