"""The connector interface: what a vendor connector must do, may do, and the events it emits.

A connector turns one vendor's API into the bridge's vocabulary. The required part is small
(start/stop, create a remote conversation, send a message into one, describe a remote user);
each optional operation is its own small abstract class the connector inherits (``EditHandling``,
``DeletionHandling``, ``ReactionHandling``, ``ReadReceiptHandling``, ``TypingHandling``,
``DeliveryStatusHandling``, ``UserListing`` ..., and ``AttachmentSource`` for a connector that
emits files). The operation flags of ``capabilities`` are derived from those classes; the rest
of ``capabilities`` (formatting, limits, files ...) the connector declares. So the bridge knows
what it can ask for and degrades what a vendor cannot show (an edit becomes a marked correction,
a reaction a short message ...), telling the sender. Vendor events enter the bridge as typed
``RemoteEvent``s through ``ConnectorContext.emit``, which returns only once the event is durably
stored: a connector acknowledges its vendor (or advances its poll cursor) after ``emit``.

Text conventions, both ways: text is in the connector's declared ``formatting`` (``plain`` or
``markdown``); a mention of a person is written ``@<display name>`` in the text and listed in
``mentions``. A connector with its own mention syntax converts to and from that form.

A connector imports only this module: the identifier type (``Idnps``, ``InvalidIdnps``) is
re-exported here. Development sandboxes are not part of it: they are registered under their own
entry-point group (``connectors/sandbox_entry.py``).
"""

from __future__ import annotations

import abc
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Protocol, TypeVar, cast

from aiohttp import web
from pydantic import BaseModel, Field, TypeAdapter

# The identifier type is part of the contract: a connector imports it from here.
from connectors import names
from connectors.idnps import Idnps as Idnps
from connectors.idnps import InvalidIdnps as InvalidIdnps

Formatting = Literal["plain", "markdown"]
MessageKind = Literal["text", "notice", "emote"]
FILE_MSGTYPES = ("m.image", "m.file", "m.audio", "m.video")
MAX_REQUEST_BYTES = 1024 * 1024
"""A connector's web routes accept bodies up to this size unless it says otherwise."""
PROBE_IDNPS = Idnps("899999999909")
"""A valid IDNPS given to no one: what the default ``Connector.probe`` looks up."""


# --- Capabilities ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileLimit:
    """What a vendor accepts for one kind of file: a size and MIME types (``image/*`` allowed)."""

    max_size: int
    mime_types: frozenset[str] = frozenset({"*/*"})

    def allows(self, mime_type: str) -> bool:
        major = mime_type.split("/", 1)[0]
        return bool({"*/*", f"{major}/*", mime_type} & self.mime_types)


