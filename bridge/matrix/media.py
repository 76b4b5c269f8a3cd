"""Files on the homeserver's media repository, streamed both ways (never whole in memory)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import ClientSession, ClientTimeout

_MXC = re.compile(r"^mxc://([A-Za-z0-9.:\-\[\]]+)/([A-Za-z0-9_\-]+)$")


class MediaError(Exception):
    """A file could not be moved; ``retriable`` says whether trying again may help."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


@dataclass(frozen=True)
class MediaRepository:
    base_url: str
    as_token: str
    session: ClientSession
    chunk_size: int = 64 * 1024

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.as_token}"}

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
            async with self.session.get(url, headers=self._headers(), timeout=timeout) as resp:
                if resp.status != 200:
                    raise MediaError(
                        f"the homeserver answered {resp.status} for a file",
                        retriable=resp.status >= 500 or resp.status == 429,
                    )
                yield resp.content.iter_chunked(self.chunk_size)
        except MediaError:
            raise
        except (OSError, TimeoutError) as error:
            raise MediaError(
                f"downloading a file failed ({type(error).__name__})", retriable=True
            ) from None

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
