"""Files on the homeserver's media repository, streamed both ways (never whole in memory)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import ClientConnectorError, ClientError, ClientResponse, ClientSession, ClientTimeout

_MXC = re.compile(r"^mxc://([A-Za-z0-9.:\-\[\]]+)/([A-Za-z0-9_\-]+)$")


class MediaError(Exception):
    """A file could not be moved; ``retriable`` says whether trying again may help.

    ``homeserver_down``: the homeserver itself does not answer (its own endpoints fail), so
    every file waits for it and no single message is to blame. Otherwise a retriable error is
    this file's trouble (the homeserver answered, but could not fetch the remote media in time,
    a 502/504...), and the caller spends that message's budget on it. ``status``: the
    homeserver's HTTP status, when it answered one.
    """

    def __init__(
        self,
        message: str,
        *,
        retriable: bool,
        homeserver_down: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.homeserver_down = homeserver_down
        self.status = status


@dataclass(frozen=True)
class MediaRepository:
    base_url: str
    as_token: str
    session: ClientSession
    chunk_size: int = 64 * 1024
    fetch_timeout_s: float = 20.0
    """Longest wait for the homeserver to start answering a download (it fetches remote media
    whole before it answers): past it, that try of the file failed."""
    probe_timeout_s: float = 5.0

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.as_token}"}

    async def answers(self) -> bool:
        """Whether the homeserver's own endpoints answer (``/_matrix/client/versions``)."""
        try:
            async with self.session.get(
                f"{self.base_url}/_matrix/client/versions",
                timeout=ClientTimeout(total=self.probe_timeout_s),
            ) as resp:
                return resp.status == 200
        except (OSError, TimeoutError, ClientError):
            return False

    async def _failed(
        self, message: str, *, status: int | None = None, unreachable: bool = False
    ) -> MediaError:
        """A retriable failure, classified: the homeserver down, or this file's trouble."""
        down = unreachable or not await self.answers()
        return MediaError(message, retriable=True, homeserver_down=down, status=status)

    @contextlib.asynccontextmanager
    async def download(self, mxc: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream a file through authenticated media (``/_matrix/client/v1/media/download``)."""
        match = _MXC.match(mxc)
        if match is None:
            raise MediaError("not an mxc:// URI", retriable=False)
        server, media_id = match.groups()
        url = (
            f"{self.base_url}/_matrix/client/v1/media/download/"
            f"{quote(server, safe='')}/{quote(media_id, safe='')}"
        )
        timeout = ClientTimeout(total=None, sock_connect=30, sock_read=120)
        try:
            async with asyncio.timeout(self.fetch_timeout_s):
                resp = await self.session.get(url, headers=self._headers(), timeout=timeout)
        except ClientConnectorError:
            raise await self._failed(
                "the homeserver cannot be reached for a file", unreachable=True
            ) from None
        except (OSError, TimeoutError, ClientError) as error:
            what = f"downloading a file failed ({type(error).__name__})"
            raise await self._failed(what) from None
        try:
            if resp.status != 200:
                message = f"the homeserver answered {resp.status} for a file"
                if resp.status >= 500 or resp.status == 429:
                    raise await self._failed(message, status=resp.status)
                raise MediaError(message, retriable=False, status=resp.status)
            yield self._chunks(resp)
        finally:
            resp.release()

    async def _chunks(self, resp: ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.content.iter_chunked(self.chunk_size):
                yield chunk
        except (OSError, TimeoutError, ClientError) as error:
            raise await self._failed(f"reading a file failed ({type(error).__name__})") from None

    async def upload(
        self,
        chunks: AsyncIterator[bytes],
        *,
        user_id: str,
        mime_type: str,
        filename: str | None,
        size: int | None,
    ) -> str:
        """Stream a file into the media repository as ``user_id``; return its mxc:// URI."""
        headers = {**self._headers(), "Content-Type": mime_type}
        if size is not None:
            headers["Content-Length"] = str(size)
        timeout = ClientTimeout(total=None, sock_connect=30, sock_read=300)
        try:
            async with self.session.post(
                f"{self.base_url}/_matrix/media/v3/upload",
                params={"user_id": user_id, **({"filename": filename} if filename else {})},
                data=chunks,
                headers=headers,
                timeout=timeout,
            ) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200 or not isinstance(body, dict) or "content_uri" not in body:
                    errcode = body.get("errcode") if isinstance(body, dict) else None
                    raise MediaError(
                        f"the homeserver refused the file ({resp.status} {errcode or ''})".strip(),
                        retriable=resp.status >= 500 or resp.status == 429,
                    )
                return str(body["content_uri"])
        except MediaError:
            raise
        except (OSError, TimeoutError) as error:
            raise MediaError(
                f"uploading a file failed ({type(error).__name__})", retriable=True
            ) from None
