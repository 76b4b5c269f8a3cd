"""The outbox operations: what the bridge can ask a vendor to do, one FIFO per portal.

Each operation is a frozen dataclass; its ``kind`` is what the outbox's ``operation`` column
holds, and ``to_json`` what its (sealed) ``payload`` column holds. That stored form is the one
the bridge has always written, so rows queued by an earlier version are read (``from_stored``)
and delivered like new ones. ``bridge/core/executors`` does each kind at its vendor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from bridge.core.errors import PermanentFailure
from bridge.core.members import Member
from connectors.idnps import Idnps

CREATE_CONVERSATION = "create_conversation"
SEND_MESSAGE = "send_message"
EDIT_MESSAGE = "edit_message"
REDACT = "redact"
ADD_REACTION = "add_reaction"
MARK_READ = "mark_read"

REACTION_PREFIX = "reaction:"
"""Message-map ids of reactions: ``reaction:<vendor message id>:<vendor reaction id>``."""


def reaction_ref(message_id: str, reaction_id: str) -> str:
    return f"{REACTION_PREFIX}{message_id}:{reaction_id}"


def parse_reaction_ref(ref: str) -> tuple[str, str] | None:
    """(vendor message id, vendor reaction id) of a reaction ref, or None for a message id."""
    if not ref.startswith(REACTION_PREFIX):
        return None
    message_id, _, reaction_id = ref[len(REACTION_PREFIX) :].rpartition(":")
    return (message_id, reaction_id) if message_id else None


class UnreadableOperation(PermanentFailure):
    """A queued row that is no operation this bridge knows (an unknown kind, a payload missing
    what its kind needs): it can never be delivered."""


# --- The operations -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CreateConversation:
    """Open the vendor conversation of a portal (before any message of it goes there)."""

    kind: ClassVar[str] = CREATE_CONVERSATION

    title: str | None
    members: tuple[Idnps, ...]
    """The vendor's own users in the portal."""
    external: tuple[Member, ...]
    """Everyone else in it, as the vendor will show them."""

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "members": list(self.members),
            "external": [m.to_json() for m in self.external],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CreateConversation:
        return cls(
            title=data.get("title"),
            members=tuple(Idnps(m) for m in data["members"]),
            external=tuple(Member.from_json(m) for m in data["external"]),
        )


@dataclass(frozen=True, kw_only=True)
class SendMessage:
    """A Matrix message (text, file, location) to show in the vendor conversation."""

    kind: ClassVar[str] = SEND_MESSAGE

    event_id: str
    sender: Member
    content: dict[str, Any]
    """The Matrix content, rendered for the vendor at delivery (``degradation.py``)."""
    ts: int | None = None
    """When it was sent (ms), from the Matrix event."""
    reply_to_event: str | None = None
    """The Matrix event it answers."""

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "sender": self.sender.to_json(),
            "content": self.content,
            "ts": self.ts,
            "reply_to_event": self.reply_to_event,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SendMessage:
        return cls(
            event_id=_str(data["event_id"]),
            sender=Member.from_json(data["sender"]),
            content=_dict(data["content"]),
            ts=data.get("ts"),
            reply_to_event=data.get("reply_to_event") or None,
        )


@dataclass(frozen=True, kw_only=True)
class EditMessage:
    """A correction of a message this vendor was sent (``target_event``)."""

    kind: ClassVar[str] = EDIT_MESSAGE

    event_id: str
    target_event: str
    sender: Member
    content: dict[str, Any]
    """The new content (the edit's ``m.new_content``)."""
    ts: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "target_event": self.target_event,
            "sender": self.sender.to_json(),
            "content": self.content,
            "ts": self.ts,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EditMessage:
        return cls(
            event_id=_str(data["event_id"]),
            target_event=_str(data["target_event"]),
            sender=Member.from_json(data["sender"]),
            content=_dict(data["content"]),
            ts=data.get("ts"),
        )


@dataclass(frozen=True, kw_only=True)
class Redact:
    """The removal of a message or a reaction this vendor was sent (``target_event``)."""

    kind: ClassVar[str] = REDACT

    event_id: str
    target_event: str
    sender: Member
    ts: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "target_event": self.target_event,
            "sender": self.sender.to_json(),
            "ts": self.ts,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Redact:
        return cls(
            event_id=_str(data["event_id"]),
            target_event=_str(data["target_event"]),
            sender=Member.from_json(data["sender"]),
            ts=data.get("ts"),
        )


@dataclass(frozen=True, kw_only=True)
class AddReaction:
    """A reaction (``key``, an emoji or short text) to a message this vendor was sent."""

    kind: ClassVar[str] = ADD_REACTION

    event_id: str
    target_event: str
    sender: Member
    key: str
    ts: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "target_event": self.target_event,
            "sender": self.sender.to_json(),
            "key": self.key,
            "ts": self.ts,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AddReaction:
        return cls(
            event_id=_str(data["event_id"]),
            target_event=_str(data["target_event"]),
            sender=Member.from_json(data["sender"]),
            key=_str(data["key"]),
            ts=data.get("ts"),
        )


@dataclass(frozen=True, kw_only=True)
class MarkRead:
    """A Matrix user read the conversation up to ``event_id`` (no send status: a marker)."""

    kind: ClassVar[str] = MARK_READ

    event_id: str
    sender: Member
    """The reader."""

    def to_json(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "sender": self.sender.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MarkRead:
        return cls(event_id=_str(data["event_id"]), sender=Member.from_json(data["sender"]))


Operation = CreateConversation | SendMessage | EditMessage | Redact | AddReaction | MarkRead
OPERATION_TYPES: tuple[type[Operation], ...] = (
    CreateConversation,
    SendMessage,
    EditMessage,
    Redact,
    AddReaction,
    MarkRead,
)
_BY_KIND: dict[str, type[Operation]] = {t.kind: t for t in OPERATION_TYPES}

Reported = SendMessage | EditMessage | Redact | AddReaction
"""The operations whose sender is told what became of them (a send status; a read marker and
a conversation's opening are nobody's message)."""


def from_stored(kind: str, payload: dict[str, Any]) -> Operation:
    """The operation an outbox row holds (its ``operation`` column and opened ``payload``);
    raises ``UnreadableOperation`` for a row no operation of this bridge reads."""
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise UnreadableOperation(f"unknown outbox operation {kind!r}")
    try:
        return cls.from_json(payload)
    except (KeyError, TypeError, ValueError, AttributeError):
        # The payload's content stays out of the message (it is shown to people).
        raise UnreadableOperation(f"the queued {kind} lacks what it needs") from None


def readable(kind: str, payload: dict[str, Any]) -> Operation | None:
    """``from_stored``, or None for a row it cannot read."""
    try:
        return from_stored(kind, payload)
    except UnreadableOperation:
        return None


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError("not an object")
    return value
