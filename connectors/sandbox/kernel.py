"""The vendor-neutral emulator core: users, conversations, messages, inboxes and idempotency keys.

A sandbox is this kernel plus a vendor layer that serves the vendor-style API and publishes the
kernel's events in the vendor's own format. Everything here is synchronous and in memory (file
bytes live in the ``FileStore``): aiohttp handlers run on one event loop, so each kernel call is
atomic (no await between an idempotency check and the creation it guards).

Two sides act on the kernel. The *user side* (``user_*`` methods) is what a professional does in
the vendor's app; in a conversation with people outside the vendor, each action is published
(webhook, feed) for the bridge. The *API side* (``api_*`` methods) is the bridge itself, through
the vendor API: its actions are shown to users and never published back (no echo).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

from connectors.idnps import Idnps, InvalidIdnps
from connectors.sandbox.errors import (
    SandboxError,
    bad_request,
    file_too_large,
    not_supported,
)
from connectors.sandbox.files import FileStore, StoredFile

MAX_TEXT_BYTES = 64 * 1024
"""Largest message text, in UTF-8 bytes; more is refused with 413."""

MAX_MXID_LENGTH = 255
MAX_MENTIONS = 50
MAX_EMOJI_LENGTH = 32
MAX_DETAIL_LENGTH = 1000
TYPING_TIMEOUT = timedelta(seconds=30)
"""Someone is shown typing until they say they stopped, write, or this long after they last
said they were typing."""

_MXID = re.compile(r"@[^:\s]+:\S+")

IdKind = Literal["conversation", "message", "reaction"]
MessageKind = Literal["text", "notice", "emote"]
DeliveryStatus = Literal["delivered", "degraded", "failed"]
Feature = Literal["edit", "react", "typing", "location", "remove", "topic"]
"""What a vendor may lack; the user side answers 501 for an action its vendor lacks (``remove``:
removing someone else from a conversation; ``topic``: a conversation description)."""

ALL_FEATURES: tuple[Feature, ...] = ("edit", "react", "typing", "location", "remove", "topic")

_FEATURE_NAMES: dict[str, str] = {
    "edit": "editing messages",
    "react": "reactions",
    "typing": "typing notifications",
    "location": "sharing a location",
    "remove": "removing someone else from a conversation",
    "topic": "conversation descriptions",
}

MAX_HISTORY = 1000
"""Most messages one history read returns."""

DEFAULT_USER_PAGE = 100
MAX_USER_PAGE = 1000
"""Most users one page of the user listing holds (``Kernel.users_after``)."""

AttachmentSource = Callable[[], StoredFile]
"""Gives the file to attach; called only once the message is certain to be created (so an
inline file is written to disk only then, and never for a repeated idempotency key)."""


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
class Location:
    lat: float
    lon: float
    label: str | None = None


@dataclass(frozen=True)
class FileRules:
    """The vendor's rules for attached files: a size limit and, when set, the MIME types."""

    max_bytes: int
    mime_types: frozenset[str] | None = None

    def check(self, size: int, mime_type: str) -> None:
        if self.mime_types is not None and mime_type not in self.mime_types:
            allowed = ", ".join(sorted(self.mime_types))
            raise SandboxError(
                415,
                "unsupported_media_type",
                f"Files of type {mime_type!r} are not accepted; allowed: {allowed}.",
            )
        if size > self.max_bytes:
            raise file_too_large(self.max_bytes)


@dataclass
class Reaction:
    id: str
    message_id: str
    conversation_id: str
    sender_ref: str
    sender_name: str
    emoji: str
    created_at: datetime
    author: Idnps | None
    removed_at: datetime | None = None


@dataclass(frozen=True)
class DeliveryReport:
    status: DeliveryStatus
    detail: str
    at: datetime


SYSTEM_SENDER = "EIMIS"
"""The sender shown on the API's system messages."""


@dataclass
class Message:
    """One message; ``author`` is set when a user of this vendor wrote it, None for the API.

    Edits and deletions change it in place, so every view shows its current state.
    """

    id: str
    conversation_id: str
    sender_ref: str
    sender_name: str
    text: str
    created_at: datetime
    author: Idnps | None
    position: int = 0
    kind: MessageKind = "text"
    reply_to: str | None = None
    mentions: tuple[External, ...] = ()
    attachment: StoredFile | None = None
    location: Location | None = None
    edited_at: datetime | None = None
    deleted_at: datetime | None = None
    reactions: list[Reaction] = field(default_factory=list)
    delivery: list[DeliveryReport] = field(default_factory=list)
    system: bool = False
    """A system message of the API (the bridge telling the members something), from nobody."""

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None