@dataclass(frozen=True)
class Capabilities:
    """What a vendor can show. The bridge degrades everything else, and tells the sender."""

    formatting: Formatting = "plain"
    max_text_length: int | None = None
    """In characters. Longer text is split into several messages or refused (``long_text``)."""
    long_text: Literal["split", "refuse"] = "split"
    message_kinds: frozenset[MessageKind] = frozenset({"text"})
    """Kinds shown as such; the others arrive as text (an emote as ``* Name text``)."""
    files: Mapping[str, FileLimit] = field(default_factory=dict)
    """By Matrix msgtype (``m.image``, ``m.file``, ``m.audio``, ``m.video``): what it accepts."""
    locations: bool = False
    mentions: bool = False
    max_mentions: int | None = None
    """Most people one message may mention (None: no limit); the others stay plain names."""
    replies: bool = False
    # The operation flags below are derived from the classes a connector implements
    # (``EditHandling`` ...), never set by hand: see ``derive_capabilities``.
    edits: bool = False
    deletions: bool = False
    reactions: bool = False
    read_receipts: bool = False
    typing: bool = False
    delivery_status: bool = False
    """The vendor shows its users whether their message reached everyone (report_delivery)."""
    add_participants: bool = False
    """People can be added to an open conversation (``ParticipantAdding``)."""
    remove_participants: bool = False
    """The vendor's own users can be removed by someone else (``MemberRemoval``)."""
    titles: bool = False
    """A conversation can be renamed (``TitleHandling``)."""
    topics: bool = False
    """A conversation has a topic (description) that can be changed (``TopicHandling``)."""
    history: bool = False
    """Earlier messages of a conversation can be read (``HistorySource``): backfill."""
    system_messages: bool = False
    """The vendor shows the bridge's own notes in a conversation as system messages
    (``SystemMessages``); without it they come as a message from an "EIMIS" sender."""
    user_listing: bool = False
    """The vendor lists all its users page by page (``UserListing``): the bridge publishes them
    in the homeserver's user directory, so a Matrix user finds them by name."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["message_kinds"] = sorted(self.message_kinds)
        data["files"] = {
            msgtype: {"max_size": limit.max_size, "mime_types": sorted(limit.mime_types)}
            for msgtype, limit in self.files.items()
        }
        return data


# --- People ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteUser:
    """A professional as a vendor describes them."""

    idnps: Idnps
    given_name: str
    family_name: str
    profession: str

    @property
    def display_name(self) -> str:
        """``"<Given> <FAMILY> - <Profession>"`` (``connectors.names``: French usage)."""
        return names.display_name(self.given_name, self.family_name, self.profession)


@dataclass(frozen=True)
class UserPage:
    """One page of a vendor's user list (``UserListing.list_users``)."""

    users: tuple[RemoteUser, ...]
    next_cursor: str | None
    """None: this page is the last one (the listing is complete)."""


@dataclass(frozen=True)
class Participant:
    """Someone outside the vendor that a vendor user wants in a conversation.

    Exactly one of ``idnps`` (a professional reachable through any connector) or ``mxid`` (a Matrix
    user) is set.
    """

    idnps: Idnps | None = None
    mxid: str | None = None

    def __post_init__(self) -> None:
        if (self.idnps is None) == (self.mxid is None):
            raise ValueError("a Participant is an IDNPS or a Matrix user id, exactly one of them")


@dataclass(frozen=True)
class Mention:
    """A person mentioned in a message: written ``@<display_name>`` in the text."""

    display_name: str
    idnps: Idnps | None = None
    mxid: str | None = None


@dataclass(frozen=True)
class Sender:
    """Who wrote what the bridge delivers: another vendor's professional or a Matrix user."""

    mxid: str
    display_name: str
    idnps: Idnps | None = None

    @property
    def ref(self) -> str:
        """How vendors name people from outside: the IDNPS when known, else the Matrix id."""
        return self.idnps or self.mxid


# --- Content --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    latitude: float
    longitude: float
    description: str | None = None


@dataclass(frozen=True)
class RemoteAttachment:
    """A file attached to a vendor message. ``source`` is the connector's own handle for it
    (a download URL, an inline payload ...), passed back to ``open_attachment``."""

    name: str
    mime_type: str
    size: int | None
    source: str


# --- Events a connector emits (vendor -> bridge) -------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Event:
    """Base of every vendor event.

    ``event_id`` is unique per connector and stable across redeliveries of the same vendor event:
    the bridge stores each (connector, event_id) once, so a vendor that delivers twice is harmless.
    """

    event_id: str
    conversation_id: str
    timestamp: datetime


@dataclass(frozen=True, kw_only=True)
class ConversationCreated(_Event):
    """A vendor user opened a conversation that includes people outside the vendor.

    ``members`` are the vendor's own users in it (creator included); ``participants`` are the
    people outside the vendor, by IDNPS or Matrix user id.
    """

    creator: Idnps
    members: tuple[Idnps, ...]
    participants: tuple[Participant, ...]
    title: str | None = None
    topic: str | None = None
    """The conversation's topic (description), where the vendor has one."""
    kind: Literal["conversation.created"] = "conversation.created"


