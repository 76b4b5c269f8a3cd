"""The bridge's side of the webhook contract: ``POST /events`` and ``GET /capabilities``.

Whatever arrives, the answer is JSON: 2xx only once every event of the request is durably
stored, else a 4xx that names what is wrong (never retried as it is) or 429/503 with
``Retry-After`` (send the same request again). Checks run cheapest and least revealing first:
the signature headers (timestamp in the replay window), then the declared size, before a byte
of the body is read, then the body, read up to the limit, then its signature, the rate (signed
requests only) and its content; a request whose signature fails learns nothing about its body.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from connectors import http
from connectors.base import RemoteEvent
from connectors.kit.ids import InvalidRemoteId
from connectors.webhook import signing
from connectors.webhook.convert import InvalidEvent, events_from_request
from connectors.webhook.idempotency import Answer, IdempotencyKeys

_KEY = re.compile(r"[!-~]{1,255}")
STORAGE_RETRY_AFTER_S = 5
IN_PROGRESS_RETRY_AFTER_S = 1


class Refusal(Exception):
    """A request answered with an error: status, machine code, a sentence, extra headers."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def response(self) -> web.Response:
        return json_error(self.status, self.code, self.message, self.headers)


def json_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


class TokenBucket:
    """Requests per second from one vendor, with bursts: ``take`` says how long to wait."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> float:
        """0 when a request may go now (and counts it), else the seconds until one may."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


EventsSink = Callable[[Sequence[RemoteEvent]], Awaitable[None]]


