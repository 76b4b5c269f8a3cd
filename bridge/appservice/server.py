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
import itertools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge.appservice.auth import check_hs_token
from bridge.appservice.errors import MatrixError, matrix_error
from bridge.db.inbox import InboxStore
from bridge.logs import log_context
from bridge.values.crypto_extensions import parse_crypto

if TYPE_CHECKING:
    from bridge.appservice.thirdparty import ThirdParty
    from bridge.core.causal_order import CausalOrder
    from bridge.core.reconcile import TransactionWatch

log = logging.getLogger("eimis.appservice")

_request_ids = itertools.count(1)


@web.middleware
async def request_context(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Records logged while a request is served name it: a number and the path (never the
    query string, where an old homeserver may put its token)."""
    with log_context(request=next(_request_ids), path=request.path):
        return await handler(request)


@web.middleware
async def matrix_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Under ``/_matrix/``, aiohttp's own refusals (no such endpoint, wrong method) are Matrix
    errors too: ``M_UNRECOGNIZED``, as the specification asks of unknown endpoints."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if (
            isinstance(error, MatrixError)
            or error.status < 400
            or not request.path.startswith("/_matrix/")
        ):
            raise
        errcode = "M_UNRECOGNIZED" if error.status in (404, 405) else "M_UNKNOWN"
        refusal = matrix_error(error.status, errcode, error.reason)
        if "Allow" in error.headers:
            refusal.headers["Allow"] = error.headers["Allow"]
        raise refusal from None


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
        thirdparty: ThirdParty | None = None,
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
        # Also serves the connectors' routes (sub-applications): the middleware covers them.
        self.app = web.Application(
            client_max_size=max_body_bytes, middlewares=[request_context, matrix_errors]
        )
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
        if thirdparty is not None:
            self.app.add_routes(thirdparty.routes())

    async def put_transaction(self, request: web.Request) -> web.Response:
        check_hs_token(request, self._hs_token)
        txn_id = request.match_info["txn_id"]
        if not _storable_id(txn_id):
            raise matrix_error(
                400, "M_INVALID_PARAM", "A transaction id is at most 255 bytes of UTF-8, no NUL"
            )
        body, text = await _json_text(request)
        events = _parse_events(body)
        ephemeral = _parse_ephemeral(body)
        crypto = parse_crypto(body)
        if _ESCAPED_SURROGATE.search(text):
            events = _without_lone_surrogates(events)
            ephemeral = _without_lone_surrogates(ephemeral)
            crypto = _without_lone_surrogates(crypto)
        with log_context(txn=txn_id):
            return await self._store_transaction(request, txn_id, events, ephemeral, crypto)

    async def _store_transaction(
        self,
        request: web.Request,
        txn_id: str,
        events: list[dict[str, Any]],
        ephemeral: list[dict[str, Any]],
        crypto: list[dict[str, Any]],
    ) -> web.Response:
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
                new = await self._inbox.store_transaction(
                    txn_id, events, ephemeral, park, crypto=crypto
                )
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
    return (await _json_text(request))[0]


async def _json_text(request: web.Request) -> tuple[Any, str]:
    """The parsed body and its text."""
    try:
        text = await request.text()
        return json.loads(text), text
    except web.HTTPRequestEntityTooLarge:
        raise matrix_error(413, "M_TOO_LARGE", "Request body too large") from None
    except (ValueError, UnicodeDecodeError, LookupError, RecursionError):
        # LookupError: a Content-Type charset Python has no text codec for; RecursionError:
        # JSON nested deeper than the parser goes. Found by tests/unit/test_fuzz_http.py (were
        # 500s).
        raise matrix_error(400, "M_NOT_JSON", "Request body is not valid JSON") from None


_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
"""Only a ``\\uD8xx``-``\\uDFxx`` escape can bring a surrogate into parsed JSON: bodies without
one (nearly all) are never walked."""


def _without_lone_surrogates(value: Any) -> Any:
    """JSON may escape half a UTF-16 pair (``"\\ud800"``), which no UTF-8 text can hold: the
    database, the HTML sanitizer and vendors' APIs would choke on it later, in a lane. Each one
    becomes U+FFFD here, as invalid UTF-8 from vendors does; the event itself is kept."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_lone_surrogates(v) for v in value]
    return value


def _parse_events(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict):
        raise matrix_error(400, "M_BAD_JSON", "A transaction is a JSON object")
    events = body.get("events", [])
    if not isinstance(events, list):
        raise matrix_error(400, "M_BAD_JSON", "'events' must be a list")
    for index, event in enumerate(events):
        if not (
            isinstance(event, dict)
            and _storable_id(event.get("event_id"))
            and _storable_id(event.get("room_id"))
            and isinstance(event.get("type"), str)
            and isinstance(event.get("sender"), str)
        ):
            raise matrix_error(
                400,
                "M_BAD_JSON",
                f"events[{index}] lacks a string event_id/room_id/type/sender (ids: at most "
                f"{MAX_ID_BYTES} bytes of UTF-8, no NUL)",
            )
    return events


MAX_ID_BYTES = 255
"""The specification's limit on room and event ids, and the bridge's on transaction ids."""


def _storable_id(value: object) -> bool:
    """An id the inbox can key and index on any database: a string of valid UTF-8 (no lone
    surrogate), without NUL (PostgreSQL refuses it), within ``MAX_ID_BYTES`` (a longer one can
    exceed PostgreSQL's index row size). Any other was a 503, for ever: found by
    tests/unit/test_fuzz_http.py."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        return len(value.encode("utf-8")) <= MAX_ID_BYTES
    except UnicodeEncodeError:
        return False


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
        and _storable_id(edu.get("room_id"))
        and isinstance(edu.get("content"), dict)
    ]