@dataclass(frozen=True, kw_only=True)
class MessageReceived(_Event):
    """A vendor user wrote a message (text, a file, a location) in a bridged conversation."""

    message_id: str
    sender: Idnps
    text: str
    message_kind: MessageKind = "text"
    reply_to: str | None = None
    """The vendor message id this one answers."""
    mentions: tuple[Mention, ...] = ()
    attachment: RemoteAttachment | None = None
    location: Location | None = None
    kind: Literal["message"] = "message"


@dataclass(frozen=True, kw_only=True)
class MessageEdited(_Event):
    message_id: str
    sender: Idnps
    text: str
    mentions: tuple[Mention, ...] = ()
    kind: Literal["message.edited"] = "message.edited"


@dataclass(frozen=True, kw_only=True)
class MessageDeleted(_Event):
    message_id: str
    sender: Idnps
    kind: Literal["message.deleted"] = "message.deleted"


@dataclass(frozen=True, kw_only=True)
class ReactionAdded(_Event):
    reaction_id: str
    message_id: str
    sender: Idnps
    key: str
    """The emoji (or short text) the user reacted with."""
    kind: Literal["reaction.added"] = "reaction.added"


@dataclass(frozen=True, kw_only=True)
class ReactionRemoved(_Event):
    reaction_id: str
    message_id: str
    sender: Idnps
    kind: Literal["reaction.removed"] = "reaction.removed"


@dataclass(frozen=True, kw_only=True)
class ReadUpTo(_Event):
    """A vendor user has read the conversation up to this message (inclusive)."""

    sender: Idnps
    message_id: str
    kind: Literal["read"] = "read"


@dataclass(frozen=True, kw_only=True)
class TypingChanged(_Event):
    sender: Idnps
    typing: bool
    kind: Literal["typing"] = "typing"


@dataclass(frozen=True, kw_only=True)
class ParticipantsAdded(_Event):
    """A vendor user (``sender``) added people to a bridged conversation.

    ``members``: the vendor's own users added; ``participants``: people outside the vendor, by
    IDNPS or Matrix user id. At least one of them is non-empty.
    """

    sender: Idnps
    members: tuple[Idnps, ...] = ()
    participants: tuple[Participant, ...] = ()
    kind: Literal["participants.added"] = "participants.added"


@dataclass(frozen=True, kw_only=True)
class ParticipantsRemoved(_Event):
    """A vendor user (``sender``) removed people from a bridged conversation (same fields as
    ``ParticipantsAdded``)."""

    sender: Idnps
    members: tuple[Idnps, ...] = ()
    participants: tuple[Participant, ...] = ()
    kind: Literal["participants.removed"] = "participants.removed"


@dataclass(frozen=True, kw_only=True)
class MemberLeft(_Event):
    """A vendor user (``sender``) left a bridged conversation."""

    sender: Idnps
    kind: Literal["member.left"] = "member.left"


@dataclass(frozen=True, kw_only=True)
class ConversationRenamed(_Event):
    """A vendor user renamed a bridged conversation (``title`` None: the title was cleared)."""

    sender: Idnps
    title: str | None
    kind: Literal["conversation.renamed"] = "conversation.renamed"


@dataclass(frozen=True, kw_only=True)
class TopicChanged(_Event):
    """A vendor user changed a bridged conversation's topic (description)."""

    sender: Idnps
    topic: str | None
    kind: Literal["conversation.topic"] = "conversation.topic"


RemoteEvent = (
    ConversationCreated
    | MessageReceived
    | MessageEdited
    | MessageDeleted
    | ReactionAdded
    | ReactionRemoved
    | ReadUpTo
    | TypingChanged
    | ParticipantsAdded
    | ParticipantsRemoved
    | MemberLeft
    | ConversationRenamed
    | TopicChanged
)
REMOTE_EVENT_TYPES = (
    ConversationCreated,
    MessageReceived,
    MessageEdited,
    MessageDeleted,
    ReactionAdded,
    ReactionRemoved,
    ReadUpTo,
    TypingChanged,
    ParticipantsAdded,
    ParticipantsRemoved,
    MemberLeft,
    ConversationRenamed,
    TopicChanged,
)
_EVENTS: TypeAdapter[Any] = TypeAdapter(Annotated[RemoteEvent, Field(discriminator="kind")])