@dataclass
class Conversation:
    """A conversation: vendor users (``members``) and people outside the vendor (``external``)."""

    id: str
    title: str | None
    created_by: Idnps | None
    members: tuple[Idnps, ...]
    external: tuple[External, ...]
    created_at: datetime
    description: str | None = None
    messages: list[Message] = field(default_factory=list)
    read_up_to: dict[str, Message] = field(default_factory=dict)
    typing: dict[str, datetime] = field(default_factory=dict)


class EventPublisher(Protocol):
    """What a vendor layer does with the kernel's events (push them, or keep them for polling).

    The kernel calls it only for what the bridge must learn: actions of vendor users in
    conversations with external participants (and the creation of such conversations), in the
    order they happen. Calls are synchronous: a publisher queues, it does not wait for delivery.
    A vendor lacking a feature is never called for it.
    """

    def conversation_created(self, conversation: Conversation) -> None: ...

    def message_created(self, conversation: Conversation, message: Message) -> None: ...

    def message_edited(self, conversation: Conversation, message: Message) -> None: ...

    def message_deleted(self, conversation: Conversation, message: Message) -> None: ...

    def reaction_added(self, conversation: Conversation, reaction: Reaction) -> None: ...

    def reaction_removed(self, conversation: Conversation, reaction: Reaction) -> None: ...

    def conversation_read(
        self, conversation: Conversation, reader: Idnps, up_to: Message, at: datetime
    ) -> None: ...

    def typing_changed(
        self, conversation: Conversation, who: Idnps, typing: bool, at: datetime
    ) -> None: ...

    def participants_added(
        self,
        conversation: Conversation,
        by: Idnps,
        members: tuple[Idnps, ...],
        external: tuple[External, ...],
        at: datetime,
    ) -> None:
        """``by`` added vendor users (``members``) and people outside the vendor."""
        ...

    def participants_removed(
        self,
        conversation: Conversation,
        by: Idnps,
        members: tuple[Idnps, ...],
        external: tuple[External, ...],
        at: datetime,
    ) -> None:
        """``by`` removed others (never called for a vendor lacking ``remove``)."""
        ...

    def member_left(self, conversation: Conversation, who: Idnps, at: datetime) -> None: ...

    def conversation_updated(
        self, conversation: Conversation, by: Idnps, changes: Mapping[str, str | None], at: datetime
    ) -> None:
        """``changes`` holds only what changed: ``title`` and/or ``description`` (the latter
        never for a vendor lacking ``topic``)."""
        ...


