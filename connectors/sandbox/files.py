"""The sandbox's file store: files on disk in a per-app temporary directory, streamed in and out.

A file's bytes never sit whole in memory: uploads are written chunk by chunk as they arrive
(the size limit is enforced while streaming, so an oversized upload is refused as soon as it
crosses the limit) and downloads are served from disk by ``web.FileResponse``. On disk a file is
named by its id only; the name a user gave is metadata, sanitised, never part of a path.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload
from urllib.parse import quote

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

from connectors.sandbox.errors import SandboxError, bad_request

CHUNK_SIZE = 256 * 1024
"""Bytes read from the request, or written to the response, at a time."""

MAX_NAME_LENGTH = 255
_MIME = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


@dataclass(frozen=True)
class StoredFile:
    """A complete file on disk; ``owner`` is the IDNPS of the user who uploaded it, None for the
    vendor API client (the bridge)."""

    id: str
    name: str
    mime_type: str
    size: int
    path: Path
    owner: str | None


@overload
def attachment_json(stored: StoredFile) -> dict[str, Any]: ...
@overload
def attachment_json(stored: None) -> None: ...
def attachment_json(stored: StoredFile | None) -> dict[str, Any] | None:
    """A file attached to a message as the sandboxes describe it (None for no file); a vendor
    adds what its API says more, such as a download URL."""
    if stored is None:
        return None
    return {
        "file_id": stored.id,
        "name": stored.name,
        "mime_type": stored.mime_type,
        "size": stored.size,
    }


def sanitize_name(name: str) -> str:
    """A file name safe to show and to put in a header: no control, format (bidi) or separator
    characters, no path separators, at most 255 characters; ``file`` when nothing is left."""
    name = unicodedata.normalize("NFC", name)
    kept = []
    for char in name:
        if char in "/\\":
            kept.append("_")
        elif unicodedata.category(char) not in _UNSAFE_CATEGORIES:
            kept.append(char)
    cleaned = "".join(kept).strip()[:MAX_NAME_LENGTH].strip()
    return cleaned if cleaned.strip(".") else "file"


def parse_mime_type(value: str) -> str:
    """``type/subtype`` in lower case, without parameters; a 400 when it is not one."""
    mime = value.split(";", 1)[0].strip().lower()
    if not _MIME.fullmatch(mime):
        raise bad_request(f"{value[:60]!r} is not a MIME type ('type/subtype').")
    return mime


def content_disposition(name: str) -> str:
    """``attachment`` with an ASCII ``filename`` fallback and the exact ``filename*`` (RFC 5987,
    RFC 6266), so no byte of the name can break out of the header."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def file_response(stored: StoredFile) -> web.FileResponse:
    """The file's bytes streamed from disk (Range requests work too)."""
    return web.FileResponse(
        stored.path,
        chunk_size=CHUNK_SIZE,
        headers={
            "Content-Type": stored.mime_type,
            "Content-Disposition": content_disposition(stored.name),
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, no-store",
        },
    )


class FileStore:
    """Complete files by id, in a temporary directory created on first use (or by ``open``) and
    removed with everything in it by ``close`` (the app's cleanup)."""

    def __init__(self, parent: str | Path | None = None) -> None:
        self._parent = parent
        self._directory: Path | None = None
        self._files: dict[str, StoredFile] = {}

    @property
    def directory(self) -> Path:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="eimis-sandbox-", dir=self._parent))
        return self._directory

    def open(self) -> None:
        _ = self.directory

    def close(self) -> None:
        directory, self._directory = self._directory, None
        self._files.clear()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())

    def get(self, file_id: str) -> StoredFile | None:
        return self._files.get(file_id)

    def add(self, stored: StoredFile) -> StoredFile:
        self._files[stored.id] = stored
        return stored

    def discard(self, stored: StoredFile) -> None:
        """Forget a file and remove it from disk."""
        self._files.pop(stored.id, None)
        stored.path.unlink(missing_ok=True)

    async def receive(
        self,
        content: StreamReader,
        *,
        name: str,
        mime_type: str,
        owner: str | None,
        max_bytes: int,
        too_large: SandboxError,
        declared_size: int | None = None,
        file_id: str | None = None,
    ) -> StoredFile:
        """Stream a request body to disk, refusing with ``too_large`` as soon as it (or its
        declared ``Content-Length``) goes over ``max_bytes``. The file is not registered yet:
        the caller ``add``s it, or ``discard``s it."""
        if declared_size is not None and declared_size > max_bytes:
            raise too_large
        file_id = file_id or self.new_id()
        final = self.directory / file_id
        partial = self.directory / f"{file_id}.part"
        size = 0
        try:
            with partial.open("xb") as out:
                async for chunk in content.iter_chunked(CHUNK_SIZE):
                    size += len(chunk)
                    if size > max_bytes:
                        raise too_large
                    out.write(chunk)
            partial.replace(final)
        except (ConnectionError, HttpProcessingError):
            partial.unlink(missing_ok=True)
            raise SandboxError(
                400, "upload_incomplete", "The upload was interrupted before its end."
            ) from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return StoredFile(file_id, name, mime_type, size, final, owner)

    def put_bytes(self, data: bytes, *, name: str, mime_type: str, owner: str | None) -> StoredFile:
        """Store a small file already in memory (an inline attachment) and register it."""
        file_id = self.new_id()
        path = self.directory / file_id
        with path.open("xb") as out:
            out.write(data)
        return self.add(StoredFile(file_id, name, mime_type, len(data), path, owner))

    @staticmethod
    def read_bytes(stored: StoredFile) -> bytes:
        """The whole file: only for small files (inline attachments of at most 1 MiB)."""
        return stored.path.read_bytes()