class EventReceiver:
    """The web routes one webhook connector instance serves under ``/connectors/<id>``."""

    def __init__(
        self,
        *,
        connector_id: str,
        secrets: Callable[[], Sequence[str]],
        store: EventsSink,
        registration: Callable[[], dict[str, Any]],
        max_body_bytes: int,
        max_events: int,
        replay_window_s: int,
        rate: TokenBucket,
        log: logging.Logger,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.connector_id = connector_id
        self.keys = IdempotencyKeys()
        self._secrets = secrets
        self._store = store
        self._registration = registration
        self._max_body_bytes = max_body_bytes
        self._max_events = max_events
        self._replay_window_s = replay_window_s
        self._rate = rate
        self._log = log
        self._wall_clock = wall_clock

    def routes(self) -> list[web.RouteDef]:
        # Any method is routed here, so that a wrong one is refused as JSON too.
        return [
            web.route("*", "/events", self._events),
            web.route("*", "/capabilities", self._capabilities),
        ]

    def refuse_unread(self, request: web.BaseRequest) -> web.StreamResponse | None:
        """A push (``POST``) whose signature headers are missing, malformed or stale: its 401,
        given before its body is read (``Connector.refuse_unread``)."""
        if request.method != "POST":
            return None  # other methods: answered 405 or checked by their handler
        try:
            self._authenticate_headers(request)
        except Refusal as refusal:
            return self._refused(refusal)
        return None

    def _refused(self, refusal: Refusal) -> web.StreamResponse:
        """A refused push: logged (code and rule, never the body) and answered."""
        self._log.warning(
            "webhook %s: events refused (%d %s): %s",
            self.connector_id,
            refusal.status,
            refusal.code,
            refusal.message,
        )
        return refusal.response()

    # Handlers -----------------------------------------------------------------------------------

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return _method_not_allowed(request.method, "POST")
        try:
            return await self._receive(request)
        except Refusal as refusal:
            return self._refused(refusal)

    async def _capabilities(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            return _method_not_allowed(request.method, "GET")
        try:
            self._authenticate(request, b"")
            self._limit_rate()
        except Refusal as refusal:
            return refusal.response()
        return web.json_response(self._registration())

    # The pipeline -------------------------------------------------------------------------------

    async def _receive(self, request: web.Request) -> web.Response:
        self._authenticate_headers(request)  # an unsigned or stale request is refused unread
        raw = await self._read_body(request)  # a declared oversize one too
        self._authenticate(request, raw)
        self._limit_rate()  # signed requests only: strangers cannot spend the vendor's budget
        if request.content_type != "application/json":
            raise Refusal(
                415,
                "unsupported_media_type",
                "the body must be JSON (Content-Type: application/json)",
            )
        key = request.headers.get(signing.IDEMPOTENCY_HEADER)
        if key is None or not _KEY.fullmatch(key):
            raise Refusal(
                400,
                "invalid_request",
                f"the {signing.IDEMPOTENCY_HEADER} header is required: 1 to 255 visible ASCII "
                "characters",
            )
        verdict, first = self.keys.begin(key, hashlib.sha256(raw).hexdigest())
        if verdict == "replay":
            assert first is not None
            return web.json_response(
                first.body, status=first.status, headers={"Idempotent-Replayed": "true"}
            )
        if verdict == "in_progress":
            raise Refusal(
                409,
                "request_in_progress",
                "a request with this Idempotency-Key is still being processed; try again later",
                {"Retry-After": str(IN_PROGRESS_RETRY_AFTER_S)},
            )
        if verdict == "reused":
            raise Refusal(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used with another body; a new request needs a new key",
            )
        try:
            events = self._parse(raw)
            await self._store_events(events)
        except BaseException:
            self.keys.abandon(key)
            raise
        answer = Answer(200, {"stored": len(events)})
        self.keys.finish(key, answer)
        return web.json_response(answer.body, status=answer.status)

    def _limit_rate(self) -> None:
        wait = self._rate.take()
        if wait > 0:
            raise Refusal(
                429,
                "rate_limited",
                "too many requests; slow down",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )

    def _too_large(self) -> Refusal:
        limit = self._max_body_bytes
        return Refusal(413, "body_too_large", f"the body is larger than the {limit} bytes accepted")

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, read up to the limit: a declared larger one is refused unread, a chunked
        one cut (refused) as it passes the limit."""
        raw = await http.read_request_body(request, self._max_body_bytes)
        if raw is None:
            raise self._too_large()
        return raw

    def _authenticate_headers(self, request: web.Request) -> None:
        reason = signing.SIGNATURES.header_refusal(
            self._secrets(),
            request.headers.get(signing.TIMESTAMP_HEADER),
            request.headers.get(signing.SIGNATURE_HEADER),
            now=self._wall_clock(),
            window_s=self._replay_window_s,
        )
        if reason is not None:
            raise Refusal(401, "unauthorized", reason)

    def _authenticate(self, request: web.Request, raw: bytes) -> None:
        reason = signing.SIGNATURES.refusal(
            self._secrets(),
            request.headers.get(signing.TIMESTAMP_HEADER),
            request.headers.get(signing.SIGNATURE_HEADER),
            raw,
            now=self._wall_clock(),
            window_s=self._replay_window_s,
        )
        if reason is not None:
            raise Refusal(401, "unauthorized", reason)

    def _parse(self, raw: bytes) -> list[RemoteEvent]:
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except UnicodeDecodeError:
            raise Refusal(400, "malformed_json", "the body is not valid UTF-8") from None
        except (ValueError, RecursionError):
            raise Refusal(400, "malformed_json", "the body is not valid JSON") from None
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise Refusal(
                400, "malformed_json", "the body holds a lone surrogate (\\ud800-\\udfff escape)"
            ) from None
        except RecursionError:
            raise Refusal(400, "malformed_json", "the body is nested too deeply") from None
        try:
            return events_from_request(body, self._max_events)
        except InvalidEvent as exc:
            raise Refusal(exc.status, exc.code, str(exc)) from None

    async def _store_events(self, events: list[RemoteEvent]) -> None:
        try:
            await self._store(events)
        except InvalidRemoteId as exc:  # the intake's id rule (this contract's is stricter)
            raise Refusal(400, "invalid_request", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any storage failure: the vendor sends again
            self._log.error(
                "webhook %s: could not store %d events (%s); asking for redelivery",
                self.connector_id,
                len(events),
                type(exc).__name__,
            )
            raise Refusal(
                503,
                "not_stored",
                "the events could not be stored; send the same request again",
                {"Retry-After": str(STORAGE_RETRY_AFTER_S)},
            ) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _method_not_allowed(method: str, allowed: str) -> web.Response:
    return json_error(
        405,
        "method_not_allowed",
        f"the method {method[:20]} is not allowed here; use {allowed}",
        {"Allow": allowed},
    )
