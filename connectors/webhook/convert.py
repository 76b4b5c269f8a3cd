"""Webhook contract JSON to the bridge's types and back (openapi.yaml, component schemas).

Vendor events are read strictly, as the contract's schemas say (required fields, types, lengths,
patterns, no unknown field), because a vendor writes this JSON by hand from the contract: a
mistake must come back as a 400 that names the field and the rule, never be half understood.
Messages name fields and rules, never content.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from connectors.base import (
    ConversationCreated,
    ConversationRenamed,
    DeliveryReport,
    Formatting,
    Idnps,
    InvalidIdnps,
    Location,
    MemberLeft,
    Mention,
    MessageDeleted,
    MessageEdited,
    MessageReceived,
    NewConversation,
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

MAX_ID_LENGTH = 200
MAX_NAME_LENGTH = 255
MAX_TEXT_LENGTH = 65536
MAX_TOPIC_LENGTH = 4000
"""A ``Topic`` (openapi.yaml), both ways."""
MAX_REASON_LENGTH = 500
MAX_KEY_LENGTH = 64
MAX_MENTIONS = 50
MAX_PEOPLE = 100
MAX_DETAIL_LENGTH = 1000
MAX_FILE_SIZE = 1 << 40
MESSAGE_KINDS: frozenset[str] = frozenset({"text", "notice", "emote"})

_ID = re.compile(r"[!-~]{1,200}")
_IDNPS_FORM = re.compile(r"8[0-9]{11}|0[0-9]{9}")
_MXID = re.compile(r"@[!-9;-~]+:[!-~]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MIME = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_TIMESTAMP = re.compile(
    r"(19[7-9][0-9]|2[0-9]{3})-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


class InvalidEvent(ValueError):
    """A vendor request the contract refuses: a status (400 malformed, 422 well formed but
    unacceptable), a machine code and a sentence that names the field and the rule."""

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# --- Vendor -> bridge: events ---------------------------------------------------------------------


def events_from_request(body: Any, max_events: int) -> list[RemoteEvent]:
    """A ``POST /events`` body (one event, or ``{"events": [...]}``) as ``RemoteEvent``s."""
    if not isinstance(body, dict):
        raise InvalidEvent('the body must be a JSON object: an event, or {"events": [...]}')
    if "events" in body and "type" not in body:
        _fields(body, "the body", ("events",))
        items = body["events"]
        if not isinstance(items, list) or not items:
            raise InvalidEvent("the body's 'events' must be a non-empty array of events")
        if len(items) > max_events:
            raise InvalidEvent(f"a request holds at most {max_events} events; got {len(items)}")
        return [event_from_json(item, f"events[{i}]") for i, item in enumerate(items)]
    return [event_from_json(body, "the event")]


def event_from_json(data: Any, where: str) -> RemoteEvent:
    if not isinstance(data, dict):
        raise InvalidEvent(f"{where} must be an object")
    kind = data.get("type")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        known = ", ".join(sorted(_PARSERS))
        raise InvalidEvent(f"{where}.type must be one of: {known}")
    return parser(data, where)


_COMMON = ("id", "type", "conversation_id", "at")


def _common(data: dict[str, Any], where: str) -> dict[str, Any]:
    return {
        "event_id": _id(data["id"], f"{where}.id"),
        "conversation_id": _id(data["conversation_id"], f"{where}.conversation_id"),
        "timestamp": _timestamp(data["at"], f"{where}.at"),
    }


def _conversation_created(data: dict[str, Any], where: str) -> RemoteEvent:
    _fields(data, where, (*_COMMON, "creator", "members", "participants"), ("title", "topic"))
    creator = _idnps(data["creator"], f"{where}.creator")
    members = _array(data["members"], f"{where}.members", 1, MAX_PEOPLE, _idnps)
    participants = _array(
        data["participants"], f"{where}.participants", 1, MAX_PEOPLE, _participant
    )
    return ConversationCreated(
        **_common(data, where),
        creator=creator,
        members=tuple(_unique([creator, *members])),
        participants=tuple(_unique(participants)),
        title=_title(data.get("title"), f"{where}.title"),
        topic=_topic_value(data.get("topic"), f"{where}.topic"),
    )


def _message(data: dict[str, Any], where: str) -> RemoteEvent:
    _fields(
        data,
        where,
        (*_COMMON, "message_id", "sender", "text"),
        ("kind", "reply_to", "mentions", "attachment", "location"),
    )
    text = _text(data["text"], f"{where}.text")
    attachment = _attachment(data.get("attachment"), f"{where}.attachment")
    location = _location(data.get("location"), f"{where}.location")
    if not text and attachment is None and location is None:
        raise InvalidEvent(f"{where} needs a non-empty text, an attachment or a location")
    kind = data.get("kind", "text")
    if not isinstance(kind, str) or kind not in MESSAGE_KINDS:
        raise InvalidEvent(f"{where}.kind must be one of: {', '.join(sorted(MESSAGE_KINDS))}")
    reply_to = data.get("reply_to")
    return MessageReceived(
        **_common(data, where),
        message_id=_id(data["message_id"], f"{where}.message_id"),
        sender=_idnps(data["sender"], f"{where}.sender"),
        text=text,
        message_kind=kind,
        reply_to=None if reply_to is None else _id(reply_to, f"{where}.reply_to"),
        mentions=_mentions(data.get("mentions", []), f"{where}.mentions"),
        attachment=attachment,
        location=location,
    )


def _message_edited(data: dict[str, Any], where: str) -> RemoteEvent:
    _fields(data, where, (*_COMMON, "message_id", "sender", "text"), ("mentions",))
    text = _text(data["text"], f"{where}.text")
    if not text:
        raise InvalidEvent(f"{where}.text must not be empty")
    return MessageEdited(
        **_common(data, where),
        message_id=_id(data["message_id"], f"{where}.message_id"),
        sender=_idnps(data["sender"], f"{where}.sender"),
        text=text,
        mentions=_mentions(data.get("mentions", []), f"{where}.mentions"),
    )


def _message_deleted(data: dict[str, Any], where: str) -> RemoteEvent:
    _fields(data, where, (*_COMMON, "message_id", "sender"))
    return MessageDeleted(
        **_common(data, where),
        message_id=_id(data["message_id"], f"{where}.message_id"),
        sender=_idnps(data["sender"], f"{where}.sender"),
    )


def _reaction_added(data: dict[str, Any], where: str) -> RemoteEvent:
    _fields(data, where, (*_COMMON, "reaction_id", "message_id", "sender", "key"))
    return ReactionAdded(
        **_common(data, where),
        reaction_id=_id(data["reaction_id"], f"{where}.reaction_id"),
        message_id=_id(data["message_id"], f"{where}.message_id"),
        sender=_idnps(data["sender"], f"{where}.sender"),
        key=_name(data["key"], f"{where}.key", MAX_KEY_LENGTH),
    )


def _reaction_removed(data: dict[str, Any], where: str) -> RemoteEvent:
    _fields(data, where, (*_COMMON, "reaction_id", "message_id", "sender"))
    return ReactionRemoved(
        **_common(data, where),
        reaction_id=_id(data["reaction_id"], f"{where}.reaction_id"),
        message_id=_id(data["message_id"], f"{where}.message_id"),
        sender=_idnps(data["sender"], f"{where}.sender"),
    )


def _read(data: dict[str, Any], where: str) -> RemoteEvent:
    _fields(data, where, (*_COMMON, "sender", "message_id"))
    return ReadUpTo(
        **_common(data, where),
        sender=_idnps(data["sender"], f"{where}.sender"),
        message_id=_id(data["message_id"], f"{where}.message_id"),
    )


def _typing(data: dict[str, Any], where: str) -> RemoteEvent:
    _fields(data, where, (*_COMMON, "sender", "typing"))
    typing = data["typing"]
    if not isinstance(typing, bool):
        raise InvalidEvent(f"{where}.typing must be true or false")
    return TypingChanged(
        **_common(data, where), sender=_idnps(data["sender"], f"{where}.sender"), typing=typing
    )


def _participants(data: dict[str, Any], where: str, *, added: bool) -> RemoteEvent:
    _fields(data, where, (*_COMMON, "sender"), ("members", "participants"))
    members = _array(data.get("members", []), f"{where}.members", 0, MAX_PEOPLE, _idnps)
    participants = _array(
        data.get("participants", []), f"{where}.participants", 0, MAX_PEOPLE, _participant
    )
    if not members and not participants:
        raise InvalidEvent(f"{where} needs at least one of members or participants")
    kind = ParticipantsAdded if added else ParticipantsRemoved
    return kind(
        **_common(data, where),
        sender=_idnps(data["sender"], f"{where}.sender"),
        members=tuple(_unique(members)),
        participants=tuple(_unique(participants)),
    )


def _participants_added(data: dict[str, Any], where: str) -> RemoteEvent:
    return _participants(data, where, added=True)


def _participants_removed(data: dict[str, Any], where: str) -> RemoteEvent:
    return _participants(data, where, added=False)


def _member_left(data: dict[str, Any], where: str) -> RemoteEvent:
    _fields(data, where, (*_COMMON, "sender"))
    return MemberLeft(**_common(data, where), sender=_idnps(data["sender"], f"{where}.sender"))


def _renamed(data: dict[str, Any], where: str) -> RemoteEvent:
    _fields(data, where, (*_COMMON, "sender", "title"))
    return ConversationRenamed(
        **_common(data, where),
        sender=_idnps(data["sender"], f"{where}.sender"),
        title=_title(data["title"], f"{where}.title"),
    )


def _topic(data: dict[str, Any], where: str) -> RemoteEvent:
    _fields(data, where, (*_COMMON, "sender", "topic"))
    return TopicChanged(
        **_common(data, where),
        sender=_idnps(data["sender"], f"{where}.sender"),
        topic=_topic_value(data["topic"], f"{where}.topic"),
    )


def _topic_value(value: Any, where: str) -> str | None:
    """A ``Topic``: a string without NUL of at most 4,000 characters, or null (empty: none)."""
    if value is None:
        return None
    topic = _text(_string(value, where, "a string or null"), where)
    if len(topic) > MAX_TOPIC_LENGTH:
        raise InvalidEvent(f"{where} is longer than {MAX_TOPIC_LENGTH} characters")
    return topic or None


_PARSERS: dict[str, Callable[[dict[str, Any], str], RemoteEvent]] = {
    "conversation.created": _conversation_created,
    "participants.added": _participants_added,
    "participants.removed": _participants_removed,
    "member.left": _member_left,
    "conversation.renamed": _renamed,
    "conversation.topic": _topic,
    "message": _message,
    "message.edited": _message_edited,
    "message.deleted": _message_deleted,
    "reaction.added": _reaction_added,
    "reaction.removed": _reaction_removed,
    "read": _read,
    "typing": _typing,
}


# --- Field readers --------------------------------------------------------------------------------


def _fields(
    data: dict[str, Any], where: str, required: Sequence[str], optional: Sequence[str] = ()
) -> None:
    """``data`` has every ``required`` field and no field the contract does not name."""
    for key in required:
        if key not in data:
            raise InvalidEvent(f"{where}.{key} is required")
    allowed = {*required, *optional}
    for key in data:
        if key not in allowed:
            raise InvalidEvent(f"{where} has an unknown field {key[:40]!r}")


def _string(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidEvent(f"{where} must be {what}")
    return value


def _id(value: Any, where: str) -> str:
    text = _string(value, where, "a string id")
    if not _ID.fullmatch(text):
        raise InvalidEvent(f"{where} must be 1 to {MAX_ID_LENGTH} visible ASCII characters")
    return text


def _idnps(value: Any, where: str) -> Idnps:
    text = _string(value, where, "an IDNPS (a string of digits)")
    try:
        idnps = Idnps(text)
    except InvalidIdnps as exc:
        # A value of the IDNPS form whose check digit is wrong is well formed but unacceptable.
        status = 422 if _IDNPS_FORM.fullmatch(text) else 400
        raise InvalidEvent(
            f"{where} is not a valid IDNPS: {exc}", status=status, code="invalid_idnps"
        ) from None
    if idnps != text:
        raise InvalidEvent(f"{where} is not a valid IDNPS: no spaces around the digits")
    return idnps


def _participant(value: Any, where: str) -> Participant:
    text = _string(value, where, "an IDNPS or a Matrix user id")
    if text.startswith("@"):
        if len(text) > MAX_NAME_LENGTH or not _MXID.fullmatch(text):
            raise InvalidEvent(
                f"{where} is not a Matrix user id: expected '@localpart:server' in visible "
                f"ASCII, at most {MAX_NAME_LENGTH} characters"
            )
        return Participant(mxid=text)
    return Participant(idnps=_idnps(text, where))


def _name(value: Any, where: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A short single-line string: a display name, a file name, a reaction key."""
    text = _string(value, where, "a string")
    if not text or len(text) > max_length:
        raise InvalidEvent(f"{where} must be 1 to {max_length} characters")
    if _CONTROL.search(text):
        raise InvalidEvent(f"{where} must not contain control characters")
    return text