def event_to_json(event: RemoteEvent) -> dict[str, Any]:
    return dict(_EVENTS.dump_python(event, mode="json"))


def event_from_json(data: dict[str, Any]) -> RemoteEvent:
    event: RemoteEvent = _EVENTS.validate_python(data)
    return event


# --- Operations the bridge asks of a connector (bridge -> vendor) -------------------------------


@dataclass(frozen=True)
class NewConversation:
    """A conversation the bridge asks a vendor to open for its users in a portal.

    ``request_id`` is stable for this portal and connector: the vendor must treat a repeat as the
    same request (idempotency), so a retry never opens two conversations.
    """

    request_id: str
    title: str | None
    members: tuple[Idnps, ...]
    external: tuple[Sender, ...]


@dataclass(frozen=True)
class ParticipantChange:
    """People joining or leaving an open vendor conversation.

    ``members``: the vendor's own users; ``external``: people outside it (as in
    ``NewConversation``). ``by``: who made the change (None: the people themselves, leaving).
    ``request_id`` is stable for this change: a repeat is the same change.
    """

    request_id: str
    members: tuple[Idnps, ...] = ()
    external: tuple[Sender, ...] = ()
    by: Sender | None = None
    reason: str | None = None
    """The reason given with a removal, if any (for the people removed)."""


AttachmentOpener = Callable[[], AbstractAsyncContextManager[AsyncIterator[bytes]]]


@dataclass(frozen=True)
class OutboundAttachment:
    """A file to deliver. ``open()`` streams it in chunks (it is never whole in memory); each
    call starts again from the beginning, so a retried delivery can re-read it."""

    name: str
    mime_type: str
    size: int
    open: AttachmentOpener = field(compare=False)


@dataclass(frozen=True)
class OutboundMessage:
    """A message the bridge delivers into a vendor conversation.

    ``request_id`` is stable for this message and connector (derived from the Matrix event id):
    the vendor must show a repeat only once. ``text`` is already in the connector's formatting,
    cut to its maximum length.
    """

    request_id: str
    sender: Sender
    text: str
    timestamp: datetime
    html: str | None = None
    """The sanitised HTML the text came from, for connectors that can use it."""
    message_kind: MessageKind = "text"
    reply_to: str | None = None
    """The vendor message id this one answers (only when the connector declares replies)."""
    mentions: tuple[Mention, ...] = ()
    attachment: OutboundAttachment | None = None
    location: Location | None = None


@dataclass(frozen=True)
class DeliveryReport:
    """What happened to a vendor user's message on the other side of the bridge."""

    status: Literal["delivered", "degraded", "failed"]
    detail: str
    """A sentence for the sender: what was changed or why it could not be delivered."""


# --- What the bridge gives a connector ---------------------------------------------------------


class EventSink(Protocol):
    async def __call__(self, event: RemoteEvent) -> None: ...


class BatchSink(Protocol):
    async def __call__(self, events: Sequence[RemoteEvent]) -> None: ...


class KeyValueStore(Protocol):
    """Small persistent per-connector state (a poll cursor, a registered webhook id ...)."""

    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str) -> None: ...


class SharedSecrets(Protocol):
    """The secret a connector shares with its vendor to sign requests both ways (HMAC-SHA256).

    Operators rotate it (``connector rotate-secret``) with a grace period: until it ends, the
    previous secret is still accepted on incoming requests, while outgoing ones are signed with
    the new one. The bridge keeps them sealed at rest (``bridge/secrets.py``)."""

    def current(self) -> str | None:
        """The secret to sign with (None: this connector has none stored by the bridge)."""
        ...

    def accepted(self) -> Sequence[str]:
        """Secrets an incoming signature may use: the current one first, then those still in
        their grace period."""
        ...


