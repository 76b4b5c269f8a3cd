"""HTTP plumbing every vendor client needs: JSON bodies, status mapping, safe error sentences.

Every answer is read with a cap (``read_capped``: a vendor or a directory server cannot make the
bridge hold a body of any size), and credentials stay on the origin they belong to: requests are
sent with ``allow_redirects=False``; a redirect answer is an error, except for downloads
(``get_on_origin``), which follow redirects by hand only while they stay on the API's origin.
The bounded reading and the origin rules raise ``ResponseRefused``, not ``ConnectorError``, so
the bridge's own fetchers (``bridge/directory/fhir.py``) use them too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
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


MAX_ANSWER_BYTES = 1024 * 1024
"""Longest JSON answer read from a vendor unless a call says otherwise (a user, an id, an
error): 1 MiB. A larger answer is refused, not read."""


class ResponseRefused(Exception):
    """An answer the bridge does not read: over its size cap, or a redirect off the origin the
    credentials belong to. The message is a sentence without URL, query string or credential."""


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The response's body, at most ``limit`` bytes: a declared ``Content-Length`` over it is
    refused before reading, and a body without one (chunked) is cut as soon as it passes it.
    The connection is then closed (the rest is never read). Raises ``ResponseRefused``."""
    declared = resp.content_length
    if declared is not None and declared > limit:
        resp.close()
        raise ResponseRefused(
            f"the answer is {declared} bytes, over the {limit} bytes accepted; not read"
        )
    buffer = bytearray()
    async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
        buffer += chunk
        if len(buffer) > limit:
            resp.close()
            raise ResponseRefused(
                f"the answer is larger than the {limit} bytes accepted; not read further"
            )
    return bytes(buffer)


async def read_request_body(request: web.BaseRequest, limit: int) -> bytes | None:
    """A webhook request's body, at most ``limit`` bytes; None when it is larger: a declared
    ``Content-Length`` over the limit is refused before a byte is read, a chunked body as soon
    as it passes the limit (the rest is never read)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    buffer = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK_SIZE):
        buffer += chunk
        if len(buffer) > limit:
            return None
    return bytes(buffer)


async def read_json(
    resp: aiohttp.ClientResponse, what: str, *, limit: int = MAX_ANSWER_BYTES
) -> Any:
    """The response's JSON body (at most ``limit`` bytes), or None when it has none (an HTML
    error page, an empty body). A larger answer is a permanent ``ConnectorError``."""
    try:
        raw = await read_capped(resp, limit)
    except ResponseRefused as exc:
        raise ConnectorError(f"{what}: {exc}", retriable=False) from None
    try:
        return parse_json(raw)
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
    refuse_redirect(what, status)
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


def refuse_redirect(what: str, status: int) -> None:
    """A redirect answer to a request sent with ``allow_redirects=False`` is an error: following
    it could carry the request's credentials (a key, a token, a signed body) to another origin."""
    if 300 <= status < 400:
        raise ConnectorError(
            f"{what}: HTTP {status}: the vendor redirected the request; redirects are not "
            "followed (credentials stay on the API's origin)",
            retriable=False,
        )


def timeout_option(timeout: aiohttp.ClientTimeout | None) -> dict[str, Any]:
    """``timeout=`` for a request that may replace the session's timeout: nothing when None
    (aiohttp reads ``timeout=None`` as no timeout at all, not as the session's)."""
    return {} if timeout is None else {"timeout": timeout}


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


REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5


async def get_on_origin(
    session: aiohttp.ClientSession,
    url: str,
    *,
    origin: str,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout | None = None,
    max_redirects: int = MAX_REDIRECTS,
) -> aiohttp.ClientResponse:
    """``GET url`` with ``headers`` (credentials), following redirects by hand and only while
    they stay on ``origin``'s scheme, host and port, so the headers never reach another origin
    (aiohttp's own redirects keep custom headers such as ``X-Api-Key``). Returns the first
    answer that is not a redirect, its body unread; raises ``ResponseRefused`` for a URL or a
    redirect off the origin, or too many redirects. Transport errors pass through."""
    for _ in range(max_redirects + 1):
        if not same_origin(url, origin):
            raise ResponseRefused("the URL is not on the API's origin; refused")
        resp = await session.get(
            url, headers=dict(headers), allow_redirects=False, **timeout_option(timeout)
        )
        if resp.status not in REDIRECT_STATUSES:
            return resp
        location = resp.headers.get("Location", "")
        resp.release()
        try:
            target = resp.url.join(URL(location)) if location else None
        except ValueError:
            target = None
        if target is None or not same_origin(str(target), origin):
            raise ResponseRefused(
                f"HTTP {resp.status}: redirected off the API's origin; not followed "
                "(credentials stay on the API's origin)"
            )
        url = str(target)
    raise ResponseRefused(f"more than {max_redirects} redirects; not followed")


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