def _title(value: Any, where: str) -> str | None:
    if value is None:
        return None
    text = _string(value, where, "a string or null")
    if len(text) > MAX_NAME_LENGTH or _CONTROL.search(text):
        raise InvalidEvent(
            f"{where} must be at most {MAX_NAME_LENGTH} characters, without control characters"
        )
    return text or None


def _text(value: Any, where: str) -> str:
    text = _string(value, where, "a string")
    if len(text) > MAX_TEXT_LENGTH:
        raise InvalidEvent(f"{where} is longer than {MAX_TEXT_LENGTH} characters")
    if "\x00" in text:
        raise InvalidEvent(f"{where} must not contain NUL characters")
    return text


def _timestamp(value: Any, where: str) -> datetime:
    """RFC 3339 with a UTC offset, as an aware datetime in UTC. Years 1970 to 2999: the
    bridge dates Matrix events with it, and the homeserver counts from 1970."""
    text = _string(value, where, "an RFC 3339 timestamp string")
    invalid = InvalidEvent(
        f"{where} must be an RFC 3339 timestamp with a UTC offset, years 1970 to 2999"
    )
    if not _TIMESTAMP.fullmatch(text):
        raise invalid
    normal = text.replace("t", "T").replace("z", "+00:00").replace("Z", "+00:00")
    whole, dot, rest = normal.partition(".")
    if dot:  # fromisoformat takes at most 6 fraction digits
        digits = re.match(r"[0-9]+", rest)
        assert digits is not None
        normal = f"{whole}.{digits.group(0)[:6].ljust(6, '0')}{rest[digits.end() :]}"
    try:
        return datetime.fromisoformat(normal).astimezone(UTC)
    except (ValueError, OverflowError):  # out of range, or past year 1..9999 once in UTC
        raise invalid from None


