"""A Matrix file's bytes on their way to a vendor: streamed from the homeserver, never more than
allowed, decrypted on the way when the file was sent in an encrypted room."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from bridge.core.degradation import FileRef, Undeliverable
from bridge.core.filetypes import content_type, peek
from bridge.crypto.attachments import AttachmentError, decrypt_stream
from bridge.i18n import _
from bridge.matrix.media import MediaRepository


@contextlib.asynccontextmanager
async def stream(
    media: MediaRepository, mxc: str, ceiling: int, encrypted: dict[str, Any] | None = None
) -> AsyncIterator[AsyncIterator[bytes]]:
    """The file's bytes from the homeserver, refusing to pass more than ``ceiling``;
    decrypted on the way when it was sent in an encrypted room (``encrypted``)."""
    async with media.download(mxc) as chunks:

        async def bounded() -> AsyncIterator[bytes]:
            seen = 0
            async for chunk in chunks:
                seen += len(chunk)
                if seen > ceiling:
                    raise Undeliverable(_("the file is larger than announced and than allowed"))
                yield chunk

        if encrypted is None:
            yield bounded()
            return

        async def decrypted() -> AsyncIterator[bytes]:
            try:
                async for chunk in decrypt_stream(bounded(), encrypted):
                    yield chunk
            except AttachmentError as error:
                raise Undeliverable(
                    _("the encrypted file cannot be read: {error}").format(error=error)
                ) from None

        yield decrypted()


async def real_type(media: MediaRepository, ref: FileRef, ceiling: int) -> str:
    """The file's type as its first bytes (decrypted) show it, before it is sent. Fetching
    them first also makes a file that cannot be fetched fail before the vendor sees
    anything of the message."""
    async with stream(media, ref.mxc, ceiling, ref.encrypted) as chunks:
        head, rest = await peek(chunks)
        for part in (rest, chunks):
            with contextlib.suppress(Exception):
                await part.aclose()  # type: ignore[attr-defined]
    return await content_type(head)
