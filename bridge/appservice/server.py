"""The application-service HTTP API the homeserver calls, plus liveness and readiness probes.

A transaction is written whole to the durable inbox, in one database transaction, before the
homeserver gets its 200; a transaction id already stored is acknowledged and not processed again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from bridge.appservice.auth import check_hs_token
from bridge.appservice.errors import matrix_error
from bridge.db.inbox import InboxStore

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
    ) -> None:
        self._hs_token = hs_token
        self._inbox = inbox
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
        try:
            new = await self._inbox.store_transaction(txn_id, events, ephemeral)
        except Exception:
            # Not stored, so not acknowledged: the homeserver will send it again.
            log.exception("Could not store transaction %s", txn_id)
            raise matrix_error(503, "M_UNKNOWN", "Storage unavailable, retry later") from None
        if new:
            log.debug("Stored transaction %s (%d events)", txn_id, len(events))
            self._on_stored()
        else:
            log.info("Transaction %s was stored before; acknowledged again", txn_id)
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