def _array(
    value: Any, where: str, low: int, high: int, item: Callable[[Any, str], Any]
) -> list[Any]:
    if not isinstance(value, list) or not low <= len(value) <= high:
        raise InvalidEvent(f"{where} must be an array of {low} to {high} items")
    return [item(entry, f"{where}[{i}]") for i, entry in enumerate(value)]


def _mentions(value: Any, where: str) -> tuple[Mention, ...]:
    def mention(entry: Any, at: str) -> Mention:
        if not isinstance(entry, dict):
            raise InvalidEvent(f"{at} must be an object")
        _fields(entry, at, ("ref", "display_name"))
        person = _participant(entry["ref"], f"{at}.ref")
        name = _name(entry["display_name"], f"{at}.display_name")
        return Mention(display_name=name, idnps=person.idnps, mxid=person.mxid)

    if not isinstance(value, list) or len(value) > MAX_MENTIONS:
        raise InvalidEvent(f"{where} must be an array of at most {MAX_MENTIONS} mentions")
    return tuple(_unique(mention(entry, f"{where}[{i}]") for i, entry in enumerate(value)))


def _attachment(value: Any, where: str) -> RemoteAttachment | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidEvent(f"{where} must be an object or null")
    _fields(value, where, ("file_id", "name", "mime_type", "size"))
    mime_type = _string(value["mime_type"], f"{where}.mime_type", "a string")
    if not _MIME.fullmatch(mime_type):
        raise InvalidEvent(f"{where}.mime_type must be a lower-case MIME type 'type/subtype'")
    size = value["size"]
    if isinstance(size, float) and size.is_integer():
        size = int(size)  # JSON has one number type: 1043.0 is the integer 1043
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_SIZE:
        raise InvalidEvent(f"{where}.size must be an integer from 0 to {MAX_FILE_SIZE}")
    return RemoteAttachment(
        name=_name(value["name"], f"{where}.name"),
        mime_type=mime_type,
        size=size,
        source=_id(value["file_id"], f"{where}.file_id"),
    )