class NoSharedSecrets:
    """For connectors whose credentials live in their settings only."""

    def current(self) -> str | None:
        return None

    def accepted(self) -> Sequence[str]:
        return ()


class DirectoryLookup(Protocol):
    """What the bridge's directory of professionals (the national sources it imported) tells a
    connector about secure mailboxes: a mail connector resolves a sender's address to the
    professional it belongs to, and finds where to write to one."""

    async def idnps_for_mailbox(self, address: str) -> Idnps | None:
        """The professional whose personal mailbox this address is (exact address, any case);
        None when the directory does not know it or gives it to several people."""
        ...

    async def mailboxes_of(self, idnps: Idnps) -> Sequence[str]:
        """A professional's personal mailbox addresses (none: the directory lists none)."""
        ...

    async def describe(self, idnps: Idnps) -> RemoteUser | None:
        """The professional's names and profession as the directory has them (None: unknown),
        for a connector whose vendor has no user profiles of its own (mail)."""
        ...


class NoDirectory:
    """A directory that knows no one (connectors built outside a bridge, tests)."""

    async def idnps_for_mailbox(self, address: str) -> Idnps | None:
        return None

    async def mailboxes_of(self, idnps: Idnps) -> Sequence[str]:
        return ()

    async def describe(self, idnps: Idnps) -> RemoteUser | None:
        return None


@dataclass
class ConnectorContext:
    """Everything a connector instance receives from the bridge."""

    connector_id: str
    settings: BaseModel
    emit: EventSink
    store: KeyValueStore
    public_base_url: str
    """The bridge's public URL for this connector's web routes (``.../connectors/<id>``)."""
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("eimis.connector"))
    emit_all: BatchSink | None = None
    """Stores several events in one go, in their order (the bridge gives one; tests may not)."""
    secrets: SharedSecrets = field(default_factory=NoSharedSecrets)
    """The secret shared with the vendor, when the bridge holds it (connectors added at run
    time, webhook connectors); read it at each use: a rotation changes it under a running
    connector."""
    directory: DirectoryLookup = field(default_factory=NoDirectory)
    """The bridge's directory of professionals (secure mailboxes); read at each use."""

    async def emit_many(self, events: Sequence[RemoteEvent]) -> None:
        """``emit`` for a page of events at once: returns once all are durably stored, in
        order. A polling connector emits a page with it before it moves its cursor."""
        if self.emit_all is not None:
            await self.emit_all(events)
            return
        for event in events:
            await self.emit(event)


class ConnectorError(Exception):
    """A vendor call failed. ``retriable`` says whether trying again later may succeed.

    ``unreachable``: the vendor did not answer at all (connection refused, timeout): the bridge
    marks the connector down and waits for it instead of spending the delivery's retry budget.
    ``retry_after``: seconds the vendor asked to wait (HTTP 429 ``Retry-After``).
    ``credentials_rejected``: the vendor refused the bridge's credentials (HTTP 401 after a
    token refresh): nothing will pass until an operator fixes them, so the bridge marks the
    connector so, alerts the operators, and waits without spending retry budgets.
    """

    def __init__(
        self,
        message: str,
        *,
        retriable: bool,
        unreachable: bool = False,
        retry_after: float | None = None,
        credentials_rejected: bool = False,
    ) -> None:
        super().__init__(message)
        self.retriable = retriable or credentials_rejected
        self.unreachable = unreachable
        self.retry_after = retry_after
        self.credentials_rejected = credentials_rejected


