"""HTTP client of a vendor's side of the webhook contract: signed calls with idempotency keys.

Every failure surfaces as a ``ConnectorError``: no answer at all is ``unreachable``; 401 (the
vendor refuses the bridge's signature: the secrets differ, typically mid-rotation), 408, 409
(the first request with this key is still running), 425, 429 (``Retry-After`` kept) and 5xx
may succeed later; other 4xx never will. Error messages carry the status and the vendor's
error code, never a secret or message content.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from connectors import http
from connectors.base import AttachmentOpener, ConnectorError
from connectors.webhook import signing
from connectors.webhook.convert import InvalidAnswer, answer_id

RETRIABLE_STATUSES = frozenset({401, 408, 409, 425, 429})
_KEY = re.compile(r"[!-~]{1,255}")

SecretSource = Callable[[], Sequence[str]]
"""The secrets to sign with, current first, read at each request (a rotation changes them)."""


def idempotency_key(request_id: str) -> str:
    """A request id as an ``Idempotency-Key``: itself when it is a valid key (Matrix ids are),
    else a digest of it, so the key stays stable across retries either way."""
    if _KEY.fullmatch(request_id):
        return request_id
    return "sha256:" + hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()


def derived_key(*parts: str) -> str:
    """A key for an operation without a request id: the same operation, the same key."""
    joined = "\x1f".join(parts).encode("utf-8", "surrogatepass")
    return "op:" + hashlib.sha256(joined).hexdigest()


@dataclass(frozen=True)
class UploadedFile:
    file_id: str
    size: int


class WebhookClient:
    """One connector's session with the vendor."""

    def __init__(
        self,
        base_url: str,
        secrets: SecretSource,
        *,
        timeout_s: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._secrets = secrets
        self._wall_clock = wall_clock
        self._http = http.LazySession(aiohttp.ClientTimeout(total=timeout_s))

    async def close(self) -> None:
        await self._http.close()

    # JSON calls ---------------------------------------------------------------------------------

    async def get(
        self,
        path: str,
        *,
        accept: tuple[int, ...] = (),
        params: dict[str, str] | None = None,
        limit: int = http.MAX_ANSWER_BYTES,
    ) -> tuple[int, Any]:
        return await self._call("GET", path, None, None, accept=accept, params=params, limit=limit)

    async def post(
        self,
        path: str,
        body: dict[str, Any],
        key: str,
        *,
        accept: tuple[int, ...] = (),
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> tuple[int, Any]:
        return await self._call("POST", path, body, key, accept=accept, timeout=timeout)

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        key: str | None,
        *,
        accept: tuple[int, ...],
        timeout: aiohttp.ClientTimeout | None = None,
        params: dict[str, str] | None = None,
        limit: int = http.MAX_ANSWER_BYTES,
    ) -> tuple[int, Any]:
        what = f"vendor {method} {_path_for_errors(path)}"
        raw = b"" if body is None else _json_bytes(body)
        headers = self._signed(raw)
        headers["Accept"] = "application/json"
        if body is not None:
            headers["Content-Type"] = "application/json"
        if key is not None:
            headers[signing.IDEMPOTENCY_HEADER] = key
        try:
            async with self._http().request(
                method,
                self.base_url + path,
                data=raw if body is not None else None,
                params=params,
                headers=headers,
                allow_redirects=False,
                **http.timeout_option(timeout),
            ) as resp:
                answer = await http.read_json(resp, what, limit=limit)
                if resp.status in accept:
                    return resp.status, answer
                raise_for_status(what, resp.status, answer, resp.headers)
                return resp.status, answer
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise http.transport_error(what, exc) from exc

    # Files ----------------------------------------------------------------------------------------

    async def upload(
        self, opener: AttachmentOpener, name: str, mime_type: str, key: str, max_size: int
    ) -> UploadedFile:
        """``POST /files``: the file is read twice, streamed both times (never whole in memory):
        once for its SHA-256, which the signature covers, then to send it."""
        what = "vendor POST /files"
        digest, size = await _digest(opener, max_size, what)
        headers = self._signed(digest.encode("ascii"))
        headers.update(
            {
                signing.DIGEST_HEADER: digest,
                signing.FILENAME_HEADER: quote(name, safe=""),
                signing.IDEMPOTENCY_HEADER: key,
                "Content-Type": mime_type,
                "Content-Length": str(size),
                "Accept": "application/json",
            }
        )
        try:
            async with (
                opener() as chunks,
                self._http().post(
                    self.base_url + "/files",
                    data=chunks,
                    headers=headers,
                    timeout=http.TRANSFER_TIMEOUT,
                    allow_redirects=False,
                ) as resp,
            ):
                answer = await http.read_json(resp, what)
                raise_for_status(what, resp.status, answer, resp.headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise http.transport_error(what, exc) from exc
        try:
            return UploadedFile(answer_id(answer, "file_id", "file upload"), size)
        except InvalidAnswer as exc:
            raise ConnectorError(f"{what}: {exc}", retriable=False) from None

    @asynccontextmanager
    async def download(self, file_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """``GET /files/{file_id}``: a file a vendor user sent, streamed in chunks."""
        what = "vendor GET /files/{file_id}"
        headers = self._signed(b"")
        try:
            resp = await self._http().get(
                f"{self.base_url}/files/{http.segment(file_id)}",
                headers=headers,
                timeout=http.TRANSFER_TIMEOUT,
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise http.transport_error(what, exc) from exc
        try:
            if resp.status >= 300:  # a redirect, not followed, is an error too
                try:
                    answer = await http.read_json(resp, what)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    raise http.transport_error(what, exc) from exc
                raise_for_status(what, resp.status, answer, resp.headers)
            yield http.iter_body(resp, what)
        finally:
            resp.release()

    # Signing ------------------------------------------------------------------------------------

    def _signed(self, payload: bytes) -> dict[str, str]:
        secrets = list(self._secrets())
        if not secrets:
            raise ConnectorError(
                "webhook connector: no shared secret to sign with; set one (connector "
                "rotate-secret, or settings.secret for a connector in the config file)",
                retriable=True,
            )
        return signing.SIGNATURES.headers(secrets, payload, self._wall_clock())


def raise_for_status(what: str, status: int, body: Any, headers: Any) -> None:
    """Map a vendor status to ``ConnectorError`` (see the module docstring); a redirect is
    refused (requests are signed for the vendor's origin, redirects are not followed)."""
    http.refuse_redirect(what, status)
    if status < 400:
        return
    detail = f"{what}: HTTP {status}{http.error_fields(body, 'error', 'message')}"
    if status == 401:
        detail += " (the vendor refused the bridge's signature: check the shared secret)"
    retry_after = None
    if status in (409, 429, 503):
        retry_after = http.retry_after_seconds(headers.get("Retry-After"))
    raise ConnectorError(
        detail,
        retriable=status >= 500 or status in RETRIABLE_STATUSES,
        retry_after=retry_after,
    )


def _json_bytes(body: dict[str, Any]) -> bytes:
    # A lone surrogate (from a malformed Matrix event) cannot travel as UTF-8: it becomes "?".
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


def _path_for_errors(path: str) -> str:
    """The path's shape for an error sentence: ids replaced, they may be personal data."""
    parts = path.split("/")
    shaped = [p if p in _FIXED_SEGMENTS else "{id}" for p in parts]
    return "/".join(shaped)


_FIXED_SEGMENTS = frozenset(
    {"", "bridge", "users", "conversations", "messages", "edit", "delete", "reactions"}
    | {"read", "typing", "delivery", "files", "participants", "remove", "title", "topic"}
)


async def _digest(opener: AttachmentOpener, max_size: int, what: str) -> tuple[str, int]:
    """SHA-256 (hex) and size of the file ``opener`` streams; refused past ``max_size``."""
    sha = hashlib.sha256()
    size = 0
    async with opener() as chunks:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_size:
                raise ConnectorError(
                    f"{what}: the file is over the {max_size} bytes the vendor accepts",
                    retriable=False,
                )
            sha.update(chunk)
    return sha.hexdigest(), size
