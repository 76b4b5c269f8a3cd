"""HTTP client of the PandaLab-style vendor API (OAuth2 client credentials, JSON REST)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from pydantic import SecretStr

from connectors import http
from connectors.base import ConnectorError

_TOKEN_MARGIN_S = 30.0
"""Refresh a token this long (at most a tenth of its lifetime) before the vendor says it expires,
for clock skew and slow requests."""

_DEFAULT_TIMEOUT_S = 15.0


class _TokenRejected(Exception):
    """The vendor answered 401 to a call made with a token (internal: triggers one refresh)."""


class PandaLabClient:
    """One connector's session with the vendor: caches the access token, maps errors.

    Every failure surfaces as a ``ConnectorError``: connection errors, timeouts, 5xx and 429 are
    retriable; other 4xx are permanent. Error messages carry the status and the vendor's error
    code, never a token, a secret or message content.
    """

    def __init__(
        self,
        api_url: str,
        client_id: str,
        client_secret: SecretStr,
        *,
        timeout_s: float = _DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        """Seconds on a monotonic clock, for token expiry (tests substitute a fake one)."""
        self._base = api_url.rstrip("/")
        self._client_id = client_id
        self._client_secret = client_secret
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_expires_at = 0.0
        self._token_lock = asyncio.Lock()

    # Session ------------------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # Typed API ------------------------------------------------------------------------------------

    async def get_user(self, idnps: str) -> dict[str, Any] | None:
        """``GET /api/v1/users/{idnps}``: the user's JSON, or None for an unknown user."""
        status, body = await self._call(
            "GET", f"/api/v1/users/{http.segment(idnps)}", allow_404=True
        )
        return None if status == 404 else http.response_object(body, "PandaLab", "user")

    async def create_conversation(self, body: dict[str, Any], idempotency_key: str) -> str:
        """``POST /api/v1/conversations``; returns the conversation id (the same for a repeat)."""
        _, data = await self._call(
            "POST", "/api/v1/conversations", json=body, idempotency_key=idempotency_key
        )
        return _string_field(data, "id", "conversation")

    async def post_message(
        self, conversation_id: str, body: dict[str, Any], idempotency_key: str
    ) -> str:
        """``POST /api/v1/conversations/{id}/messages``; returns the message id."""
        path = f"/api/v1/conversations/{http.segment(conversation_id)}/messages"
        _, data = await self._call("POST", path, json=body, idempotency_key=idempotency_key)
        return _string_field(data, "id", "message")

    async def set_webhook(self, url: str, secret: SecretStr) -> None:
        """``PUT /api/v1/webhook``: where the vendor pushes events, signed with ``secret``."""
        await self._call(
            "PUT", "/api/v1/webhook", json={"url": url, "secret": secret.get_secret_value()}
        )

    # Plumbing -------------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        allow_404: bool = False,
    ) -> tuple[int, Any]:
        """One authenticated call; on a 401 fetch a new token once and retry."""
        token = await self._access_token()
        try:
            return await self._send(method, path, token, json, idempotency_key, allow_404)
        except _TokenRejected:
            self._forget_token(token)
        token = await self._access_token()
        try:
            return await self._send(method, path, token, json, idempotency_key, allow_404)
        except _TokenRejected:
            self._forget_token(token)
            raise ConnectorError(
                f"PandaLab {method} {path}: access token refused twice (401)", retriable=False
            ) from None

    async def _send(
        self,
        method: str,
        path: str,
        token: str,
        json: dict[str, Any] | None,
        idempotency_key: str | None,
        allow_404: bool,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        what = f"PandaLab {method} {path}"
        try:
            async with self._http().request(
                method, self._base + path, json=json, headers=headers
            ) as resp:
                body = await http.read_json(resp)
                if resp.status == 401:
                    raise _TokenRejected
                if resp.status == 404 and allow_404:
                    return resp.status, body
                http.raise_for_status(what, resp.status, body, _vendor_error)
                return resp.status, body
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ConnectorError(f"{what}: {http.describe(exc)}", retriable=True) from exc

    async def _access_token(self) -> str:
        """The cached token, or a new one when there is none or it is about to expire."""
        async with self._token_lock:
            if self._token is None or self.clock() >= self._token_expires_at:
                self._token, lifetime = await self._fetch_token()
                margin = min(_TOKEN_MARGIN_S, lifetime / 10)
                self._token_expires_at = self.clock() + lifetime - margin
            return self._token

    def _forget_token(self, token: str) -> None:
        """Drop ``token`` from the cache unless a concurrent call already replaced it."""
        if self._token == token:
            self._token = None

    async def _fetch_token(self) -> tuple[str, float]:
        """``POST /oauth/token`` (client credentials); returns the token and its lifetime in s."""
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._client_secret.get_secret_value(),
        }
        what = "PandaLab token request"
        try:
            async with self._http().post(self._base + "/oauth/token", data=form) as resp:
                body = await http.read_json(resp)
                http.raise_for_status(what, resp.status, body, _vendor_error)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ConnectorError(f"{what}: {http.describe(exc)}", retriable=True) from exc
        token = _string_field(body, "access_token", "token")
        lifetime = body.get("expires_in", 0)
        if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool):
            raise ConnectorError(f"{what}: expires_in is not a number", retriable=False)
        return token, float(lifetime)


# --- Helpers --------------------------------------------------------------------------------------


def _string_field(body: Any, key: str, what: str) -> str:
    value = http.response_object(body, "PandaLab", what).get(key)
    if not isinstance(value, str) or not value:
        raise ConnectorError(f"PandaLab answered a {what} without a {key!r}", retriable=False)
    return value


def _vendor_error(body: Any) -> str:
    return http.error_fields(body, "error", "message")
