"""The connector interface: what a vendor connector must do, may do, and the events it emits.

A connector turns one vendor's API into the bridge's vocabulary. The required part is small
(start/stop, create a remote conversation, send a message into one, describe a remote user);
everything else is an optional capability the connector declares, so the bridge knows what it can
ask for and degrades what a vendor cannot show. Vendor events enter the bridge as typed
``RemoteEvent``s through ``ConnectorContext.emit``, which returns only once the event is durably
stored: a connector acknowledges its vendor (or advances its poll cursor) after ``emit`` returns.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Literal, Protocol

from aiohttp import web
from pydantic import BaseModel

from bridge.directory.idnps import Idnps

Formatting = Literal["plain", "markdown", "html"]


@dataclass(frozen=True)
class Capabilities:
    """What a vendor can show. The bridge degrades everything else, and tells the sender."""

    formatting: Formatting = "plain"
    max_text_length: int | None = None
    message_types: frozenset[str] = frozenset({"m.text", "m.notice"})
    replies: bool = False
    edits: bool = False
    deletions: bool = False
    reactions: bool = False
    read_receipts: bool = False
    typing: bool = False
    max_file_size: int | None = None
    mime_types: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RemoteUser:
    """A professional as a vendor describes them."""

    idnps: Idnps
    given_name: str
    family_name: str
    profession: str

    @property
    def display_name(self) -> str:
        return f"{self.given_name} {self.family_name} - {self.profession}"


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


# --- Events a connector emits (vendor -> bridge) -------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RemoteEvent:
    """Base of every vendor event.

    ``event_id`` is unique per connector and stable across redeliveries of the same vendor event:
    the bridge stores each (connector, event_id) once, so a vendor that delivers twice is harmless.
    """

    event_id: str
    conversation_id: str
    timestamp: datetime

    kind: ClassVar[str] = "event"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, tuple):
                value = [_participant_json(v) if isinstance(v, Participant) else v for v in value]
            data[name] = value
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> RemoteEvent:
        kinds: dict[str, type[RemoteEvent]] = {
            cls.kind: cls for cls in (ConversationCreated, MessageReceived)
        }
        data = dict(data)
        cls = kinds[data.pop("kind")]
        data["timestamp"] = datetime.fromisoformat(data["timestamp"])
        if cls is ConversationCreated:
            data["creator"] = Idnps(data["creator"])
            data["members"] = tuple(Idnps(m) for m in data["members"])
            data["participants"] = tuple(
                Participant(idnps=Idnps(p["idnps"]) if p.get("idnps") else None, mxid=p.get("mxid"))
                for p in data["participants"]
            )
        elif cls is MessageReceived:
            data["sender"] = Idnps(data["sender"])
        return cls(**data)


def _participant_json(p: Participant) -> dict[str, str | None]:
    return {"idnps": p.idnps, "mxid": p.mxid}


@dataclass(frozen=True, kw_only=True)
class ConversationCreated(RemoteEvent):
    """A vendor user opened a conversation that includes people outside the vendor.

    ``members`` are the vendor's own users in it (creator included); ``participants`` are the
    people outside the vendor, by IDNPS or Matrix user id.
    """

    creator: Idnps
    members: tuple[Idnps, ...]
    participants: tuple[Participant, ...]
    title: str | None = None

    kind: ClassVar[str] = "conversation.created"


@dataclass(frozen=True, kw_only=True)
class MessageReceived(RemoteEvent):
    """A vendor user wrote a message in a bridged conversation."""

    message_id: str
    sender: Idnps
    text: str

    kind: ClassVar[str] = "message"


# --- Operations the bridge asks of a connector (bridge -> vendor) -------------------------------


@dataclass(frozen=True)
class Sender:
    """Who wrote a message the bridge delivers: another vendor's professional or a Matrix user."""

    mxid: str
    display_name: str
    idnps: Idnps | None = None


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
class OutboundMessage:
    """A message the bridge delivers into a vendor conversation.

    ``request_id`` is stable for this message and connector (derived from the Matrix event id):
    the vendor must show a repeat only once.
    """

    request_id: str
    sender: Sender
    text: str
    html: str | None
    timestamp: datetime


# --- What the bridge gives a connector ---------------------------------------------------------


class EventSink(Protocol):
    async def __call__(self, event: RemoteEvent) -> None: ...


class KeyValueStore(Protocol):
    """Small persistent per-connector state (a poll cursor, a registered webhook id ...)."""

    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str) -> None: ...


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


class ConnectorError(Exception):
    """A vendor call failed. ``retriable`` says whether trying again later may succeed."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class Connector(abc.ABC):
    """One vendor. Subclasses set ``type_name``, ``Settings`` and ``capabilities``."""

    type_name: ClassVar[str]
    """The connector type, as written in the config (``type: ...``)."""

    Settings: ClassVar[type[BaseModel]]
    """Pydantic model of this connector's ``settings`` block in the config."""

    capabilities: ClassVar[Capabilities] = Capabilities()

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

    # Optional ---------------------------------------------------------------------------------

    def web_routes(self) -> list[web.RouteDef]:
        """Routes the bridge mounts under ``/connectors/<connector id>`` (webhooks)."""
        return []

    @classmethod
    def sandbox_app(cls) -> web.Application | None:
        """The vendor-style emulator for this connector type, if it ships one."""
        return None

    @classmethod
    def sandbox_settings(cls, sandbox_url: str) -> dict[str, Any]:
        """The ``settings`` block that connects this connector to its sandbox at ``sandbox_url``."""
        raise NotImplementedError(f"connector type {cls.type_name!r} ships no sandbox")