class Connector(abc.ABC):
    """One vendor. Subclasses set ``type_name``, ``Settings`` and ``capabilities``.

    The methods below are what every connector does. Each optional operation is its own small
    abstract class a connector also inherits (``EditHandling``, ``ReactionHandling`` ... further
    down): a connector can edit exactly when it is an ``EditHandling``, and the operation flags of
    ``capabilities`` (``edits``, ``deletions`` ...) are derived from the classes it inherits when
    the class is defined, so they cannot disagree. ``capabilities`` declares the rest (formatting,
    limits, files, replies ...); declaring an operation flag without its class is refused with a
    ``CapabilityMismatch``. The bridge never calls an operation a connector does not implement.
    """

    type_name: ClassVar[str]
    """The connector type, as written in the config (``type: ...``)."""

    Settings: ClassVar[type[BaseModel]]
    """Pydantic model of this connector's ``settings`` block in the config."""

    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.capabilities = derive_capabilities(cls, cls.capabilities)

    def __init__(self, ctx: ConnectorContext) -> None:
        self.ctx = ctx
        self.log = ctx.log

    # Required ---------------------------------------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect to the vendor and start receiving its events (webhook registration, polling)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop receiving and release resources. Events already emitted are safe."""

    @abc.abstractmethod
    async def create_conversation(self, conversation: NewConversation) -> str:
        """Open a conversation on the vendor side; return the vendor's conversation id."""

    @abc.abstractmethod
    async def send_message(self, conversation_id: str, message: OutboundMessage) -> str:
        """Deliver a message into a vendor conversation; return the vendor's message id."""

    @abc.abstractmethod
    async def get_user(self, idnps: Idnps) -> RemoteUser | None:
        """Describe one of this vendor's users, or None when the vendor does not know them."""

    def web_routes(self) -> list[web.RouteDef]:
        """Routes the bridge mounts under ``/connectors/<connector id>`` (webhooks)."""
        return []

    @property
    def max_request_bytes(self) -> int:
        """The largest request body these routes accept. The bridge answers 413 to a larger
        declared ``Content-Length`` before a route runs, and ``request.read()`` stops at it;
        a route that reads ``request.content`` itself caps it (``connectors.http``)."""
        return MAX_REQUEST_BYTES

    def refuse_unread(self, request: web.BaseRequest) -> web.StreamResponse | None:
        """The answer to a request that its headers alone show cannot be accepted (a missing,
        malformed or stale signature: 401), or None. The bridge asks before anything else,
        body size included, so such a request is refused before a byte of its body is read;
        the routes still check everything themselves."""
        del request
        return None

    async def probe(self) -> str:
        """A cheap call proving the vendor answers and accepts the credentials (``connector
        test``); returns a sentence saying what was checked, raises ``ConnectorError``. It may
        run on an instance that was never started.

        By default, asks about a professional nobody is: any answer, "unknown" included,
        proves both. Override it when the vendor has a better check (a status endpoint)."""
        await self.get_user(PROBE_IDNPS)
        return "the vendor answers and accepts the credentials (a user look-up)"


# --- Optional operations: one abstract class each ----------------------------------------------


class EditHandling(abc.ABC):
    """``edits``: the vendor replaces a delivered message's text."""

    @abc.abstractmethod
    async def edit_message(
        self, conversation_id: str, message_id: str, message: OutboundMessage
    ) -> None:
        """Replace a delivered message's text."""


class DeletionHandling(abc.ABC):
    """``deletions``: the vendor deletes a delivered message."""

    @abc.abstractmethod
    async def delete_message(self, conversation_id: str, message_id: str, sender: Sender) -> bool:
        """Delete a delivered message. False when the vendor does not have it (it answered
        404): nothing was deleted, and the bridge records it so."""


class ReactionHandling(abc.ABC):
    """``reactions``: the vendor shows reactions to a message, added and removed."""

    @abc.abstractmethod
    async def add_reaction(
        self, conversation_id: str, message_id: str, sender: Sender, key: str, request_id: str
    ) -> str:
        """React to a message; return the vendor's reaction id."""

    @abc.abstractmethod
    async def remove_reaction(
        self, conversation_id: str, message_id: str, reaction_id: str, sender: Sender
    ) -> bool:
        """Remove a reaction; False when the vendor does not have it (404)."""


class ReadReceiptHandling(abc.ABC):
    """``read_receipts``: the vendor shows how far people outside it have read."""

    @abc.abstractmethod
    async def mark_read(self, conversation_id: str, reader: Sender, message_id: str) -> None:
        """``reader`` has read up to this message."""


