"""The bridge's hands on the homeserver: the bot and ghost intents over the client-server API."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from aiohttp import ClientSession
from mautrix.api import Method, Path
from mautrix.appservice import AppServiceAPI, IntentAPI
from mautrix.appservice.state_store.asyncpg import PgASStateStore
from mautrix.errors import MatrixRequestError
from mautrix.types import EventID, EventType, RoomCreatePreset, RoomID, UserID
from mautrix.util.async_db import Database

from bridge.config import Config

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


def derived_txn_id(*parts: str) -> str:
    """A transaction id derived from the source of an event, so a resend cannot duplicate it."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]
    return f"eimis.{digest}"


class Homeserver:
    def __init__(self, config: Config, as_token: str, db: Database, session: ClientSession):
        self.config = config
        self.state_store = PgASStateStore(db)
        api_log = logging.getLogger("eimis.matrix.api")
        # mautrix logs request bodies (message content) at DEBUG: never let those records exist.
        api_log.setLevel(logging.INFO)
        self.api = AppServiceAPI(
            base_url=config.homeserver.url,
            bot_mxid=UserID(config.bot_mxid),
            token=as_token,
            log=api_log,  # type: ignore[arg-type]
            state_store=self.state_store,
            client_session=session,
            default_retry_count=3,  # not for event sends: see SEND_RETRIES
        )
        self.bot = self.api.bot_intent()
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

    async def ensure_ghost(self, mxid: str, display_name: str | None) -> IntentAPI:
        intent = self.intent(mxid)
        await intent.ensure_registered()
        if display_name:
            await intent.set_displayname(display_name)
        return intent

    async def create_portal_room(
        self, *, title: str | None, invite: list[str], is_direct: bool
    ) -> str:
        room_id = await self.bot.create_room(
            name=title,
            is_direct=is_direct,
            preset=RoomCreatePreset.PRIVATE,
            invitees=[UserID(u) for u in invite],
            initial_state=[
                {
                    "type": "m.room.history_visibility",
                    "state_key": "",
                    "content": {"history_visibility": "invited"},
                },
                {
                    "type": "m.room.guest_access",
                    "state_key": "",
                    "content": {"guest_access": "forbidden"},
                },
            ],
        )
        return str(room_id)

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
