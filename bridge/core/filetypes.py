"""What a file really is: its type read from its first bytes, not taken from the sender's word.

A sender declares a MIME type; the content may say otherwise (a script declared ``image/png``).
The type is read with libmagic (the ``file`` command's library, through python-magic) from the
first ``SNIFF_BYTES`` of the file. A declared type the content confirms is kept; one it
contradicts is replaced by the real type when that one is allowed, and the file refused
otherwise (``judge``). Both directions use it: Matrix -> vendor (``delivery``) and vendor ->
Matrix (``to_matrix``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import magic

from bridge.i18n import _

SNIFF_BYTES = 64 * 1024
"""How much of a file is read to tell its type (enough for office documents' zip entries)."""

UNKNOWN = "application/octet-stream"

_lock = threading.Lock()
_magic: magic.Magic | None = None

# Types libmagic names differently from what senders declare for the same content.
_SAME = [
    {"application/zip", "application/x-zip-compressed"},
    {
        "application/msword",
        "application/x-ole-storage",
        "application/cdfv2",
        "application/vnd.ms-office",
        "application/vnd.ms-excel",
        "application/vnd.ms-powerpoint",
    },
    {"image/jpeg", "image/jpg", "image/pjpeg"},
    {"audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"},
    {"audio/mpeg", "audio/mp3", "audio/x-mp3"},
    {"application/dicom", "application/dicom+json"},
    {"image/bmp", "image/x-ms-bmp"},
]
_ZIP_CONTAINERS = (
    "application/vnd.openxmlformats-officedocument.",
    "application/vnd.oasis.opendocument.",
    "application/epub+zip",
)
_ACTIVE = {
    "image/svg+xml",
    "text/html",
    "application/xhtml+xml",
    "text/javascript",
    "application/javascript",
    "application/x-httpd-php",
}
"""Types a reader may run (scripts, markup): a file is never re-announced as one of them."""
_INERT_TEXT = {"text/plain", "text/csv"}
"""Declared types no reader interprets: any text content is shown as text under them."""


@dataclass(frozen=True)
class Verdict:
    mime_type: str
    """The type to announce (the declared one, or the real one when it was corrected)."""
    real: str
    """The type the content shows."""
    corrected: bool = False
    refused: bool = False


def sniff(head: bytes) -> str:
    """The MIME type of a file whose first bytes are ``head`` (``UNKNOWN`` when unrecognised)."""
    global _magic
    with _lock:  # a libmagic handle is not safe to share between threads
        if _magic is None:
            _magic = magic.Magic(mime=True)
        found = _magic.from_buffer(head[:SNIFF_BYTES])
    return _normalise(found) or UNKNOWN


async def content_type(head: bytes) -> str:
    """``sniff`` in a worker thread: libmagic reads text for tens of milliseconds, which the
    event loop must not wait for."""
    return await asyncio.to_thread(sniff, head)


def compatible(declared: str, real: str) -> bool:
    """Whether content of type ``real`` may travel under the ``declared`` type."""
    declared, real = _normalise(declared), _normalise(real)
    if declared == real or real == "application/x-empty":
        return True
    if declared in _INERT_TEXT and (real.startswith("text/") or real == "application/json"):
        return True
    if real == "application/zip" and declared.startswith(_ZIP_CONTAINERS):
        return True  # a document libmagic saw only as its zip container
    if real == "application/ogg" and declared.split("/")[0] in ("audio", "video"):
        return True
    if {declared.split("/")[0], real.split("/")[0]} <= {"audio", "video"} and (
        declared.split("/")[1].removeprefix("x-") == real.split("/")[1].removeprefix("x-")
        or {declared, real} <= {"video/mp4", "audio/mp4", "audio/x-m4a", "video/quicktime"}
    ):
        return True  # one container, audio or video
    return any(declared in group and real in group for group in _SAME)


def active(mime: str) -> bool:
    """Whether content of this type can run code where it is opened (a script, HTML, SVG)."""
    mime = _normalise(mime)
    return mime in _ACTIVE or mime.startswith("text/x-")


def judge(declared: str, real: str, allowed: Callable[[str], bool]) -> Verdict:
    """Keep ``declared`` when the content's type (``real``) confirms it; else announce the real
    type when ``allowed`` accepts it and it is not ``active``; else refuse."""
    if compatible(declared, real):
        return Verdict(declared, real)
    if not active(real) and allowed(real):
        return Verdict(real, real, corrected=True)
    return Verdict(declared, real, refused=True)


def refusal(declared: str, real: str, allowed: Callable[[str], bool], who: str) -> str:
    """Why a file whose content (``real``) contradicts its ``declared`` type is refused, for
    its sender (in the bridge's locale); ``who``: the receiving side, when its own rules
    refused it."""
    if real == UNKNOWN:
        return _("the file's content does not match its announced type ({declared})").format(
            declared=declared
        )
    if active(real):
        why = _("active content (a script, a web page, an SVG) is not passed on")
    elif not allowed(real):
        why = _("this type of file is not allowed in this space")
    else:
        why = _("{who} does not accept this type of file").format(who=who)
    return _("the file's content is of type {real}, not {declared} as announced: {why}").format(
        real=real, declared=declared, why=why
    )


async def peek(
    chunks: AsyncIterator[bytes], size: int = SNIFF_BYTES
) -> tuple[bytes, AsyncIterator[bytes]]:
    """The first ``size`` bytes (or fewer, for a shorter file) of ``chunks``, and every chunk
    from the start again (what was read first, then the rest)."""
    head: list[bytes] = []
    read = 0
    iterator = aiter(chunks)
    while read < size:
        try:
            chunk = await anext(iterator)
        except StopAsyncIteration:
            break
        head.append(chunk)
        read += len(chunk)

    async def replay() -> AsyncIterator[bytes]:
        for chunk in head:
            yield chunk
        async for chunk in iterator:
            yield chunk

    return b"".join(head)[:size], replay()


def _normalise(mime: str) -> str:
    return mime.split(";", 1)[0].strip().lower()
