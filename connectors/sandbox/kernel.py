"""The vendor-neutral emulator core: users, conversations, messages, inboxes and idempotency keys.

A sandbox is this kernel plus a vendor layer that serves the vendor-style API and publishes the
kernel's events in the vendor's own format. Everything here is synchronous and in memory: aiohttp
handlers run on one event loop, so each kernel call is atomic (no await between an idempotency
check and the creation it guards).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from bridge.directory.idnps import Idnps, InvalidIdnps

MAX_TEXT_BYTES = 64 * 1024
"""Largest message text, in UTF-8 bytes; more is refused with 413."""

MAX_MXID_LENGTH = 255
_MXID = re.compile(r"@[^:\s]+:\S+")

IdKind = Literal["conversation", "message"]


class SandboxError(Exception):
    """A request the sandbox refuses: an HTTP status, a machine code and a sentence for humans.

    ``code`` is vendor-neutral (``invalid_request``, ``user_not_found`` ...); each vendor layer
    maps it to its own error format.
    """

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


def bad_request(message: str) -> SandboxError:
    return SandboxError(400, "invalid_request", message)


@dataclass(frozen=True)
class SandboxUser:
    """A professional registered with the emulated vendor."""

    idnps: Idnps
    given_name: str
    family_name: str
    profession: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "idnps", Idnps(self.idnps))

    @property
    def display_name(self) -> str:
        return f"{self.given_name} {self.family_name}"


@dataclass(frozen=True)
class External:
    """Someone outside the vendor in a conversation: an IDNPS or a Matrix user id, and a name."""

    ref: str
    display_name: str


@dataclass(frozen=True)
class Message:
    """One message; ``author`` is set when a user of this vendor wrote it, None for the API."""

    id: str
    conversation_id: str
    sender_ref: str
    sender_name: str
    text: str
    created_at: datetime
    author: Idnps | None


@dataclass
class Conversation:
    """A conversation: vendor users (``members``) and people outside the vendor (``external``)."""

    id: str
    title: str | None
    created_by: Idnps | None
    members: tuple[Idnps, ...]
    external: tuple[External, ...]
    created_at: datetime
    messages: list[Message] = field(default_factory=list)


class EventPublisher(Protocol):
    """What a vendor layer does with the kernel's events (push them, or keep them for polling).

    The kernel calls it only for what the bridge must learn: conversations with external
    participants created by a vendor user, and messages vendor users write in such conversations.
    Calls are synchronous: a publisher queues, it does not wait for delivery.
    """

    def conversation_created(self, conversation: Conversation) -> None: ...

    def message_created(self, conversation: Conversation, message: Message) -> None: ...


def parse_idnps(value: str) -> Idnps:
    """The IDNPS in ``value``, or a 400 whose sentence names the rule that failed."""
    try:
        return Idnps(value)
    except InvalidIdnps as exc:
        raise bad_request(f"{value[:40]!r} is not a valid IDNPS: {exc}.") from None


def parse_ref(value: str) -> str:
    """A participant reference: a Matrix user id (``@local:server``) or a valid IDNPS."""
    if value.startswith("@"):
        if len(value) > MAX_MXID_LENGTH or not _MXID.fullmatch(value):
            raise bad_request(
                f"{value[:40]!r} is not a valid Matrix user id: expected '@localpart:server', "
                f"at most {MAX_MXID_LENGTH} characters."
            )
        return value
    return str(parse_idnps(value))


def check_text(text: str) -> str:
    """Refuse an empty text (400) or one longer than ``MAX_TEXT_BYTES`` (413)."""
    if not text.strip():
        raise bad_request("The message text cannot be empty.")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise SandboxError(
            413,
            "text_too_large",
            f"The message text is {size} bytes; the limit is {MAX_TEXT_BYTES} bytes (64 KiB).",
        )
    return text


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Kernel:
    """The in-memory state of one emulated vendor."""

    def __init__(
        self,
        users: Iterable[SandboxUser],
        *,
        vendor_name: str,
        new_id: Callable[[IdKind], str],
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.vendor_name = vendor_name
        self.users: dict[Idnps, SandboxUser] = {}
        for user in users:
            if user.idnps in self.users:
                raise ValueError(f"duplicate sandbox user {user.idnps}")
            self.users[user.idnps] = user
        self.publisher: EventPublisher | None = None
        self._new_id = new_id
        self._clock = clock
        self._conversations: dict[str, Conversation] = {}
        self._messages: dict[str, Message] = {}
        self._inboxes: dict[Idnps, list[Message]] = {idnps: [] for idnps in self.users}
        self._idempotency: dict[tuple[str, ...], str] = {}

    # Lookups ------------------------------------------------------------------------------------

    def user(self, idnps_text: str) -> SandboxUser:
        """The user with this IDNPS: 400 naming the rule when it is invalid, 404 when unknown."""
        idnps = parse_idnps(idnps_text)
        user = self.users.get(idnps)
        if user is None:
            raise SandboxError(
                404, "user_not_found", f"No {self.vendor_name} user has the IDNPS {idnps}."
            )
        return user

    def conversation(self, conversation_id: str) -> Conversation:
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            raise SandboxError(
                404,
                "conversation_not_found",
                f"No {self.vendor_name} conversation has the id {conversation_id[:64]!r}.",
            )
        return conversation

    def conversations_of(self, idnps: Idnps) -> list[Conversation]:
        return [c for c in self._conversations.values() if idnps in c.members]

    def inbox(self, idnps: Idnps) -> list[Message]:
        """Messages the user received, in the order received (never the user's own)."""
        return list(self._inboxes[idnps])

    # User side (the vendor's app) ---------------------------------------------------------------

    def user_creates_conversation(
        self, creator: SandboxUser, with_refs: Sequence[str], title: str | None
    ) -> Conversation:
        """A vendor user opens a conversation; announced when it has external participants."""
        members: list[Idnps] = [creator.idnps]
        external: list[External] = []
        for raw in with_refs:
            ref = parse_ref(raw)
            if ref in self.users:
                if ref not in members:
                    members.append(Idnps(ref))
            elif all(e.ref != ref for e in external):
                external.append(External(ref=ref, display_name=ref))
        if len(members) + len(external) < 2:
            raise bad_request("A conversation needs at least one person besides its creator.")
        conversation = self._new_conversation(title, creator.idnps, members, external)
        if conversation.external and self.publisher is not None:
            self.publisher.conversation_created(conversation)
        return conversation

    def user_writes(self, author: SandboxUser, conversation_id: str, text: str) -> Message:
        """A vendor user writes; announced when the conversation has external participants."""
        conversation = self.conversation(conversation_id)
        if author.idnps not in conversation.members:
            raise SandboxError(
                403,
                "not_a_member",
                f"User {author.idnps} is not a member of conversation {conversation.id}.",
            )
        message = self._new_message(
            conversation, author.idnps, author.display_name, check_text(text), author.idnps
        )
        if conversation.external and self.publisher is not None:
            self.publisher.message_created(conversation, message)
        return message

    # Vendor API side (the bridge) ---------------------------------------------------------------

    def api_creates_conversation(
        self,
        key: str,
        title: str | None,
        member_refs: Sequence[str],
        external: Sequence[External],
    ) -> tuple[Conversation, bool]:
        """The bridge opens a conversation; returns it and whether it is new (False on a repeat).

        Never announced: the bridge already knows about it.
        """
        members: list[Idnps] = []
        for raw in member_refs:
            idnps = self.user(raw).idnps
            if idnps not in members:
                members.append(idnps)
        if not members:
            raise bad_request(f"A conversation needs at least one {self.vendor_name} user.")
        externals: list[External] = []
        for person in external:
            ref = self._external_ref(person.ref)
            if all(e.ref != ref for e in externals):
                externals.append(External(ref=ref, display_name=person.display_name))
        existing = self._idempotency.get(("conversation", key))
        if existing is not None:
            return self._conversations[existing], False
        conversation = self._new_conversation(title, None, members, externals)
        self._idempotency[("conversation", key)] = conversation.id
        return conversation, True

    def api_writes(
        self, key: str, conversation_id: str, sender: External, text: str
    ) -> tuple[Message, bool]:
        """The bridge delivers a message from someone outside the vendor; returns it and whether
        it is new. Shown in the members' inboxes, never announced back (no echo)."""
        conversation = self.conversation(conversation_id)
        ref = self._external_ref(sender.ref)
        check_text(text)
        existing = self._idempotency.get(("message", conversation.id, key))
        if existing is not None:
            return self._messages[existing], False
        message = self._new_message(conversation, ref, sender.display_name, text, None)
        self._idempotency[("message", conversation.id, key)] = message.id
        return message, True

    # Internals ----------------------------------------------------------------------------------

    def _external_ref(self, raw: str) -> str:
        ref = parse_ref(raw)
        if ref in self.users:
            raise bad_request(
                f"{ref} is a {self.vendor_name} user, not someone outside {self.vendor_name}."
            )
        return ref

    def _new_conversation(
        self,
        title: str | None,
        created_by: Idnps | None,
        members: Sequence[Idnps],
        external: Sequence[External],
    ) -> Conversation:
        conversation = Conversation(
            id=self._new_id("conversation"),
            title=title,
            created_by=created_by,
            members=tuple(members),
            external=tuple(external),
            created_at=self._clock(),
        )
        self._conversations[conversation.id] = conversation
        return conversation

    def _new_message(
        self,
        conversation: Conversation,
        sender_ref: str,
        sender_name: str,
        text: str,
        author: Idnps | None,
    ) -> Message:
        message = Message(
            id=self._new_id("message"),
            conversation_id=conversation.id,
            sender_ref=sender_ref,
            sender_name=sender_name,
            text=text,
            created_at=self._clock(),
            author=author,
        )
        conversation.messages.append(message)
        self._messages[message.id] = message
        for member in conversation.members:
            if member != author:
                self._inboxes[member].append(message)
        return message