class _Unset:
    """The marker of a field a change leaves as it is."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


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


def check_text(text: str, *, may_be_empty: bool = False) -> str:
    """Refuse an empty text (400, unless the message has a file or a location) or one longer
    than ``MAX_TEXT_BYTES`` (413)."""
    if not text.strip() and not may_be_empty:
        raise bad_request("The message text cannot be empty.")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise SandboxError(
            413,
            "text_too_large",
            f"The message text is {size} bytes; the limit is {MAX_TEXT_BYTES} bytes (64 KiB).",
        )
    return text


def check_location(location: Location) -> Location:
    lat, lon = location.lat, location.lon
    if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
        raise bad_request(
            "The location needs a latitude within [-90, 90] and a longitude within [-180, 180]."
        )
    return location


def check_emoji(emoji: str) -> str:
    if not emoji.strip() or len(emoji) > MAX_EMOJI_LENGTH:
        raise bad_request(f"The emoji must be 1 to {MAX_EMOJI_LENGTH} characters.")
    return emoji


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
        features: Iterable[Feature] = ALL_FEATURES,
        file_rules: FileRules | None = None,
        files: FileStore | None = None,
    ) -> None:
        self.vendor_name = vendor_name
        self.users: dict[Idnps, SandboxUser] = {}
        for user in users:
            if user.idnps in self.users:
                raise ValueError(f"duplicate sandbox user {user.idnps}")
            self.users[user.idnps] = user
        self._listing: list[Idnps] = sorted(self.users)
        """Every IDNPS in ascending order, once: a listing page is a bisect and a slice."""
        self.publisher: EventPublisher | None = None
        self.features = frozenset(features)
        self.file_rules = file_rules or FileRules(max_bytes=100 * 1024 * 1024)
        self.files = files or FileStore()
        self._new_id = new_id
        self._clock = clock
        self._conversations: dict[str, Conversation] = {}
        self._messages: dict[str, Message] = {}
        self._reactions: dict[str, Reaction] = {}
        self._inboxes: dict[Idnps, list[Message]] = {idnps: [] for idnps in self.users}
        self._idempotency: dict[tuple[str, ...], str] = {}
        self._edit_keys: dict[tuple[str, ...], datetime] = {}
        self._attached_to: dict[str, list[Message]] = {}

    def now(self) -> datetime:
        return self._clock()

    def require(self, feature: Feature) -> None:
        """501 ``not_supported`` when the vendor lacks ``feature``."""
        if feature not in self.features:
            raise not_supported(self.vendor_name, _FEATURE_NAMES[feature])

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

    def users_after(self, after: str | None, limit: int) -> tuple[list[SandboxUser], str | None]:
        """The user listing: at most ``limit`` users by IDNPS ascending, after the IDNPS ``after``
        (None: from the first; it need not be a user's), and the cursor of the next page (the
        last IDNPS returned), None when no user follows. 400 for an invalid IDNPS or a limit
        outside 1 .. ``MAX_USER_PAGE``."""
        if not 1 <= limit <= MAX_USER_PAGE:
            raise bad_request(f"The limit must be between 1 and {MAX_USER_PAGE}.")
        start = 0 if after is None else bisect.bisect_right(self._listing, parse_idnps(after))
        ids = self._listing[start : start + limit]
        more = start + len(ids) < len(self._listing)
        return [self.users[i] for i in ids], (str(ids[-1]) if ids and more else None)

    def conversation(self, conversation_id: str) -> Conversation:
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            raise SandboxError(
                404,
                "conversation_not_found",
                f"No {self.vendor_name} conversation has the id {conversation_id[:64]!r}.",
            )
        return conversation

    def message(self, conversation: Conversation, message_id: str) -> Message:
        """A message of ``conversation``, or 404 ``message_not_found``."""
        message = self._messages.get(message_id)
        if message is None or message.conversation_id != conversation.id:
            raise SandboxError(
                404,
                "message_not_found",
                f"No message has the id {message_id[:64]!r} in conversation {conversation.id}.",
            )
        return message

    def member_conversation(self, user: SandboxUser, conversation_id: str) -> Conversation:
        """A conversation ``user`` is a member of: 404 when unknown, 403 when not a member."""
        conversation = self.conversation(conversation_id)
        if user.idnps not in conversation.members:
            raise SandboxError(
                403,
                "not_a_member",
                f"User {user.idnps} is not a member of conversation {conversation.id}.",
            )
        return conversation

    def conversations_of(self, idnps: Idnps) -> list[Conversation]:
        return [c for c in self._conversations.values() if idnps in c.members]

    def inbox(self, idnps: Idnps) -> list[Message]:
        """Messages the user received, in the order received (never the user's own)."""
        return list(self._inboxes[idnps])

    def typing_now(self, conversation: Conversation) -> list[str]:
        """Who is typing in the conversation, in the order they started."""
        now = self._clock()
        return [ref for ref, at in conversation.typing.items() if now - at <= TYPING_TIMEOUT]

    def user_file(self, user: SandboxUser, file_id: str) -> StoredFile:
        """A file ``user`` may download: their own upload, or attached to a message (not
        deleted) of one of their conversations; 404 otherwise."""
        stored = self.files.get(file_id)
        if stored is not None:
            if stored.owner == str(user.idnps):
                return stored
            for message in self._attached_to.get(stored.id, ()):
                conversation = self._conversations[message.conversation_id]
                if message.attachment is stored and user.idnps in conversation.members:
                    return stored
        raise _file_not_found(file_id)

    def api_file(self, file_id: str) -> StoredFile:
        """A file the API client may download: its own upload, or one that was attached to a
        message (even if that message was deleted since); 404 otherwise."""
        stored = self.files.get(file_id)
        if stored is None or (stored.owner is not None and stored.id not in self._attached_to):
            raise _file_not_found(file_id)
        return stored

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
        if (publisher := self._announce(conversation)) is not None:
            publisher.conversation_created(conversation)
        return conversation

    def user_writes(
        self,
        author: SandboxUser,
        conversation_id: str,
        text: str,
        *,
        reply_to: str | None = None,
        file_id: str | None = None,
        location: Location | None = None,
        mentions: Sequence[str] = (),
    ) -> Message:
        """A vendor user writes; announced when the conversation has external participants."""
        conversation = self.member_conversation(author, conversation_id)
        if location is not None:
            self.require("location")
            check_location(location)
        attachment = None
        if file_id is not None:
            attachment = self.user_file(author, file_id)
            self.file_rules.check(attachment.size, attachment.mime_type)
        check_text(text, may_be_empty=attachment is not None or location is not None)
        if reply_to is not None:
            self.message(conversation, reply_to)
        people = self._mentions(conversation, mentions)
        was_typing = conversation.typing.pop(str(author.idnps), None) is not None
        message = self._new_message(
            conversation,
            author.idnps,
            author.display_name,
            text,
            author.idnps,
            reply_to=reply_to,
            mentions=people,
            attachment=attachment,
            location=location,
        )
        if (publisher := self._announce(conversation)) is not None:
            if was_typing:
                publisher.typing_changed(conversation, author.idnps, False, message.created_at)
            publisher.message_created(conversation, message)
        return message

    def user_edits(
        self,
        author: SandboxUser,
        conversation_id: str,
        message_id: str,
        text: str,
        mentions: Sequence[str] = (),
    ) -> Message:
        """A vendor user edits one of their messages."""
        self.require("edit")
        conversation = self.member_conversation(author, conversation_id)
        message = self.message(conversation, message_id)
        if message.author != author.idnps:
            raise _not_author("edit", "message", message.id)
        self._check_editable(message, text)
        people = self._mentions(conversation, mentions)
        self._apply_edit(message, text, people)
        if (publisher := self._announce(conversation)) is not None:
            publisher.message_edited(conversation, message)
        return message

    def user_deletes(self, author: SandboxUser, conversation_id: str, message_id: str) -> None:
        """A vendor user deletes one of their messages (again: nothing happens)."""
        conversation = self.member_conversation(author, conversation_id)
        message = self.message(conversation, message_id)
        if message.author != author.idnps:
            raise _not_author("delete", "message", message.id)
        if message.deleted:
            return
        self._apply_delete(message)
        if (publisher := self._announce(conversation)) is not None:
            publisher.message_deleted(conversation, message)

    def user_reacts(
        self, author: SandboxUser, conversation_id: str, message_id: str, emoji: str
    ) -> tuple[Reaction, bool]:
        """A vendor user reacts; returns the reaction and whether it is new (one reaction per
        person and emoji: a repeat returns the existing one)."""
        self.require("react")
        conversation = self.member_conversation(author, conversation_id)
        message = self._live_message(conversation, message_id, "react to")
        existing = self._same_reaction(message, str(author.idnps), check_emoji(emoji))
        if existing is not None:
            return existing, False
        reaction = self._new_reaction(
            message, str(author.idnps), author.display_name, emoji, author.idnps
        )
        if (publisher := self._announce(conversation)) is not None:
            publisher.reaction_added(conversation, reaction)
        return reaction, True

    def user_unreacts(
        self, author: SandboxUser, conversation_id: str, message_id: str, reaction_id: str
    ) -> None:
        """A vendor user takes back one of their reactions (again: nothing happens)."""
        self.require("react")
        conversation = self.member_conversation(author, conversation_id)
        message = self.message(conversation, message_id)
        reaction = self._reaction(message, reaction_id)
        if reaction.author != author.idnps:
            raise _not_author("remove", "reaction", reaction.id)
        removed = self._remove_reaction(message, reaction)
        if removed and (publisher := self._announce(conversation)) is not None:
            publisher.reaction_removed(conversation, reaction)

    def user_reads(self, reader: SandboxUser, conversation_id: str, up_to: str) -> None:
        """A vendor user has read the conversation up to a message; announced when the marker
        moves forward (it never moves back)."""
        conversation = self.member_conversation(reader, conversation_id)
        message = self.message(conversation, up_to)
        moved = self._move_marker(conversation, str(reader.idnps), message)
        if moved and (publisher := self._announce(conversation)) is not None:
            publisher.conversation_read(conversation, reader.idnps, message, self._clock())

    def user_types(self, who: SandboxUser, conversation_id: str, typing: bool) -> None:
        """A vendor user starts (or goes on) typing, or stops; starting is announced every time
        (a refresh), stopping when they were typing."""
        self.require("typing")
        conversation = self.member_conversation(who, conversation_id)
        ref = str(who.idnps)
        now = self._clock()
        if typing:
            conversation.typing.pop(ref, None)
            conversation.typing[ref] = now
        elif conversation.typing.pop(ref, None) is None:
            return
        if (publisher := self._announce(conversation)) is not None:
            publisher.typing_changed(conversation, who.idnps, typing, now)

    def user_changes_participants(
        self,
        user: SandboxUser,
        conversation_id: str,
        add: Sequence[str] = (),
        remove: Sequence[str] = (),
    ) -> Conversation:
        """A member adds and/or removes people (refs: IDNPS or Matrix user ids).

        Adding someone already in, or removing someone not in, changes nothing. Published when
        the conversation had or has external participants; gaining its first one publishes it
        as a creation (its current state) instead.
        """
        conversation = self.member_conversation(user, conversation_id)
        if not add and not remove:
            raise bad_request("Nothing to change: give refs to 'add' and/or 'remove'.")
        if remove:
            self.require("remove")
        to_add = [parse_ref(raw) for raw in add]
        to_remove = [parse_ref(raw) for raw in remove]
        if str(user.idnps) in to_remove:
            raise bad_request("You cannot remove yourself; leave the conversation instead.")
        if set(to_add) & set(to_remove):
            raise bad_request("The same person cannot be both added and removed.")
        had_external = bool(conversation.external)
        added_members, added_external = self._add_people(
            conversation, to_add, [External(ref, ref) for ref in to_add]
        )
        removed_members, removed_external = self._remove_people(conversation, to_remove)
        if not (added_members or added_external or removed_members or removed_external):
            return conversation
        publisher = self.publisher
        if publisher is None:
            return conversation
        now = self._clock()
        if not had_external:
            if conversation.external:
                if conversation.created_by is None:
                    conversation.created_by = user.idnps
                publisher.conversation_created(conversation)
            return conversation
        if added_members or added_external:
            publisher.participants_added(
                conversation, user.idnps, added_members, added_external, now
            )
        if removed_members or removed_external:
            publisher.participants_removed(
                conversation, user.idnps, removed_members, removed_external, now
            )
        return conversation

    def user_leaves(self, user: SandboxUser, conversation_id: str) -> None:
        """A member leaves; published when the conversation has external participants."""
        conversation = self.member_conversation(user, conversation_id)
        conversation.members = tuple(m for m in conversation.members if m != user.idnps)
        conversation.typing.pop(str(user.idnps), None)
        if (publisher := self._announce(conversation)) is not None:
            publisher.member_left(conversation, user.idnps, self._clock())

    def user_updates(
        self,
        user: SandboxUser,
        conversation_id: str,
        *,
        title: str | None | _Unset = UNSET,
        description: str | None | _Unset = UNSET,
    ) -> Conversation:
        """A member renames the conversation and/or changes its description (None clears it).

        Published (only what changed) when the conversation has external participants.
        """
        conversation = self.member_conversation(user, conversation_id)
        changes = self._update(conversation, title, description)
        if changes and (publisher := self._announce(conversation)) is not None:
            publisher.conversation_updated(conversation, user.idnps, changes, self._clock())
        return conversation

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

    def api_message_for_key(self, conversation_id: str, key: str) -> Message | None:
        """The message an earlier call with this idempotency key created, if any."""
        existing = self._idempotency.get(("message", conversation_id, key))
        return None if existing is None else self._messages[existing]

    def api_writes(
        self,
        key: str,
        conversation_id: str,
        sender: External,
        text: str,
        *,
        kind: MessageKind = "text",
        reply_to: str | None = None,
        attachment: AttachmentSource | None = None,
        location: Location | None = None,
        mentions: Sequence[External] = (),
    ) -> tuple[Message, bool]:
        """The bridge delivers a message from someone outside the vendor; returns it and whether
        it is new. Shown in the members' inboxes, never announced back (no echo)."""
        conversation = self.conversation(conversation_id)
        ref = self._external_ref(sender.ref)
        if location is not None:
            self.require("location")
            check_location(location)
        check_text(text, may_be_empty=attachment is not None or location is not None)
        if reply_to is not None:
            self.message(conversation, reply_to)
        people = tuple(External(parse_ref(m.ref), m.display_name) for m in mentions)
        existing = self.api_message_for_key(conversation.id, key)
        if existing is not None:
            return existing, False
        conversation.typing.pop(ref, None)
        message = self._new_message(
            conversation,
            ref,
            sender.display_name,
            text,
            None,
            kind=kind,
            reply_to=reply_to,
            mentions=people,
            attachment=attachment() if attachment is not None else None,
            location=location,
        )
        self._idempotency[("message", conversation.id, key)] = message.id
        return message, True

    def api_system_message(self, key: str, conversation_id: str, text: str) -> tuple[Message, bool]:
        """The bridge tells the members something (someone could not be added, a message could
        not reach someone ...): a system message from ``SYSTEM_SENDER``, shown in the members'
        inboxes and conversation view, never announced back. Idempotent by ``key``; returns the
        message and whether it is new."""
        conversation = self.conversation(conversation_id)
        check_text(text)
        existing = self._idempotency.get(("system", conversation.id, key))
        if existing is not None:
            return self._messages[existing], False
        message = self._new_message(conversation, SYSTEM_SENDER, SYSTEM_SENDER, text, None)
        message.system = True
        self._idempotency[("system", conversation.id, key)] = message.id
        return message, True

    def api_edits(
        self,
        key: str,
        conversation_id: str,
        message_id: str,
        text: str,
        mentions: Sequence[External] = (),
    ) -> tuple[Message, datetime]:
        """The bridge edits a message it posted; returns it and when the edit (the first with
        this key: a repeated key does not apply again) was made."""
        self.require("edit")
        conversation = self.conversation(conversation_id)
        message = self.message(conversation, message_id)
        done = self._edit_keys.get((message.id, key))
        if done is not None:
            return message, done
        if message.author is not None:
            raise _not_author("edit", "message", message.id)
        self._check_editable(message, text)
        people = tuple(External(parse_ref(m.ref), m.display_name) for m in mentions)
        self._apply_edit(message, text, people)
        assert message.edited_at is not None
        self._edit_keys[(message.id, key)] = message.edited_at
        return message, message.edited_at

    def api_deletes(self, conversation_id: str, message_id: str) -> None:
        """The bridge deletes a message it posted (again: nothing happens)."""
        conversation = self.conversation(conversation_id)
        message = self.message(conversation, message_id)
        if message.author is not None:
            raise _not_author("delete", "message", message.id)
        if not message.deleted:
            self._apply_delete(message)

    def api_reacts(
        self, key: str, conversation_id: str, message_id: str, sender: External, emoji: str
    ) -> tuple[Reaction, bool]:
        """The bridge adds a reaction for someone outside the vendor; returns it and whether it
        is new (a repeated key, or the same person and emoji again, returns the existing one)."""
        self.require("react")
        conversation = self.conversation(conversation_id)
        message = self.message(conversation, message_id)
        ref = self._external_ref(sender.ref)
        check_emoji(emoji)
        existing_id = self._idempotency.get(("reaction", conversation.id, key))
        if existing_id is not None:
            return self._reactions[existing_id], False
        self._live_message(conversation, message_id, "react to")
        reaction = self._same_reaction(message, ref, emoji)
        new = reaction is None
        if reaction is None:
            reaction = self._new_reaction(message, ref, sender.display_name, emoji, None)
        self._idempotency[("reaction", conversation.id, key)] = reaction.id
        return reaction, new

    def api_unreacts(self, conversation_id: str, message_id: str, reaction_id: str) -> None:
        """The bridge removes a reaction it added (again: nothing happens)."""
        self.require("react")
        conversation = self.conversation(conversation_id)
        message = self.message(conversation, message_id)
        reaction = self._reaction(message, reaction_id)
        if reaction.author is not None:
            raise _not_author("remove", "reaction", reaction.id)
        self._remove_reaction(message, reaction)

    def api_reads(self, conversation_id: str, reader: External, up_to: str) -> None:
        """Someone outside the vendor has read the conversation up to a message."""
        conversation = self.conversation(conversation_id)
        ref = self._external_ref(reader.ref)
        self._move_marker(conversation, ref, self.message(conversation, up_to))

    def api_types(self, conversation_id: str, who: External, typing: bool) -> None:
        """Someone outside the vendor starts or stops typing."""
        self.require("typing")
        conversation = self.conversation(conversation_id)
        ref = self._external_ref(who.ref)
        conversation.typing.pop(ref, None)
        if typing:
            conversation.typing[ref] = self._clock()

    def api_reports_delivery(
        self, conversation_id: str, message_id: str, status: DeliveryStatus, detail: str
    ) -> None:
        """What became of a vendor user's message outside the vendor, shown to its author."""
        conversation = self.conversation(conversation_id)
        message = self.message(conversation, message_id)
        if message.author is None:
            raise bad_request(
                f"Delivery statuses are reported on messages written by {self.vendor_name} "
                "users; this message came through the API."
            )
        message.delivery.append(DeliveryReport(status, detail, self._clock()))

    def api_adds_participants(
        self, conversation_id: str, member_refs: Sequence[str], external: Sequence[External]
    ) -> Conversation:
        """The bridge adds vendor users and people outside the vendor (who is in already stays
        as is). Shown to users, never published back."""
        conversation = self.conversation(conversation_id)
        members = [str(self.user(raw).idnps) for raw in member_refs]
        people = [External(self._external_ref(p.ref), p.display_name) for p in external]
        self._add_people(conversation, [*members, *(p.ref for p in people)], people)
        return conversation

    def api_removes_participants(
        self, conversation_id: str, member_refs: Sequence[str], external_refs: Sequence[str]
    ) -> Conversation:
        """The bridge removes vendor users and people outside the vendor (who is not in is
        ignored). A removed user gets nothing more from the conversation and no longer sees it.
        Never published back."""
        conversation = self.conversation(conversation_id)
        members = [str(self.user(raw).idnps) for raw in member_refs]
        refs = [self._external_ref(raw) for raw in external_refs]
        self._remove_people(conversation, [*members, *refs])
        return conversation

    def api_updates(
        self,
        conversation_id: str,
        *,
        title: str | None | _Unset = UNSET,
        description: str | None | _Unset = UNSET,
    ) -> Conversation:
        """The bridge renames the conversation and/or changes its description; never published
        back."""
        conversation = self.conversation(conversation_id)
        self._update(conversation, title, description)
        return conversation

    def history(self, conversation_id: str) -> list[Message]:
        """The conversation's messages written by vendor users, oldest first, deleted ones left
        out."""
        conversation = self.conversation(conversation_id)
        return [m for m in conversation.messages if m.author is not None and not m.deleted]

    def api_history(
        self, conversation_id: str, *, limit: int, since: datetime | None = None
    ) -> list[Message]:
        """The last ``limit`` messages by vendor users written at or after ``since``, oldest
        first, deleted ones left out."""
        if not 1 <= limit <= MAX_HISTORY:
            raise bad_request(f"The limit must be between 1 and {MAX_HISTORY}.")
        messages = self.history(conversation_id)
        if since is not None:
            messages = [m for m in messages if m.created_at >= since]
        return messages[-limit:]

    # Internals ----------------------------------------------------------------------------------

    def _announce(self, conversation: Conversation) -> EventPublisher | None:
        """Where to publish an action of a vendor user in ``conversation``: nowhere (None) when
        nobody outside the vendor is in it."""
        return self.publisher if conversation.external else None

    def _external_ref(self, raw: str) -> str:
        ref = parse_ref(raw)
        if ref in self.users:
            raise bad_request(
                f"{ref} is a {self.vendor_name} user, not someone outside {self.vendor_name}."
            )
        return ref

    def _mentions(self, conversation: Conversation, refs: Sequence[str]) -> tuple[External, ...]:
        """Mentioned refs with the name the vendor shows for them."""
        if len(refs) > MAX_MENTIONS:
            raise bad_request(f"A message mentions at most {MAX_MENTIONS} people.")
        people: list[External] = []
        for raw in refs:
            ref = parse_ref(raw)
            if any(p.ref == ref for p in people):
                continue
            user = self.users.get(Idnps(ref)) if not ref.startswith("@") else None
            name = user.display_name if user is not None else ref
            for person in conversation.external:
                if person.ref == ref:
                    name = person.display_name
            people.append(External(ref, name))
        return tuple(people)

    def _add_people(
        self, conversation: Conversation, refs: Sequence[str], named: Sequence[External]
    ) -> tuple[tuple[Idnps, ...], tuple[External, ...]]:
        """Add each ref not in yet (vendor users as members, others as external, named as in
        ``named``); returns who was added."""
        names = {p.ref: p.display_name for p in named}
        members: list[Idnps] = []
        external: list[External] = []
        for ref in refs:
            if ref in self.users:
                idnps = Idnps(ref)
                if idnps not in conversation.members and idnps not in members:
                    members.append(idnps)
            elif all(e.ref != ref for e in (*conversation.external, *external)):
                external.append(External(ref, names.get(ref, ref)))
        conversation.members = (*conversation.members, *members)
        conversation.external = (*conversation.external, *external)
        return tuple(members), tuple(external)

    def _remove_people(
        self, conversation: Conversation, refs: Sequence[str]
    ) -> tuple[tuple[Idnps, ...], tuple[External, ...]]:
        """Remove each ref that is in; returns who was removed."""
        wanted = set(refs)
        members = tuple(m for m in conversation.members if str(m) in wanted)
        external = tuple(e for e in conversation.external if e.ref in wanted)
        conversation.members = tuple(m for m in conversation.members if str(m) not in wanted)
        conversation.external = tuple(e for e in conversation.external if e.ref not in wanted)
        for ref in wanted:
            conversation.typing.pop(ref, None)
        return members, external

    def _update(
        self,
        conversation: Conversation,
        title: str | None | _Unset,
        description: str | None | _Unset,
    ) -> dict[str, str | None]:
        """Apply a new title and/or description; returns what changed."""
        if not isinstance(description, _Unset):
            self.require("topic")
        changes: dict[str, str | None] = {}
        if not isinstance(title, _Unset) and title != conversation.title:
            conversation.title = title
            changes["title"] = title
        if not isinstance(description, _Unset) and description != conversation.description:
            conversation.description = description
            changes["description"] = description
        return changes

    def _check_editable(self, message: Message, text: str) -> None:
        if message.deleted:
            raise SandboxError(409, "message_deleted", f"Message {message.id} was deleted.")
        check_text(
            text, may_be_empty=message.attachment is not None or message.location is not None
        )

    def _apply_edit(self, message: Message, text: str, mentions: tuple[External, ...]) -> None:
        message.text = text
        message.mentions = mentions
        message.edited_at = self._clock()

    def _apply_delete(self, message: Message) -> None:
        message.deleted_at = self._clock()
        message.text = ""
        message.mentions = ()
        message.attachment = None
        message.location = None
        for reaction in message.reactions:
            reaction.removed_at = message.deleted_at
        message.reactions.clear()

    def _live_message(self, conversation: Conversation, message_id: str, action: str) -> Message:
        message = self.message(conversation, message_id)
        if message.deleted:
            raise SandboxError(
                409, "message_deleted", f"Message {message.id} was deleted; cannot {action} it."
            )
        return message

    @staticmethod
    def _same_reaction(message: Message, ref: str, emoji: str) -> Reaction | None:
        for reaction in message.reactions:
            if reaction.sender_ref == ref and reaction.emoji == emoji:
                return reaction
        return None

    def _reaction(self, message: Message, reaction_id: str) -> Reaction:
        reaction = self._reactions.get(reaction_id)
        if reaction is None or reaction.message_id != message.id:
            raise SandboxError(
                404,
                "reaction_not_found",
                f"No reaction has the id {reaction_id[:64]!r} on message {message.id}.",
            )
        return reaction

    def _new_reaction(
        self, message: Message, ref: str, name: str, emoji: str, author: Idnps | None
    ) -> Reaction:
        reaction = Reaction(
            id=self._new_id("reaction"),
            message_id=message.id,
            conversation_id=message.conversation_id,
            sender_ref=ref,
            sender_name=name,
            emoji=emoji,
            created_at=self._clock(),
            author=author,
        )
        self._reactions[reaction.id] = reaction
        message.reactions.append(reaction)
        return reaction

    def _remove_reaction(self, message: Message, reaction: Reaction) -> bool:
        """Remove it; False when it was already removed."""
        if reaction.removed_at is not None:
            return False
        reaction.removed_at = self._clock()
        message.reactions.remove(reaction)
        return True

    @staticmethod
    def _move_marker(conversation: Conversation, ref: str, message: Message) -> bool:
        current = conversation.read_up_to.get(ref)
        if current is not None and current.position >= message.position:
            return False
        conversation.read_up_to[ref] = message
        return True

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
        *,
        kind: MessageKind = "text",
        reply_to: str | None = None,
        mentions: tuple[External, ...] = (),
        attachment: StoredFile | None = None,
        location: Location | None = None,
    ) -> Message:
        message = Message(
            id=self._new_id("message"),
            conversation_id=conversation.id,
            sender_ref=sender_ref,
            sender_name=sender_name,
            text=text,
            created_at=self._clock(),
            author=author,
            position=len(conversation.messages),
            kind=kind,
            reply_to=reply_to,
            mentions=mentions,
            attachment=attachment,
            location=location,
        )
        conversation.messages.append(message)
        self._messages[message.id] = message
        if attachment is not None:
            self._attached_to.setdefault(attachment.id, []).append(message)
        for member in conversation.members:
            if member != author:
                self._inboxes[member].append(message)
        return message


def _not_author(action: str, what: str, item_id: str) -> SandboxError:
    return SandboxError(403, "not_author", f"Only the author of {what} {item_id} can {action} it.")


def _file_not_found(file_id: str) -> SandboxError:
    return SandboxError(404, "file_not_found", f"No file has the id {file_id[:64]!r} here.")
