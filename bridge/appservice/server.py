"""The application-service HTTP API the homeserver calls, plus liveness and readiness probes.

A transaction is written whole to the durable inbox, in one database transaction, before the
homeserver gets its 200. Events are deduplicated by event id, never by transaction id: Synapse
reuses transaction ids after a restart. What the ids say about events the homeserver may have
lost (ids that start again or jump, a homeserver gone before its answer) goes to a
``TransactionWatch`` (``bridge/core/reconcile.py``), which reads the rooms' timelines before the
transaction is stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge.appservice.auth import check_hs_token
from bridge.appservice.errors import matrix_error
from bridge.db.inbox import InboxStore

if TYPE_CHECKING:
    from bridge.core.causal_order import CausalOrder
    from bridge.core.reconcile import TransactionWatch

log = logging.getLogger("eimis.appservice")


class AppserviceServer:
    def __init__(
        self,
        *,
        hs_token: str,
        inbox: InboxStore,
        on_stored: Callable[[], None],
        query_user: Callable[[str], Awaitable[bool]],
        ready: Callable[[], Awaitable[dict[str, bool]]],
        max_body_bytes: int,
        watch: TransactionWatch | None = None,
        order: CausalOrder | None = None,
    ) -> None:
        self._hs_token = hs_token
        self._inbox = inbox
        self._watch = watch
        self._order = order
        # Shared with the causal order, which moves waiting rows: never while a transaction is
        # half stored.
        self._one_at_a_time = order.lock if order is not None else asyncio.Lock()
        self._on_stored = on_stored
        self._query_user = query_user
        self._ready = ready
        self.app = web.Application(client_max_size=max_body_bytes)
        self.app.add_routes(
            [
                web.put("/_matrix/app/v1/transactions/{txn_id}", self.put_transaction),
                web.get("/_matrix/app/v1/users/{user_id}", self.get_user),
                web.get("/_matrix/app/v1/rooms/{alias}", self.get_room_alias),
                web.post("/_matrix/app/v1/ping", self.post_ping),
                web.get("/live", self.live),
                web.get("/ready", self.ready),
            ]
        )

    async def put_transaction(self, request: web.Request) -> web.Response:
        check_hs_token(request, self._hs_token)
        txn_id = request.match_info["txn_id"]
        body = await _json_body(request)
        events = _parse_events(body)
        ephemeral = _parse_ephemeral(body)
        # The homeserver sends one transaction at a time; the watch reads them in that order.
        async with self._one_at_a_time:
            try:
                restarted = False
                if self._watch is not None:
                    restarted = await self._watch.before_store(txn_id, events, ephemeral)
                park: frozenset[str] = frozenset()
                put_in_order = 0
                if self._order is not None:
                    admission = await self._order.before_store(events)
                    park, put_in_order = admission.park, admission.stored
                new = await self._inbox.store_transaction(txn_id, events, ephemeral, park)
                new = new or put_in_order > 0
            except Exception:
                # Not stored, so not acknowledged: the homeserver will send it again.
                log.exception("Could not store transaction %s", txn_id)
                raise matrix_error(503, "M_UNKNOWN", "Storage unavailable, retry later") from None
            if self._watch is not None:
                self._watch.stored(txn_id, restarted)
        if new:
            log.debug("Stored transaction %s (%d events)", txn_id, len(events))
            self._on_stored()
        else:
            log.info("Transaction %s brought nothing new; acknowledged again", txn_id)
        transport = request.transport
        if self._watch is not None and (transport is None or transport.is_closing()):
            # Stored, but nobody waits for the answer: the homeserver went away meanwhile, and
            # what it held in memory for the bridge may be gone with it.
            self._watch.hung_up(txn_id)
        return web.json_response({})

    async def get_user(self, request: web.Request) -> web.Response:
        check_hs_token(request, self._hs_token)
        user_id = request.match_info["user_id"]
        if await self._query_user(user_id):
            return web.json_response({})
        raise matrix_error(404, "M_NOT_FOUND", "No such user in this bridge")

    async def get_room_alias(self, request: web.Request) -> web.Response:
        check_hs_token(request, self._hs_token)
        raise matrix_error(404, "M_NOT_FOUND", "This bridge provides no room aliases")

    async def post_ping(self, request: web.Request) -> web.Response:
        check_hs_token(request, self._hs_token)
        await _json_body(request)
        return web.json_response({})

    async def live(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, _: web.Request) -> web.Response:
        checks = await self._ready()
        status = 200 if all(checks.values()) else 503
        return web.json_response({"ready": status == 200, "checks": checks}, status=status)


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except web.HTTPRequestEntityTooLarge:
        raise matrix_error(413, "M_TOO_LARGE", "Request body too large") from None
    except (ValueError, UnicodeDecodeError):
        raise matrix_error(400, "M_NOT_JSON", "Request body is not valid JSON") from None


def _parse_events(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict):
        raise matrix_error(400, "M_BAD_JSON", "A transaction is a JSON object")
    events = body.get("events", [])
    if not isinstance(events, list):
        raise matrix_error(400, "M_BAD_JSON", "'events' must be a list")
    for index, event in enumerate(events):
        if not (
            isinstance(event, dict)
            and isinstance(event.get("event_id"), str)
            and isinstance(event.get("room_id"), str)
            and isinstance(event.get("type"), str)
            and isinstance(event.get("sender"), str)
        ):
            raise matrix_error(
                400, "M_BAD_JSON", f"events[{index}] lacks a string event_id/room_id/type/sender"
            )
    return events


BRIDGED_EPHEMERAL = {"m.typing", "m.receipt"}


def _parse_ephemeral(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Typing and read receipts of rooms (MSC2409). Presence is not bridged; other ephemeral
    types are ignored, as the specification asks of unknown event types."""
    ephemeral = body.get("ephemeral", body.get("de.sorunome.msc2409.ephemeral", []))
    if not isinstance(ephemeral, list):
        raise matrix_error(400, "M_BAD_JSON", "'ephemeral' must be a list")
    return [
        edu
        for edu in ephemeral
        if isinstance(edu, dict)
        and edu.get("type") in BRIDGED_EPHEMERAL
        and isinstance(edu.get("room_id"), str)
        and isinstance(edu.get("content"), dict)
    ]