class TypingHandling(abc.ABC):
    """``typing``: the vendor shows who is typing."""

    @abc.abstractmethod
    async def set_typing(self, conversation_id: str, who: Sender, typing: bool) -> None:
        """Best effort, never retried."""


class DeliveryStatusHandling(abc.ABC):
    """``delivery_status``: the vendor shows its users whether their message reached everyone."""

    @abc.abstractmethod
    async def report_delivery(
        self, conversation_id: str, message_id: str, report: DeliveryReport
    ) -> None:
        """Tell a vendor user what became of their message."""


class ParticipantAdding(abc.ABC):
    """``add_participants``: people join an open conversation, and people outside the vendor
    leave it (a guest leaving is part of adding: vendors that take guests in let them go)."""

    @abc.abstractmethod
    async def add_participants(self, conversation_id: str, change: ParticipantChange) -> None:
        """Add the vendor's users (``change.members``) and people outside it
        (``change.external``). Adding someone already in changes nothing (idempotent)."""

    @abc.abstractmethod
    async def remove_external(self, conversation_id: str, change: ParticipantChange) -> None:
        """People outside the vendor (``change.external``; ``members`` is empty) left or were
        removed: the vendor's users stop seeing them as participants. Idempotent."""


class MemberRemoval(abc.ABC):
    """``remove_participants``: the vendor's own users can be removed by someone else."""

    @abc.abstractmethod
    async def remove_members(self, conversation_id: str, change: ParticipantChange) -> None:
        """Remove the vendor's users ``change.members`` (``change.by`` removes them; None: they
        left themselves). They stop receiving the conversation. Idempotent."""


class TitleHandling(abc.ABC):
    """``titles``: a conversation can be renamed."""

    @abc.abstractmethod
    async def set_title(self, conversation_id: str, title: str | None, by: Sender) -> None:
        """Rename the conversation (None: no title). Not announced back (no echo)."""


class TopicHandling(abc.ABC):
    """``topics``: a conversation has a topic (description) that can be changed."""

    @abc.abstractmethod
    async def set_topic(self, conversation_id: str, topic: str | None, by: Sender) -> None:
        """Change the conversation's topic (None: none). Not announced back (no echo)."""


class HistorySource(abc.ABC):
    """``history``: earlier messages of a conversation can be read (backfill)."""

    @abc.abstractmethod
    async def history(
        self, conversation_id: str, *, limit: int, since: datetime
    ) -> Sequence[MessageReceived]:
        """The conversation's last ``limit`` messages written at ``since`` or later, oldest
        first, as the events the connector emits for new ones (same ids: a message the bridge
        already has is recognised). Only messages written by the vendor's users."""


class SystemMessages(abc.ABC):
    """``system_messages``: the vendor shows its users a system message in a conversation
    (someone could not be added, a message could not reach someone ...), from no participant."""

    @abc.abstractmethod
    async def send_system_message(self, conversation_id: str, text: str, request_id: str) -> None:
        """Show ``text`` (plain French text) in the conversation as a system message.
        Idempotent by ``request_id``; never announced back (no echo)."""


class UserListing(abc.ABC):
    """``user_listing``: the connector lists every user of the vendor, page by page (the bridge
    publishes them in the homeserver's user directory, README "Found from Matrix")."""

    @abc.abstractmethod
    async def list_users(self, cursor: str | None, limit: int) -> UserPage:
        """Users in a stable order, at most ``limit``, after ``cursor`` (None: from the start).
        A malformed entry is left out (logged without content), never fails the page."""


