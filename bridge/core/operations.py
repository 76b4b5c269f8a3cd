"""The outbox operations: what the bridge can ask a vendor to do, one FIFO per portal.

Each operation is a frozen dataclass; its ``kind`` is what the outbox's ``operation`` column
holds, and ``to_json`` what its (sealed) ``payload`` column holds (pydantic writes and reads it
from the fields, as for ``RemoteEvent``). That stored form is the one
the bridge has always written, so rows queued by an earlier version are read (``from_stored``)
and delivered like new ones. ``bridge/core/executors`` does each kind at its vendor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, TypeAdapter

from bridge.core.errors import PermanentFailure
from bridge.core.members import Member
from connectors.idnps import Idnps

CREATE_CONVERSATION = "create_conversation"
SEND_MESSAGE = "send_message"
EDIT_MESSAGE = "edit_message"
REDACT = "redact"
ADD_REACTION = "add_reaction"
MARK_READ = "mark_read"
ADD_PARTICIPANTS = "add_participants"
REMOVE_PARTICIPANTS = "remove_participants"
SET_TITLE = "set_title"
SET_TOPIC = "set_topic"
SYSTEM_NOTICE = "system_notice"

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


class _Stored:
    """What every operation shares: its stored form, written and read by pydantic from the
    dataclass's fields (in their order: the payload the bridge has always written)."""

    kind: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        """The outbox row's ``payload`` (before it is sealed)."""
        stored: dict[str, Any] = _ADAPTERS[self.kind].dump_python(self, mode="json")
        return stored


EventRef = Annotated[str | None, BeforeValidator(lambda value: value or None)]
"""A Matrix event id that may be absent (older rows wrote an empty string)."""


@dataclass(frozen=True, kw_only=True)
class CreateConversation(_Stored):
    """Open the vendor conversation of a portal (before any message of it goes there)."""

    kind: ClassVar[str] = CREATE_CONVERSATION

    title: str | None = None
    members: tuple[Idnps, ...]
    """The vendor's own users in the portal."""
    external: tuple[Member, ...]
    """Everyone else in it, as the vendor will show them."""


@dataclass(frozen=True, kw_only=True)
class SendMessage(_Stored):
    """A Matrix message (text, file, location) to show in the vendor conversation."""

    kind: ClassVar[str] = SEND_MESSAGE

    event_id: str
    sender: Member
    content: dict[str, Any]
    """The Matrix content, rendered for the vendor at delivery (``degradation.py``)."""
    ts: int | None = None
    """When it was sent (ms), from the Matrix event."""
    reply_to_event: EventRef = None
    """The Matrix event it answers."""


@dataclass(frozen=True, kw_only=True)
class EditMessage(_Stored):
    """A correction of a message this vendor was sent (``target_event``)."""

    kind: ClassVar[str] = EDIT_MESSAGE

    event_id: str
    target_event: str
    sender: Member
    content: dict[str, Any]
    """The new content (the edit's ``m.new_content``)."""
    ts: int | None = None


@dataclass(frozen=True, kw_only=True)
class Redact(_Stored):
    """The removal of a message or a reaction this vendor was sent (``target_event``)."""

    kind: ClassVar[str] = REDACT

    event_id: str
    target_event: str
    sender: Member
    ts: int | None = None


@dataclass(frozen=True, kw_only=True)
class AddReaction(_Stored):
    """A reaction (``key``, an emoji or short text) to a message this vendor was sent."""

    kind: ClassVar[str] = ADD_REACTION

    event_id: str
    target_event: str
    sender: Member
    key: str
    ts: int | None = None


@dataclass(frozen=True, kw_only=True)
class MarkRead(_Stored):
    """A Matrix user read the conversation up to ``event_id`` (no send status: a marker)."""

    kind: ClassVar[str] = MARK_READ

    event_id: str
    sender: Member
    """The reader."""


@dataclass(frozen=True, kw_only=True)
class AddParticipants(_Stored):
    """People joined the portal: the vendor conversation gets them too.

    ``members``: the vendor's own users (its ghosts joined); ``external``: everyone else.
    ``event_id``: the membership event that said so (the idempotency of the change).
    """

    kind: ClassVar[str] = ADD_PARTICIPANTS

    event_id: str
    members: tuple[Idnps, ...] = ()
    external: tuple[Member, ...] = ()
    by: Member | None = None
    """Who added them (None: they joined of their own accord)."""


@dataclass(frozen=True, kw_only=True)
class RemoveParticipants(_Stored):
    """People left the portal or were removed from it: the vendor conversation follows.

    ``members``: the vendor's own users (its ghosts left or were kicked); ``external``: anyone
    else. ``by``: who removed them (None: they left).
    """

    kind: ClassVar[str] = REMOVE_PARTICIPANTS

    event_id: str
    members: tuple[Idnps, ...] = ()
    external: tuple[Member, ...] = ()
    by: Member | None = None
    reason: str | None = None
    """The reason given with a removal, if any (shown to the people removed)."""


@dataclass(frozen=True, kw_only=True)
class SetTitle(_Stored):
    """The portal was renamed (``m.room.name``): the vendor conversation's title follows."""

    kind: ClassVar[str] = SET_TITLE

    event_id: str
    title: str | None
    by: Member


@dataclass(frozen=True, kw_only=True)
class SetTopic(_Stored):
    """The portal's topic changed (``m.room.topic``): the vendor conversation's follows."""

    kind: ClassVar[str] = SET_TOPIC

    event_id: str
    topic: str | None
    by: Member


@dataclass(frozen=True, kw_only=True)
class SystemNotice(_Stored):
    """What the bridge told the portal room about the conversation (someone could not be added,
    a message could not reach someone ...), told to the vendor's users too: a system message
    where the vendor has them, else a message from "EIMIS". Nobody's message: no send status.
    ``event_id``: the notice's key (the idempotency of the system message)."""

    kind: ClassVar[str] = SYSTEM_NOTICE

    event_id: str
    text: str


Operation = (
    CreateConversation
    | SendMessage
    | EditMessage
    | Redact
    | AddReaction
    | MarkRead
    | AddParticipants
    | RemoveParticipants
    | SetTitle
    | SetTopic
    | SystemNotice
)
OPERATION_TYPES: tuple[type[Operation], ...] = (
    CreateConversation,
    SendMessage,
    EditMessage,
    Redact,
    AddReaction,
    MarkRead,
    AddParticipants,
    RemoveParticipants,
    SetTitle,
    SetTopic,
    SystemNotice,
)
_ADAPTERS: dict[str, TypeAdapter[Any]] = {t.kind: TypeAdapter(t) for t in OPERATION_TYPES}

Reported = SendMessage | EditMessage | Redact | AddReaction
"""The operations whose sender is told what became of them (a send status; a read marker, a
conversation's opening and a membership, name or topic change are nobody's message: a change
that fails for good is told in the room instead)."""


def from_stored(kind: str, payload: dict[str, Any]) -> Operation:
    """The operation an outbox row holds (its ``operation`` column and opened ``payload``);
    raises ``UnreadableOperation`` for a row no operation of this bridge reads."""
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        raise UnreadableOperation(f"unknown outbox operation {kind!r}")
    try:
        operation: Operation = adapter.validate_python(payload)
        return operation
    except ValueError:  # pydantic's ValidationError
        # The payload's content stays out of the message (it is shown to people).
        raise UnreadableOperation(f"the queued {kind} lacks what it needs") from None


def readable(kind: str, payload: dict[str, Any]) -> Operation | None:
    """``from_stored``, or None for a row it cannot read."""
    try:
        return from_stored(kind, payload)
    except UnreadableOperation:
        return None
