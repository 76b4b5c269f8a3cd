"""The bridge's hands on the homeserver: the bot and ghost intents over the client-server API."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from typing import Any

from aiohttp import ClientSession
from mautrix.api import Method, Path
from mautrix.appservice import AppServiceAPI, IntentAPI
from mautrix.appservice.state_store.asyncpg import PgASStateStore
from mautrix.errors import MatrixRequestError, MUserInUse
from mautrix.types import (
    EventID,
    EventType,
    RoomCreatePreset,
    RoomDirectoryVisibility,
    RoomID,
    UserID,
)
from mautrix.util.async_db import Database

from bridge.config import Config
from bridge.matrix.encryption import Encryptor
from bridge.values.trust import SERVER_ACL, TrustList, acl_matches

log = logging.getLogger("eimis.matrix")


class HomeserverCheckFailed(Exception):
    """The homeserver cannot be used; the message says what to fix."""


SEND_RETRIES = 0
"""In-call retries of an event send. None: mautrix resends a request whose answer was lost with
the same transaction id, which Synapse forgets when it restarts (it keeps appservice transaction
ids in memory), so such a retry can double a message. The lanes retry instead, and a retry of
a vendor message looks for the event an unanswered attempt sent (``ToMatrix._already_sent``).
Other calls (reads, joins, profiles, typing, receipts) keep mautrix's retries: repeating them
changes nothing."""


def _never_resending(session: ClientSession) -> ClientSession:
    """A session on the same connection pool that never resends a request by itself.

    aiohttp resends a PUT once, at once, when the connection drops before the answer (it takes
    PUT for idempotent, aio-libs/aiohttp#10790): for a Matrix send that is the same doubling
    as mautrix's retries. The switch is private (aiohttp's own test client uses it); if a
    later aiohttp drops it, the fault tests (a send whose answer is lost) say so.
    """
    sends = ClientSession(
        connector=session.connector, connector_owner=False, timeout=session.timeout
    )
    if "_retry_connection" in getattr(ClientSession, "ATTRS", ()):
        sends._retry_connection = False
    else:
        log.warning("This aiohttp may resend a Matrix send whose answer was lost")
    return sends


PORTAL_HISTORY_VISIBILITY = "invited"
"""Members see a portal's history from their invite on (not "joined"): a ghost or a native user
invited into a portal must see what was said between the invite and their join (the bridge's
catch-up after a ghost's invite reads exactly that), and nobody sees what came before."""

BOT_LEVEL = 100
MEMBER_LEVEL = 1
"""The level the bridge gives a portal's native members: enough to remove a ghost (level 0)."""
POLICY_EVENTS = (
    SERVER_ACL,
    "m.room.encryption",
    "m.room.power_levels",
    "m.room.join_rules",
    "m.room.history_visibility",
)
"""State that only the bot (level 100) may change in a portal."""


def portal_power_levels(bot_mxid: str) -> dict[str, Any]:
    """Power levels of a portal the bridge creates (the bot, ``bot_mxid``, creates it).

    Everyone (ghosts and native members, level 0) sends messages, reactions and redactions of
    their own events, may invite, and may rename the portal and set its topic; the room's rules
    (``POLICY_EVENTS``, guest access, tombstone, the bridge's capability state, any other state)
    need the bot's level. Removing someone needs ``MEMBER_LEVEL``: the bridge raises native
    members to it when they join (a native member can then remove a ghost, whose level is 0, but
    not another native member); ghosts stay at 0 and the bot removes people for the vendors.
    Banning and redacting others' events need 50, which nobody but the bot has.
    """
    events = {event_type: BOT_LEVEL for event_type in POLICY_EVENTS}
    events.update(
        {
            "m.room.guest_access": BOT_LEVEL,
            "m.room.tombstone": BOT_LEVEL,
            "m.room.canonical_alias": BOT_LEVEL,
            "eu.eimis.bridge.capabilities": BOT_LEVEL,
            "m.room.name": 0,
            "m.room.topic": 0,
            "m.room.avatar": 50,
            "m.room.message": 0,
            "m.reaction": 0,
            "m.room.redaction": 0,
        }
    )
    # No "users": the homeserver fills the creator (the bot) in at 100, or, from room version
    # 12 on, gives creators unbounded power and refuses them in "users"; nobody else is listed.
    del bot_mxid
    return {
        "users_default": 0,
        "events": events,
        "events_default": 0,
        "state_default": BOT_LEVEL,
        "invite": 0,
        "kick": MEMBER_LEVEL,
        "ban": 50,
        "redact": 50,
        "notifications": {"room": 50},
    }


CREATOR_LEVEL = 2**63
"""What a room creator can do in room versions 12 and later: anything."""


_LEVELLED_CREATOR_VERSIONS = frozenset(str(v) for v in range(1, 12))
"""Room versions whose creator has only the power level the room gives them."""


def _level_of(levels: dict[str, Any], mxid: str) -> int:
    users = levels.get("users") if isinstance(levels.get("users"), dict) else {}
    value = users.get(mxid, levels.get("users_default", 0))
    return int(value) if isinstance(value, int | float) else 0


def _required(levels: dict[str, Any], event_type: str) -> int:
    events = levels.get("events") if isinstance(levels.get("events"), dict) else {}
    if event_type in events:
        return int(events[event_type])
    # Without a power-levels event, state needs 0 (spec); with one, state_default (50 unset).
    return int(levels.get("state_default", 50 if levels else 0))


PORTAL_ENCRYPTION = {
    "algorithm": "m.megolm.v1.aes-sha2",
    "rotation_period_ms": 7 * 24 * 3600 * 1000,
    "rotation_period_msgs": 100,
}
"""The ``m.room.encryption`` of the portals the bridge creates (the specification's defaults)."""

FEDERATION_FORMAT = '{"event_format":"federation"}'
"""A ``/messages`` filter asking for events with their place in the room graph."""


def derived_txn_id(*parts: str) -> str:
    """A transaction id derived from the source of an event, so a resend cannot duplicate it."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]
    return f"eimis.{digest}"


def _api_log() -> logging.Logger:
    api_log = logging.getLogger("eimis.matrix.api")
    # mautrix logs request bodies (message content) at DEBUG: never let those records exist.
    api_log.setLevel(logging.INFO)
    return api_log


def appservice_api(
    config: Config, as_token: str, db: Database, session: ClientSession
) -> AppServiceAPI:
    """The appservice's client-server API over ``session``, with its state store in ``db``
    (what the ``Homeserver`` and the encryption's key requests share)."""
    return AppServiceAPI(
        base_url=config.homeserver.url,
        bot_mxid=UserID(config.bot_mxid),
        token=as_token,
        log=_api_log(),  # type: ignore[arg-type]
        state_store=PgASStateStore(db),
        client_session=session,
        default_retry_count=3,  # not for event sends: see SEND_RETRIES
    )


class Homeserver:
    def __init__(
        self,
        config: Config,
        as_token: str,
        db: Database,
        session: ClientSession,
        *,
        api: AppServiceAPI | None = None,
        encryptor: Encryptor | None = None,
    ) -> None:
        """``api``: an ``appservice_api`` already made (shared with the encryption's keys);
        ``encryptor``: end-to-bridge encryption (``bridge/crypto``), None when it is off."""
        self.config = config
        self.api = api or appservice_api(config, as_token, db, session)
        self.state_store = self.api.state_store
        api_log = _api_log()
        self.bot = self.api.bot_intent()
        self._direct_locks: dict[str, asyncio.Lock] = {}
        self.trust = TrustList(config.homeserver.domain, config.trust.servers)
        """The effective trust list (the running bridge refreshes it from the database)."""
        self.encryptor = encryptor
        """End-to-bridge encryption: what is sent in an encrypted room is encrypted."""
        self._send_session = _never_resending(session)
        self._sends = AppServiceAPI(
            base_url=config.homeserver.url,
            bot_mxid=UserID(config.bot_mxid),
            token=as_token,
            log=api_log,  # type: ignore[arg-type]
            state_store=self.state_store,
            client_session=self._send_session,
            default_retry_count=SEND_RETRIES,
        )

    @property
    def encrypt_new_portals(self) -> bool:
        """Portals are created encrypted: encryption on, and by default or required."""
        wanted = self.config.encryption.default or self.config.encryption.require
        return self.encryptor is not None and wanted

    async def close(self) -> None:
        """Release the sends' session (the connection pool is the caller's, closed by it)."""
        await self._send_session.close()

    def intent(self, mxid: str) -> IntentAPI:
        return self.api.intent(UserID(mxid))

    # Start-up checks ---------------------------------------------------------------------------

    async def check(self) -> dict[str, Any]:
        """Versions, whoami and appservice ping; raises HomeserverCheckFailed with a sentence."""
        try:
            versions = await self.bot.versions()
        except Exception as error:
            raise HomeserverCheckFailed(
                f"the homeserver at {self.config.homeserver.url} does not answer "
                f"/_matrix/client/versions ({type(error).__name__}); check homeserver.url"
            ) from None
        await self.bot.ensure_registered()
        try:
            whoami = await self.bot.whoami()
        except MatrixRequestError as error:
            raise HomeserverCheckFailed(
                f"the homeserver refused the as_token ({error.errcode}); is the registration file "
                "listed in its app_service_config_files and the same as appservice.registration?"
            ) from None
        if whoami.user_id != self.config.bot_mxid:
            raise HomeserverCheckFailed(
                f"the as_token belongs to {whoami.user_id}, not {self.config.bot_mxid}; check "
                "appservice.bot_localpart / user_prefix against the registration"
            )
        try:
            ping_ms = await self.bot.appservice_ping(self.config.appservice.id)
        except MatrixRequestError as error:
            raise HomeserverCheckFailed(
                f"the homeserver cannot reach this bridge at {self.config.appservice.address} "
                f"({error.errcode}: {error.message}); check appservice.address and the firewall"
            ) from None
        return {"versions": [str(v) for v in versions.versions], "ping_ms": ping_ms}

    # Ghosts and rooms --------------------------------------------------------------------------

    async def ensure_ghost(
        self, mxid: str, display_name: str | None, *, check_current: bool = True
    ) -> IntentAPI:
        """Register the ghost (once) and give it ``display_name``. ``check_current=False``: the
        caller knows the name differs (the directory's publication, by the thousand), so no
        profile read first and no registration note in the state store (a second register
        answers M_USER_IN_USE, which is fine)."""
        intent = self.intent(mxid)
        if check_current:
            await intent.ensure_registered()
        else:
            with contextlib.suppress(MUserInUse):  # ensure_registered without the store
                await intent._register()  # noqa: SLF001
        if display_name:
            await intent.set_displayname(display_name, check_current=check_current)
        return intent

    @property
    def titles_in_room_state(self) -> bool:
        """Conversation titles and topics go in portals' ``m.room.name`` and ``m.room.topic``
        (``portal.titles_in_room_state``)."""
        return self.config.portal.titles_in_room_state

    async def create_portal_room(
        self,
        *,
        title: str | None,
        invite: list[str],
        is_direct: bool,
        topic: str | None = None,
    ) -> str:
        """A portal room made by the bot with the room policy in its initial state.

        Invite-only, never in the room directory, history visible to members from their invite
        on, guests forbidden, ``m.room.server_acl`` (the trust list) from the first event, and
        power levels that let everyone talk but only the bot change the room's rules
        (``portal_power_levels``). ``is_direct`` marks the invites as a direct chat.
        """
        initial_state: list[dict[str, Any]] = [
            {
                "type": "m.room.join_rules",
                "state_key": "",
                "content": {"join_rule": "invite"},
            },
            {
                "type": "m.room.history_visibility",
                "state_key": "",
                "content": {"history_visibility": PORTAL_HISTORY_VISIBILITY},
            },
            {
                "type": "m.room.guest_access",
                "state_key": "",
                "content": {"guest_access": "forbidden"},
            },
        ]
        initial_state.append({"type": SERVER_ACL, "state_key": "", "content": self.trust.acl()})
        if self.encrypt_new_portals:
            initial_state.append(
                {"type": "m.room.encryption", "state_key": "", "content": PORTAL_ENCRYPTION}
            )
        room_id = await self.bot.create_room(
            # Room state is stored in clear by every homeserver of the room; a title may name a
            # patient, so it goes there only when the operator chose so.
            name=title if self.titles_in_room_state else None,
            topic=topic if self.titles_in_room_state else None,
            is_direct=is_direct,
            visibility=RoomDirectoryVisibility.PRIVATE,
            preset=RoomCreatePreset.PRIVATE,
            invitees=[UserID(u) for u in invite],
            initial_state=initial_state,
            power_level_override=portal_power_levels(self.config.bot_mxid),
        )
        if self.encrypt_new_portals:
            assert self.encryptor is not None
            # Known at once: the first messages are encrypted before the state event comes back.
            await self.encryptor.room_encrypted(str(room_id), PORTAL_ENCRYPTION)
        return str(room_id)

    async def follow_encryption(self, room_id: str, viewer: str) -> bool:
        """Whether the room is encrypted, as ``viewer`` (a member) sees its state now; an
        encrypted room is recorded, so what the bridge sends there is encrypted."""
        if self.encryptor is None:
            return False
        if await self.encryptor.encryption_of(room_id) is not None:
            return True
        content = await self.get_state(viewer, room_id, "m.room.encryption")
        return content is not None and await self.encryptor.room_encrypted(room_id, content)

    # Room state and account data ---------------------------------------------------------------

    async def get_state(self, mxid: str, room_id: str, event_type: str) -> dict[str, Any] | None:
        """A state event's content as ``mxid`` (a member) sees it; None when there is none."""
        try:
            content = await self.api.user(UserID(mxid)).request(
                Method.GET, Path.v3.rooms[RoomID(room_id)].state[event_type][""]
            )
        except MatrixRequestError as error:
            if error.http_status == 404:
                return None
            raise
        return content if isinstance(content, dict) else None

    async def event_in_room(
        self, viewer: str, room_id: str, event_id: str
    ) -> dict[str, Any] | None:
        """An event of ``room_id`` as ``viewer`` (a member) gets it from the homeserver (its
        ``sender`` is in clear even when it is encrypted); None when the room has no such event
        that ``viewer`` may see (an event of another room included)."""
        try:
            event = await self.api.user(UserID(viewer)).request(
                Method.GET, Path.v3.rooms[RoomID(room_id)].event[event_id]
            )
        except MatrixRequestError as error:
            if 400 <= error.http_status < 500 and error.http_status != 429:
                return None
            raise
        if not isinstance(event, dict) or event.get("room_id") != room_id:
            return None
        return event

    async def may_redact_others(self, viewer: str, room_id: str, mxid: str) -> bool:
        """Whether ``mxid``'s power level in ``room_id`` (as ``viewer`` reads the room's state)
        reaches the room's ``redact`` level; a room version 12 creator always may."""
        levels = await self.get_state(viewer, room_id, "m.room.power_levels")
        if levels is None:
            return False  # no power levels: only the creator may (spec), checked below
        needed = levels.get("redact", 50)
        if _level_of(levels, mxid) >= (int(needed) if isinstance(needed, int | float) else 50):
            return True
        return await self._is_creator(viewer, room_id, mxid)

    async def _is_creator(self, viewer: str, room_id: str, mxid: str) -> bool:
        """Room version 12 (MSC4289): the creators (the create event's sender and its
        ``additional_creators``) are above every power level."""
        create = await self.get_state(viewer, room_id, "m.room.create") or {}
        if str(create.get("room_version", "1")) in _LEVELLED_CREATOR_VERSIONS:
            return False
        creators = create.get("additional_creators")
        if isinstance(creators, list) and mxid in creators:
            return True
        state = await self.api.user(UserID(viewer)).request(
            Method.GET, Path.v3.rooms[RoomID(room_id)].state
        )
        return isinstance(state, list) and any(
            isinstance(e, dict) and e.get("type") == "m.room.create" and e.get("sender") == mxid
            for e in state
        )

    async def put_state(
        self, mxid: str, room_id: str, event_type: str, content: dict[str, Any]
    ) -> str:
        """Send a state event (empty state key) as ``mxid``; returns its event id."""
        answer = await self.api.user(UserID(mxid)).request(
            Method.PUT, Path.v3.rooms[RoomID(room_id)].state[event_type][""], content
        )
        return str(answer["event_id"])

    async def set_server_acl(self, mxid: str, room_id: str, acl: dict[str, Any]) -> bool:
        """Make the room's ``m.room.server_acl`` say ``acl``; False when it already did."""
        if acl_matches(await self.get_state(mxid, room_id, SERVER_ACL), acl):
            return False
        await self.put_state(mxid, room_id, SERVER_ACL, acl)
        return True

    async def update_server_acls(self, rooms: list[tuple[str, str]]) -> tuple[int, int]:
        """Bring every (room, voice) ACL to the trust list; returns (changed, refused).

        A room where the voice lacks the power level (a portal opened from a Matrix user's
        invite) is logged and skipped; any other failure (the homeserver down) raises, so the
        caller tries the whole pass again.
        """
        acl = self.trust.acl()
        changed = refused = 0
        limit = asyncio.Semaphore(8)

        async def one(room_id: str, voice: str) -> None:
            nonlocal changed, refused
            async with limit:
                try:
                    if await self.set_server_acl(voice, room_id, acl):
                        changed += 1
                except MatrixRequestError as error:
                    if error.http_status not in (403, 404):
                        raise
                    refused += 1
                    log.warning(
                        "Could not set the server ACL in %s as %s (%s)",
                        room_id,
                        voice,
                        error.errcode,
                    )

        await asyncio.gather(*(one(room_id, voice) for room_id, voice in rooms))
        if changed or refused:
            log.info("Server ACL updated in %d portal(s), refused in %d", changed, refused)
        return changed, refused

    async def record_direct(self, mxid: str, other: str, room_id: str) -> None:
        """Add the room to ``mxid``'s ``m.direct`` account data as a direct chat with ``other``."""
        lock = self._direct_locks.setdefault(mxid, asyncio.Lock())
        async with lock:
            intent = self.intent(mxid)
            try:
                current = await intent.get_account_data("m.direct")
            except MatrixRequestError as error:
                if error.http_status != 404:
                    raise
                current = {}
            direct = {k: list(v) for k, v in (current or {}).items() if isinstance(v, list)}
            rooms = direct.setdefault(other, [])
            if room_id in rooms:
                return
            rooms.append(room_id)
            await intent.set_account_data("m.direct", direct)

    async def apply_room_policy(
        self, mxid: str, room_id: str, acl: dict[str, Any]
    ) -> tuple[list[str], list[str]]:
        """In a room the bridge did not create: apply the portal policy as far as ``mxid``'s
        power level allows. Returns (what was changed, what could not be for lack of power).

        Changes only what is weaker than the policy: the ACL (to the trust list), a public join
        rule (to invite), world-readable or shared history (to invited), guest access (to
        forbidden). Power levels are never touched: they are the room owner's.
        """
        levels = await self.get_state(mxid, room_id, "m.room.power_levels") or {}
        mine = _level_of(levels, mxid)
        create = await self.get_state(mxid, room_id, "m.room.create") or {}
        creators = create.get("additional_creators")
        if isinstance(creators, list) and mxid in creators:
            # Room version 12 (MSC4289): a direct chat's invitees (Element's, or any client's
            # "trusted_private_chat") are creators, above every power level.
            mine = CREATOR_LEVEL
        wanted: list[tuple[str, str, Any, dict[str, Any]]] = [
            (
                "m.room.join_rules",
                "join_rule",
                ("invite", "knock", "restricted", "private"),
                {"join_rule": "invite"},
            ),
            (
                "m.room.history_visibility",
                "history_visibility",
                ("invited", "joined"),
                {"history_visibility": PORTAL_HISTORY_VISIBILITY},
            ),
            ("m.room.guest_access", "guest_access", ("forbidden",), {"guest_access": "forbidden"}),
        ]
        changed: list[str] = []
        refused: list[str] = []
        for event_type, key, acceptable, content in wanted:
            current = await self.get_state(mxid, room_id, event_type)
            if current is not None and current.get(key) in acceptable:
                continue
            if event_type == "m.room.guest_access" and current is None:
                continue  # absent means forbidden
            if mine < _required(levels, event_type):
                refused.append(event_type)
                continue
            await self.put_state(mxid, room_id, event_type, content)
            changed.append(event_type)
        if not acl_matches(await self.get_state(mxid, room_id, SERVER_ACL), acl):
            if mine < _required(levels, SERVER_ACL):
                refused.append(SERVER_ACL)
            else:
                await self.put_state(mxid, room_id, SERVER_ACL, acl)
                changed.append(SERVER_ACL)
        return changed, refused

    async def send_message(
        self, mxid: str, room_id: str, content: dict[str, Any], *, txn_id: str, ts_ms: int | None
    ) -> str:
        return await self.send_event(
            mxid, room_id, "m.room.message", content, txn_id=txn_id, ts_ms=ts_ms
        )

    async def send_event(
        self,
        mxid: str,
        room_id: str,
        event_type: str,
        content: dict[str, Any],
        *,
        txn_id: str,
        ts_ms: int | None = None,
    ) -> str:
        """Send as ``mxid`` straight through the client-server API.

        The bridge already knows its users are joined with the right to speak; skipping
        mautrix's per-send power-level check saves a state lookup on every message.

        Never retried inside the call (``SEND_RETRIES``): a failure surfaces, so the caller's
        own retry can first look for an event an unanswered attempt may have sent.
        """
        if self.encryptor is not None:
            encrypted = await self.encryptor.encrypt(mxid, room_id, event_type, content)
            if encrypted is not None:
                event_type, content = "m.room.encrypted", encrypted
        response = await self._sends.user(UserID(mxid)).request(
            Method.PUT,
            Path.v3.rooms[RoomID(room_id)].send[event_type][txn_id],
            content,
            timestamp=ts_ms,
            retry_count=SEND_RETRIES,
        )
        return str(response["event_id"])

    async def redact(self, mxid: str, room_id: str, event_id: str, *, txn_id: str) -> str:
        """Redact as ``mxid`` with a derived transaction id (a retry redacts once); returns the
        redaction's event id."""
        answer = await self._sends.user(UserID(mxid)).request(
            Method.PUT,
            Path.v3.rooms[RoomID(room_id)].redact[EventID(event_id)][txn_id],
            {},
            retry_count=SEND_RETRIES,
        )
        return str(answer["event_id"])

    async def send_notice(self, room_id: str, text: str, *, txn_id: str) -> None:
        """A notice from the bot (a member of the rooms it opened)."""
        await self.send_event(
            self.config.bot_mxid,
            room_id,
            str(EventType.ROOM_MESSAGE),
            {"msgtype": "m.notice", "body": text},
            txn_id=txn_id,
        )

    async def display_name(self, room_id: str, mxid: str, *, viewer: str) -> str:
        """A member's display name in a room as ``viewer`` (a member) sees it, else the user id."""
        try:
            member = await self.intent(viewer).get_room_member_info(
                RoomID(room_id), UserID(mxid), ignore_cache=False
            )
        except MatrixRequestError:
            member = None
        if member is not None and member.displayname:
            return str(member.displayname)
        return mxid

    async def joined_members(self, room_id: str, *, viewer: str) -> list[str]:
        members = await self.intent(viewer).get_joined_members(RoomID(room_id))
        return [str(u) for u in members]

    async def timeline_page(
        self,
        viewer: str,
        room_id: str,
        token: str | None,
        limit: int,
        *,
        federation_format: bool = False,
    ) -> dict[str, Any]:
        """One ``/messages`` page, newest first, read backwards from ``token`` (None: the live
        end) as ``viewer``. ``federation_format`` asks for the events as servers exchange them
        (``prev_events``, ``depth``: the room's graph), through the filter's ``event_format``;
        a homeserver that ignores it answers in the client format. Not retried here: the
        caller decides what a failure means."""
        query = {"dir": "b", "limit": str(limit)}
        if token is not None:
            query["from"] = token
        if federation_format:
            query["filter"] = FEDERATION_FORMAT
        answer = await self.intent(viewer).api.request(
            Method.GET,
            Path.v3.rooms[RoomID(room_id)].messages,
            query_params=query,
            retry_count=0,
        )
        return answer if isinstance(answer, dict) else {}