def _location(value: Any, where: str) -> Location | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidEvent(f"{where} must be an object or null")
    _fields(value, where, ("latitude", "longitude"), ("description",))
    latitude = _number(value["latitude"], f"{where}.latitude", 90)
    longitude = _number(value["longitude"], f"{where}.longitude", 180)
    description = value.get("description")
    if description is not None:
        description = _string(description, f"{where}.description", "a string or null")
        if len(description) > MAX_NAME_LENGTH or "\x00" in description:
            raise InvalidEvent(f"{where}.description must be at most 255 characters, no NUL")
    return Location(latitude, longitude, description or None)


def _number(value: Any, where: str, bound: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidEvent(f"{where} must be a number")
    number = float(value)
    if not math.isfinite(number) or not -bound <= number <= bound:
        raise InvalidEvent(f"{where} must be within [-{bound:g}, {bound:g}]")
    return number


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


# --- Bridge -> vendor: request bodies -------------------------------------------------------------


def person_json(person: Sender) -> dict[str, str]:
    """``Person``: how vendors name someone outside them (IDNPS when known, else Matrix id)."""
    return {
        "ref": person.ref,
        "display_name": display_name(person.display_name, person.mxid),
        "mxid": person.mxid,
    }


def display_name(name: str, fallback: str) -> str:
    """A ``DisplayName``: single line, 1 to 255 characters."""
    cleaned = _CONTROL.sub(" ", name).strip()[:MAX_NAME_LENGTH]
    return cleaned or fallback[:MAX_NAME_LENGTH]


def mentions_json(mentions: Sequence[Mention]) -> list[dict[str, str]]:
    people = []
    for mention in mentions[:MAX_MENTIONS]:
        ref = str(mention.idnps) if mention.idnps else mention.mxid
        if ref:
            people.append({"ref": ref, "display_name": display_name(mention.display_name, ref)})
    return people


def conversation_body(conversation: NewConversation) -> dict[str, Any]:
    return {
        "title": title_text(conversation.title),
        "members": [str(m) for m in conversation.members[:MAX_PEOPLE]],
        "external": [person_json(p) for p in conversation.external[:MAX_PEOPLE]],
    }


def message_body(
    message: OutboundMessage, formatting: Formatting, attachment: dict[str, Any] | None
) -> dict[str, Any]:
    """``OutgoingMessage``; ``attachment`` is the ``FileRef`` of a file uploaded first."""
    location = message.location
    return {
        "sender": person_json(message.sender),
        "text": _outgoing_text(message.text),
        "format": formatting,
        "html": message.html,
        "kind": message.message_kind,
        "reply_to": message.reply_to,
        "mentions": mentions_json(message.mentions),
        "attachment": attachment,
        "location": None
        if location is None
        else {
            "latitude": location.latitude,
            "longitude": location.longitude,
            "description": (location.description or "").replace("\x00", "")[:MAX_NAME_LENGTH]
            or None,
        },
        "sent_at": iso8601(message.timestamp),
    }


def edit_body(message: OutboundMessage, formatting: Formatting) -> dict[str, Any]:
    return {
        "sender": person_json(message.sender),
        "text": _outgoing_text(message.text),
        "format": formatting,
        "html": message.html,
        "mentions": mentions_json(message.mentions),
    }


def participants_body(change: ParticipantChange) -> dict[str, Any]:
    """``POST /conversations/{cid}/participants``: who joins, and who added them."""
    return {
        "members": [str(m) for m in change.members[:MAX_PEOPLE]],
        "external": [person_json(p) for p in change.external[:MAX_PEOPLE]],
        "by": None if change.by is None else person_json(change.by),
    }


def removal_body(change: ParticipantChange) -> dict[str, Any]:
    """``POST /conversations/{cid}/participants/remove`` (``by`` null: they left)."""
    reason = _CONTROL.sub(" ", change.reason).strip()[:MAX_REASON_LENGTH] if change.reason else None
    return {**participants_body(change), "reason": reason or None}


def title_text(title: str | None) -> str | None:
    """A ``Title``: single line, at most 255 characters; empty is none."""
    if title is None:
        return None
    return _CONTROL.sub(" ", title).strip()[:MAX_NAME_LENGTH] or None


def topic_text(topic: str | None) -> str | None:
    """A ``Topic``: text without NUL, at most 4,000 characters; empty is none."""
    if topic is None:
        return None
    return _outgoing_text(topic)[:MAX_TOPIC_LENGTH] or None


def reaction_key(key: str) -> str | None:
    """A ``ReactionKey`` (1 to 64 characters, single line), or None when nothing is left."""
    return _CONTROL.sub("", key)[:MAX_KEY_LENGTH] or None


def delivery_body(report: DeliveryReport) -> dict[str, str]:
    return {"status": report.status, "detail": report.detail[:MAX_DETAIL_LENGTH]}


def file_name(name: str) -> str:
    return _CONTROL.sub("", name).strip()[:MAX_NAME_LENGTH] or "file"


def iso8601(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def _outgoing_text(text: str) -> str:
    return text.replace("\x00", "")[:MAX_TEXT_LENGTH]


# --- Vendor answers -------------------------------------------------------------------------------


class InvalidAnswer(ValueError):
    """A vendor answer the contract does not allow (the message names the field)."""


def answer_id(body: Any, key: str, what: str) -> str:
    """The ``key`` id of a vendor answer (``conversation_id``, ``message_id`` ...)."""
    if not isinstance(body, dict):
        raise InvalidAnswer(f"the {what} answer is not a JSON object")
    value = body.get(key)
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidAnswer(
            f"the {what} answer has no valid {key!r} (1 to {MAX_ID_LENGTH} visible ASCII)"
        )
    return value


def user_from_json(body: Any, asked: Idnps) -> RemoteUser:
    """A ``User`` answer; it must describe the professional asked about."""
    user = _user(body, "user")
    if user.idnps != asked:
        raise InvalidAnswer("the user answer describes another IDNPS than the one asked")
    return user


def _user(body: Any, where: str) -> RemoteUser:
    if not isinstance(body, dict):
        raise InvalidAnswer(f"the {where} answer is not a JSON object")
    try:
        idnps = _idnps(body.get("idnps"), f"{where}.idnps")
        names = [_name(body.get(k), f"{where}.{k}") for k in ("given_name", "family_name")]
        profession = _name(body.get("profession"), f"{where}.profession")
    except InvalidEvent as exc:
        raise InvalidAnswer(str(exc)) from None
    return RemoteUser(idnps, names[0], names[1], profession)


MAX_CURSOR_LENGTH = 1000
_CURSOR = re.compile(r"[!-~]{1,1000}")


def user_page_from_json(body: Any) -> tuple[list[RemoteUser | InvalidAnswer], str | None]:
    """A ``UserPage`` answer: each user (or why it is malformed, to be left out) and
    ``next_cursor`` (None on the last page). A page that is itself malformed raises."""
    if not isinstance(body, dict):
        raise InvalidAnswer("the user list answer is not a JSON object")
    items = body.get("users")
    if not isinstance(items, list):
        raise InvalidAnswer("the user list answer has no 'users' array")
    cursor = body.get("next_cursor")
    if cursor is not None and (not isinstance(cursor, str) or not _CURSOR.fullmatch(cursor)):
        raise InvalidAnswer(
            f"the user list answer's 'next_cursor' is neither null nor 1 to {MAX_CURSOR_LENGTH} "
            "visible ASCII"
        )
    users: list[RemoteUser | InvalidAnswer] = []
    for i, item in enumerate(items):
        try:
            users.append(_user(item, f"users[{i}]"))
        except InvalidAnswer as exc:
            users.append(exc)
    return users, cursor
