"""HTTP client of the PandaLab-style vendor API (OAuth2 client credentials, JSON REST)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
from pydantic import SecretStr

from connectors import http
from connectors.base import AttachmentOpener, ConnectorError

_TOKEN_MARGIN_S = 30.0
"""Refresh a token this long (at most a tenth of its lifetime) before the vendor says it expires,
for clock skew and slow requests."""

_DEFAULT_TIMEOUT_S = 15.0
_TYPING_TIMEOUT_S = 5.0
MAX_HISTORY_BYTES = 64 * 1024 * 1024
"""Longest message history read: up to 1,000 messages of at most 10,000 characters each, with
their mentions, file and location fields."""

T = TypeVar("T")


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
        self._http = http.LazySession(aiohttp.ClientTimeout(total=timeout_s))
        self._token: str | None = None
        self._token_expires_at = 0.0
        self._token_lock = asyncio.Lock()

    # Session ------------------------------------------------------------------------------------

    async def close(self) -> None:
        await self._http.close()

    # Typed API ------------------------------------------------------------------------------------

    async def get_user(self, idnps: str) -> dict[str, Any] | None:
        """``GET /api/v1/users/{idnps}``: the user's JSON, or None for an unknown user."""
        status, body = await self._call(
            "GET", f"/api/v1/users/{http.segment(idnps)}", accept=(404,)
        )
        return None if status == 404 else http.response_object(body, "PandaLab", "user")

    async def list_users(self, after: str | None, limit: int) -> tuple[list[Any], str | None]:
        """``GET /api/v1/users?after=&limit=``: the raw user objects of one page, by IDNPS, and
        ``next`` (the IDNPS to list after; None on the last page)."""
        params = {"limit": str(limit)}
        if after is not None:
            params["after"] = after
        _, data = await self._call("GET", "/api/v1/users", params=params)
        page = http.response_object(data, "PandaLab", "user list")
        users, after_last = page.get("users"), page.get("next")
        if not isinstance(users, list):
            raise ConnectorError(
                "PandaLab answered a user list without a 'users' list", retriable=False
            )
        if not (after_last is None or (isinstance(after_last, str) and after_last)):
            raise ConnectorError(
                "PandaLab answered a user list whose 'next' is neither a string nor null",
                retriable=False,
            )
        return users, after_last

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
        path = f"{_conversation(conversation_id)}/messages"
        _, data = await self._call("POST", path, json=body, idempotency_key=idempotency_key)
        return _string_field(data, "id", "message")

    async def edit_message(
        self, conversation_id: str, message_id: str, body: dict[str, Any], idempotency_key: str
    ) -> None:
        """``PATCH /api/v1/conversations/{id}/messages/{message_id}``."""
        await self._call(
            "PATCH",
            _message(conversation_id, message_id),
            json=body,
            idempotency_key=idempotency_key,
        )

    async def delete_message(self, conversation_id: str, message_id: str) -> bool:
        """``DELETE .../messages/{message_id}``; False when PandaLab has no such message (404),
        which is no error (a repeat of a delete is answered 204)."""
        status, _ = await self._call("DELETE", _message(conversation_id, message_id), accept=(404,))
        return status != 404

    async def add_reaction(
        self, conversation_id: str, message_id: str, body: dict[str, Any], idempotency_key: str
    ) -> str:
        """``POST .../messages/{message_id}/reactions``; returns the reaction id."""
        path = f"{_message(conversation_id, message_id)}/reactions"
        _, data = await self._call("POST", path, json=body, idempotency_key=idempotency_key)
        return _string_field(data, "id", "reaction")

    async def remove_reaction(
        self, conversation_id: str, message_id: str, reaction_id: str
    ) -> bool:
        """``DELETE .../reactions/{reaction_id}``; False when PandaLab has no such reaction
        (404), which is no error."""
        path = f"{_message(conversation_id, message_id)}/reactions/{http.segment(reaction_id)}"
        status, _ = await self._call("DELETE", path, accept=(404,))
        return status != 404

    async def mark_read(self, conversation_id: str, body: dict[str, Any]) -> None:
        """``POST /api/v1/conversations/{id}/read``."""
        await self._call("POST", f"{_conversation(conversation_id)}/read", json=body)

    async def set_typing(self, conversation_id: str, body: dict[str, Any]) -> None:
        """``POST /api/v1/conversations/{id}/typing`` (best effort: a short timeout)."""
        await self._call(
            "POST",
            f"{_conversation(conversation_id)}/typing",
            json=body,
            timeout=aiohttp.ClientTimeout(total=_TYPING_TIMEOUT_S),
        )

    async def post_system_message(
        self, conversation_id: str, text: str, idempotency_key: str
    ) -> None:
        """``POST /api/v1/conversations/{id}/system-messages``: a note to the members from no
        participant (201, or 200 for a repeat)."""
        path = f"{_conversation(conversation_id)}/system-messages"
        await self._call("POST", path, json={"text": text}, idempotency_key=idempotency_key)

    async def report_delivery(
        self, conversation_id: str, message_id: str, body: dict[str, Any]
    ) -> None:
        """``POST .../messages/{message_id}/delivery``: what became of a user's message."""
        path = f"{_message(conversation_id, message_id)}/delivery"
        await self._call("POST", path, json=body)

    async def add_participants(
        self, conversation_id: str, body: dict[str, Any], idempotency_key: str
    ) -> None:
        """``POST /api/v1/conversations/{id}/participants`` (members and external people)."""
        path = f"{_conversation(conversation_id)}/participants"
        await self._call("POST", path, json=body, idempotency_key=idempotency_key)

    async def remove_participants(
        self, conversation_id: str, body: dict[str, Any], idempotency_key: str
    ) -> None:
        """``POST /api/v1/conversations/{id}/participants/remove``."""
        path = f"{_conversation(conversation_id)}/participants/remove"
        await self._call("POST", path, json=body, idempotency_key=idempotency_key)

    async def update_conversation(self, conversation_id: str, body: dict[str, Any]) -> None:
        """``PATCH /api/v1/conversations/{id}`` (a title, a description: setting them twice
        is harmless, so no idempotency key)."""
        await self._call("PATCH", _conversation(conversation_id), json=body)

    async def messages(self, conversation_id: str, *, limit: int, since: str) -> list[Any]:
        """``GET /api/v1/conversations/{id}/messages?limit=&since=``: the raw message objects,
        oldest first."""
        _, data = await self._call(
            "GET",
            f"{_conversation(conversation_id)}/messages",
            params={"limit": str(limit), "since": since},
            limit=MAX_HISTORY_BYTES,
        )
        messages = http.response_object(data, "PandaLab", "message history").get("messages")
        if not isinstance(messages, list):
            raise ConnectorError(
                "PandaLab answered a message history without a 'messages' list", retriable=False
            )
        return messages

    async def create_upload(self, body: dict[str, Any], idempotency_key: str) -> tuple[str, str]:
        """``POST /api/v1/uploads``; returns the file id and the URL to PUT the bytes to."""
        _, data = await self._call(
            "POST", "/api/v1/uploads", json=body, idempotency_key=idempotency_key
        )
        return _string_field(data, "file_id", "upload"), _string_field(data, "upload_url", "upload")

    async def upload(self, upload_url: str, opener: AttachmentOpener, mime_type: str) -> None:
        """``PUT <upload_url>``: stream the file's chunks as the body (never whole in memory).

        On a refused token the file is opened again from the start for the second attempt. A 409
        means the upload already has its bytes (a retried delivery: the upload was created with
        the same idempotency key and completed before), which is a success.
        """
        what = f"PandaLab PUT {http.path_of(upload_url)}"
        self._check_origin(upload_url, what)

        async def attempt(token: str) -> None:
            async with opener() as chunks:
                await self._send(
                    "PUT",
                    upload_url,
                    token,
                    data=chunks,
                    content_type=mime_type,
                    accept=(409,),
                    timeout=http.TRANSFER_TIMEOUT,
                    what=what,
                )

        await self._authorized(what, attempt)

    @asynccontextmanager
    async def download(self, url: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """``GET /api/v1/files/{file_id}`` (at ``url``): the file's bytes, streamed in chunks."""
        what = f"PandaLab GET {http.path_of(url)}"
        self._check_origin(url, what)
        resp = await self._authorized(what, lambda token: self._open_download(url, token, what))
        try:
            yield http.iter_body(resp, what)
        finally:
            resp.release()

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
        params: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        accept: tuple[int, ...] = (),
        timeout: aiohttp.ClientTimeout | None = None,
        limit: int = http.MAX_ANSWER_BYTES,
    ) -> tuple[int, Any]:
        """One authenticated JSON call on the API."""
        what = f"PandaLab {method} {path}"
        return await self._authorized(
            what,
            lambda token: self._send(
                method,
                self._base + path,
                token,
                json=json,
                params=params,
                idempotency_key=idempotency_key,
                accept=accept,
                timeout=timeout,
                limit=limit,
                what=what,
            ),
        )

    async def _authorized(self, what: str, attempt: Callable[[str], Awaitable[T]]) -> T:
        """Run ``attempt`` with the access token; on a 401 fetch a new token once and retry."""
        token = await self._access_token()
        try:
            return await attempt(token)
        except _TokenRejected:
            self._forget_token(token)
        token = await self._access_token()
        try:
            return await attempt(token)
        except _TokenRejected:
            self._forget_token(token)
            raise ConnectorError(
                f"{what}: access token refused twice (401)",
                retriable=False,
                credentials_rejected=True,
            ) from None

    async def _send(
        self,
        method: str,
        url: str,
        token: str,
        *,
        what: str,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        data: AsyncIterator[bytes] | None = None,
        content_type: str | None = None,
        idempotency_key: str | None = None,
        accept: tuple[int, ...] = (),
        timeout: aiohttp.ClientTimeout | None = None,
        limit: int = http.MAX_ANSWER_BYTES,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if content_type is not None:
            headers["Content-Type"] = content_type
        try:
            async with self._http().request(
                method,
                url,
                json=json,
                params=params,
                data=data,
                headers=headers,
                allow_redirects=False,
                **http.timeout_option(timeout),
            ) as resp:
                body = await http.read_json(resp, what, limit=limit)
                if resp.status == 401:
                    raise _TokenRejected
                if resp.status in accept:
                    return resp.status, body
                http.raise_for_status(what, resp.status, body, _vendor_error, resp.headers)
                return resp.status, body
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise http.transport_error(what, exc) from exc

    async def _open_download(self, url: str, token: str, what: str) -> aiohttp.ClientResponse:
        """The response to a file download, status checked, its body not read yet. Redirects
        are followed only on the API's origin (the token never goes elsewhere)."""
        headers = {"Authorization": f"Bearer {token}"}
        try:
            resp = await http.get_on_origin(
                self._http(), url, origin=self._base, headers=headers, timeout=http.TRANSFER_TIMEOUT
            )
            if resp.status < 400:
                return resp
            try:
                body = await http.read_json(resp, what)
            finally:
                resp.release()
        except http.ResponseRefused as exc:
            raise ConnectorError(f"{what}: {exc}", retriable=False) from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise http.transport_error(what, exc) from exc
        if resp.status == 401:
            raise _TokenRejected
        http.raise_for_status(what, resp.status, body, _vendor_error, resp.headers)
        raise AssertionError("unreachable: raise_for_status raised")  # pragma: no cover

    def _check_origin(self, url: str, what: str) -> None:
        """The access token only goes to the API's own origin."""
        if not http.same_origin(url, self._base):
            raise ConnectorError(
                f"{what}: the URL is not on the PandaLab API's origin; refused", retriable=False
            )

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
            async with self._http().post(
                self._base + "/oauth/token", data=form, allow_redirects=False
            ) as resp:
                body = await http.read_json(resp, what)
                http.raise_for_status(what, resp.status, body, _vendor_error, resp.headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise http.transport_error(what, exc) from exc
        token = _string_field(body, "access_token", "token")
        lifetime = body.get("expires_in", 0)
        if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool):
            raise ConnectorError(f"{what}: expires_in is not a number", retriable=False)
        return token, float(lifetime)


# --- Helpers --------------------------------------------------------------------------------------


def _conversation(conversation_id: str) -> str:
    return f"/api/v1/conversations/{http.segment(conversation_id)}"


def _message(conversation_id: str, message_id: str) -> str:
    return f"{_conversation(conversation_id)}/messages/{http.segment(message_id)}"


def _string_field(body: Any, key: str, what: str) -> str:
    value = http.response_object(body, "PandaLab", what).get(key)
    if not isinstance(value, str) or not value:
        raise ConnectorError(f"PandaLab answered a {what} without a {key!r}", retriable=False)
    return value


def _vendor_error(body: Any) -> str:
    return http.error_fields(body, "error", "message")