class AttachmentSource(abc.ABC):
    """A connector that emits files (``MessageReceived.attachment``) hands over their bytes."""

    @abc.abstractmethod
    async def open_attachment(
        self, attachment: RemoteAttachment
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream the bytes of a file a vendor user sent."""


OPERATION_PROTOCOLS: Mapping[str, type[abc.ABC]] = {
    "edits": EditHandling,
    "deletions": DeletionHandling,
    "reactions": ReactionHandling,
    "read_receipts": ReadReceiptHandling,
    "typing": TypingHandling,
    "delivery_status": DeliveryStatusHandling,
    "add_participants": ParticipantAdding,
    "remove_participants": MemberRemoval,
    "titles": TitleHandling,
    "topics": TopicHandling,
    "history": HistorySource,
    "system_messages": SystemMessages,
    "user_listing": UserListing,
}
"""Each operation flag of ``Capabilities`` and the class that implements it."""

OPTIONAL_PROTOCOLS: tuple[type[abc.ABC], ...] = (*OPERATION_PROTOCOLS.values(), AttachmentSource)
"""Every optional part of the contract, in the order composed classes list them."""


class CapabilityMismatch(TypeError):
    """A connector declares an operation flag whose class it does not implement."""


def _methods(protocol: type) -> str:
    return ", ".join(sorted(getattr(protocol, "__abstractmethods__", ())))


def derive_capabilities(cls: type, declared: Capabilities) -> Capabilities:
    """``declared`` with its operation flags set from the classes ``cls`` implements.

    A flag declared on without its class is refused: the bridge would ask for an operation the
    connector cannot do. A class implemented without its flag turns the flag on."""
    for flag, protocol in OPERATION_PROTOCOLS.items():
        if getattr(declared, flag) and not issubclass(cls, protocol):
            raise CapabilityMismatch(
                f"connector {cls.__qualname__} declares {flag}=True but does not implement "
                f"{protocol.__name__} ({_methods(protocol)}): inherit it and implement its "
                f"methods, or drop the flag"
            )
    return replace(
        declared,
        **{flag: issubclass(cls, protocol) for flag, protocol in OPERATION_PROTOCOLS.items()},
    )


def capability_mismatch(connector: Connector | type[Connector]) -> str | None:
    """Why a connector's advertised operation flags disagree with the classes it implements
    (a flag without its class, or a class without its flag), or None when they agree. The
    registry checks each type and instance with it before using them."""
    cls = connector if isinstance(connector, type) else type(connector)
    caps = connector.capabilities
    for flag, protocol in OPERATION_PROTOCOLS.items():
        advertised, implemented = getattr(caps, flag), issubclass(cls, protocol)
        if advertised and not implemented:
            return (
                f"connector {cls.__qualname__} advertises {flag} but does not implement "
                f"{protocol.__name__} ({_methods(protocol)})"
            )
        if implemented and not advertised:
            return (
                f"connector {cls.__qualname__} implements {protocol.__name__} but does not "
                f"advertise {flag}"
            )
    return None


_C = TypeVar("_C", bound=Connector)


@functools.cache
def _composed(cls: type[Connector], protocols: frozenset[type[abc.ABC]]) -> type[Connector]:
    bases = tuple(p for p in OPTIONAL_PROTOCOLS if p in protocols and not issubclass(cls, p))
    if not bases:
        return cls
    return type(cls.__name__, (cls, *bases), {"__module__": cls.__module__})


def with_protocols(cls: type[_C], protocols: Iterable[type[abc.ABC]]) -> type[_C]:
    """``cls`` extended with these optional classes (one class per combination, cached).

    For a connector whose operations depend on its settings (a webhook vendor declares its
    own): it defines every method without inheriting their classes, and its ``__new__`` builds
    the instance from ``with_protocols(cls, ...)``, so each instance implements exactly what
    its vendor declared. The composed class keeps ``cls``'s name."""
    return cast(type[_C], _composed(cls, frozenset(protocols)))


def protocols_of(cls: type) -> frozenset[type[abc.ABC]]:
    """The optional classes ``cls`` implements."""
    return frozenset(p for p in OPTIONAL_PROTOCOLS if issubclass(cls, p))


def operation_protocols(capabilities: Capabilities) -> frozenset[type[abc.ABC]]:
    """The classes matching the operation flags that are on in ``capabilities``."""
    return frozenset(p for flag, p in OPERATION_PROTOCOLS.items() if getattr(capabilities, flag))
