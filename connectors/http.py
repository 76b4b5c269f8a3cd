"""HTTP plumbing every vendor client needs: JSON bodies, status mapping, safe error sentences."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from connectors.base import ConnectorError
from connectors.payload import parse_json


def new_session(timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """A client session for a vendor API. Vendor APIs authenticate each request (a key, a
    token): no cookie is kept or replayed, which also spares the cookie jar on every call."""
    return aiohttp.ClientSession(timeout=timeout, cookie_jar=aiohttp.DummyCookieJar())


class LazySession:
    """A vendor client's session (``new_session``), opened at its first request and again after
    it was closed: a client made at start-up opens no connection until the bridge uses it."""

    def __init__(self, timeout: aiohttp.ClientTimeout) -> None:
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def __call__(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = new_session(self.timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def read_json(resp: aiohttp.ClientResponse) -> Any:
    """The response's JSON body, or None when it has none (an HTML error page, an empty body)."""
    try:
        return parse_json(await resp.read())
    except ValueError:
        return None


def raise_for_status(
    what: str,
    status: int,
    body: Any,
    vendor_error: Callable[[Any], str],
    headers: Mapping[str, str] | None = None,
) -> None:
    """Map an HTTP error to ConnectorError: 5xx and 429 may succeed later, other 4xx never.

    A 429's ``Retry-After`` (seconds) is kept so the bridge waits at least that long.
    """
    if status < 400:
        return
    detail = f"{what}: HTTP {status}{vendor_error(body)}"
    retry_after = None
    if status == 429 and headers is not None:
        retry_after = retry_after_seconds(headers.get("Retry-After"))
    raise ConnectorError(
        detail,
        retriable=status >= 500 or status == 429,
        retry_after=retry_after,
        credentials_rejected=status == 401,
    )


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds form; an HTTP date counts as unknown)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return min(max(seconds, 0.0), 3600.0)


def transport_error(what: str, exc: BaseException) -> ConnectorError:
    """The vendor did not answer: retriable, and a sign the connector is down."""
    return ConnectorError(f"{what}: {describe(exc)}", retriable=True, unreachable=True)


def error_fields(body: Any, *keys: str) -> str:
    """`` (code: sentence)`` from a vendor error body's ``keys``, bounded; empty when none."""
    if not isinstance(body, dict):
        return ""
    parts = [str(body[k])[:200] for k in keys if isinstance(body.get(k), str) and body[k]]
    return f" ({': '.join(parts)})" if parts else ""


def describe(exc: BaseException) -> str:
    """A transport failure in a few words (no URL query strings, no credentials)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"[:300]


def segment(value: str) -> str:
    """A URL path segment: ids never open another path."""
    return quote(value, safe="")


def response_object(body: Any, vendor: str, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ConnectorError(
            f"{vendor} answered a malformed {what} (not an object)", retriable=False
        )
    return body


# --- Streaming file transfers -------------------------------------------------------------------

CHUNK_SIZE = 64 * 1024
"""Bytes per chunk when streaming a file in or out."""

TRANSFER_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=60)
"""For file transfers: no overall limit (a large file takes its time), but a stalled connection
(no byte for a minute) fails."""


def same_origin(url: str, base: str) -> bool:
    """Whether ``url`` is on the scheme, host and port of ``base`` (credentials never leave it)."""
    try:
        a, b = URL(url), URL(base)
    except ValueError:
        return False
    return a.is_absolute() and (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def path_of(url: str) -> str:
    """The path of ``url`` for an error sentence (no query string, no credentials)."""
    try:
        return URL(url).path[:200]
    except ValueError:
        return "<invalid URL>"


async def iter_body(resp: aiohttp.ClientResponse, what: str) -> AsyncIterator[bytes]:
    """The response body in chunks; a transport failure mid-way is a retriable ConnectorError."""
    try:
        async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
            yield chunk
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise transport_error(what, exc) from exc
