"""Matrix content made fit for one vendor: its formatting, its limits, its capabilities.

Everything a vendor cannot show is degraded here, and each degradation is written down as a
sentence for the sender (the message send status, or the vendor's delivery report). What a
vendor cannot *do* (an edit, a deletion, a reaction) is sent as a stand-in message instead
(``executors/stand_in.py``).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from bridge.core import filetypes
from bridge.formatting import worker
from bridge.formatting.convert import html_to_markdown, html_to_plain
from bridge.formatting.mentions import pills_to_mentions
from bridge.formatting.sanitize import (
    sanitize_html,
    strip_plain_reply_fallback,
    strip_reply_fallback,
)
from bridge.formatting.split import split_text
from bridge.i18n import _, ngettext
from connectors.base import FILE_MSGTYPES, Capabilities, FileLimit, Location, MessageKind
from connectors.kit.markdown import escape_markdown

TEXT_MSGTYPES = {"m.text": "text", "m.notice": "notice", "m.emote": "emote"}
_GEO = re.compile(r"^geo:(-?\d+(?:\.\d+)?),(-?\d+(?:\.\d+)?)")
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]+")


class Undeliverable(Exception):
    """This content cannot reach this vendor at all; the message says why, for the sender."""


@dataclass
class RenderedText:
    parts: list[str]
    html: str | None
    mention_mxids: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FileRef:
    mxc: str
    name: str
    mime_type: str
    size: int
    msgtype: str
    encrypted: dict[str, Any] | None = None
    """The EncryptedFile (key, iv, hash) of a file sent in an encrypted room."""


def render_text(
    content: dict[str, Any], caps: Capabilities, sender_name: str, vendor: str
) -> RenderedText:
    """The text of a Matrix message in the vendor's formatting, split to its length limit.

    Plain text going to a Markdown vendor is escaped: it shows as it was written, with no link,
    image or HTML its sender did not format. Formatted text keeps what the sanitiser allows."""
    body = content.get("body") if isinstance(content.get("body"), str) else ""
    html = (
        content.get("formatted_body") if content.get("format") == "org.matrix.custom.html" else None
    )
    if not isinstance(html, str):
        html = None
    is_reply = bool(_obj(_obj(content.get("m.relates_to")).get("m.in_reply_to")).get("event_id"))
    notes: list[str] = []
    mention_mxids: list[str] = []
    if html is not None:
        html = sanitize_html(strip_reply_fallback(html) if is_reply else html)
        named, mention_mxids = pills_to_mentions(html)
        if caps.formatting == "markdown":
            text = html_to_markdown(named)
        else:
            text = html_to_plain(named)
            if _has_formatting(named):
                notes.append(
                    _("formatting removed: {vendor} shows plain text only").format(vendor=vendor)
                )
    else:
        text = strip_plain_reply_fallback(body) if is_reply else body
        if caps.formatting == "markdown":
            text = escape_markdown(text)
        mentions = content.get("m.mentions")
        if isinstance(mentions, dict) and isinstance(mentions.get("user_ids"), list):
            mention_mxids = [m for m in mentions["user_ids"] if isinstance(m, str)]
    if not text.strip():
        raise Undeliverable(_("the message is empty"))
    kind = message_kind(content)
    if kind not in caps.message_kinds:
        if kind == "emote":
            name = escape_markdown(sender_name) if caps.formatting == "markdown" else sender_name
            text = f"* {name} {text}"
        elif kind == "notice":
            notes.append(
                _("{vendor} has no notices: sent as an ordinary message").format(vendor=vendor)
            )
    parts = [text]
    limit = caps.max_text_length
    if limit is not None and len(text) > limit:
        if caps.long_text == "refuse":
            raise Undeliverable(
                _(
                    "the message is {length} characters long; {vendor} accepts {limit} at most"
                ).format(length=len(text), vendor=vendor, limit=limit)
            )
        parts = split_text(text, limit)
        notes.append(
            ngettext(
                "split into {n} message ({vendor} accepts {limit} characters)",
                "split into {n} messages ({vendor} accepts {limit} characters)",
                len(parts),
            ).format(n=len(parts), vendor=vendor, limit=limit)
        )
    return RenderedText(parts or [""], html, mention_mxids, notes)


async def render_text_bounded(
    content: dict[str, Any], caps: Capabilities, sender_name: str, vendor: str
) -> RenderedText:
    """``render_text``, off the event loop for large content (``bridge.formatting.worker``: a
    worker process with time and memory limits). When the worker fails, the message goes as its
    plain ``body`` (escaped like any plain text), and its sender is told."""

    def plain() -> RenderedText:
        without = {k: v for k, v in content.items() if k not in {"format", "formatted_body"}}
        rendered = render_text(without, caps, sender_name, vendor)
        rendered.notes.append(_("formatting removed: the message was too complex to convert"))
        return rendered

    size = sum(len(v) for k, v in content.items() if k in _TEXTS and isinstance(v, str))
    return await worker.bounded(
        render_text, content, caps, sender_name, vendor, size=size, fallback=plain
    )


_TEXTS = ("body", "formatted_body")


def message_kind(content: dict[str, Any]) -> MessageKind:
    kind = TEXT_MSGTYPES.get(str(content.get("msgtype")), "text")
    return kind  # type: ignore[return-value]


def _has_formatting(html: str) -> bool:
    return bool(re.search(r"<(?!br\b|/?p\b)[a-z]", html, re.IGNORECASE))


# --- Files ----------------------------------------------------------------------------------------


def file_ref(content: dict[str, Any]) -> FileRef | None:
    """The file of an m.image/m.file/m.audio/m.video message, or None when it has none."""
    msgtype = content.get("msgtype")
    url = content.get("url")
    encrypted = content.get("file") if isinstance(content.get("file"), dict) else None
    if encrypted is not None and url is None:
        url = encrypted.get("url")  # an encrypted room's file: the key travels beside it
    if msgtype not in FILE_MSGTYPES or not isinstance(url, str):
        return None
    info = _obj(content.get("info"))
    name = content.get("filename") or content.get("body") or "file"
    size = info.get("size")
    return FileRef(
        mxc=url,
        name=safe_filename(str(name)),
        mime_type=str(info.get("mimetype") or "application/octet-stream").lower(),
        size=size if isinstance(size, int) and size >= 0 else -1,
        msgtype=str(msgtype),
        encrypted=encrypted,
    )


def file_limit(caps: Capabilities, msgtype: str) -> FileLimit | None:
    """The vendor's rule for this kind of file, falling back to its generic file rule."""
    return caps.files.get(msgtype) or caps.files.get("m.file")


def check_file(ref: FileRef, caps: Capabilities, vendor: str, max_size: int, allowed: Any) -> int:
    """The largest size to accept while streaming; raises Undeliverable with the reason."""
    if not allowed(ref.mime_type):
        raise Undeliverable(
            _("files of type {type} are not allowed in this space").format(type=ref.mime_type)
        )
    limit = file_limit(caps, ref.msgtype)
    if limit is None:
        raise Undeliverable(_("{vendor} does not accept files").format(vendor=vendor))
    if not limit.allows(ref.mime_type):
        raise Undeliverable(
            _("{vendor} does not accept files of type {type}").format(
                vendor=vendor, type=ref.mime_type
            )
        )
    ceiling = min(limit.max_size, max_size)
    if ref.size > ceiling:
        if limit.max_size <= max_size:
            refusal = _("the file is {size}; {vendor} accepts {limit} at most")
        else:
            refusal = _("the file is {size}; this space accepts {limit} at most")
        raise Undeliverable(refusal.format(size=_mib(ref.size), vendor=vendor, limit=_mib(ceiling)))
    return ceiling


def check_content(
    ref: FileRef, real: str, caps: Capabilities, vendor: str, allowed: Any
) -> tuple[FileRef, str | None]:
    """``ref`` with the type its content shows (``real``, see ``filetypes.content_type``), and
    the note for the sender when the declared type was corrected; raises Undeliverable (its
    reason from the catalogs) when the real type may not go to ``vendor``."""
    limit = file_limit(caps, ref.msgtype)

    def accepted(mime: str) -> bool:
        return bool(allowed(mime)) and limit is not None and limit.allows(mime)

    verdict = filetypes.judge(ref.mime_type, real, accepted)
    if verdict.refused:
        raise Undeliverable(filetypes.refusal(ref.mime_type, verdict.real, allowed, vendor))
    if verdict.corrected:
        note = _("file type corrected from its content: {type} (announced: {announced})").format(
            type=verdict.mime_type, announced=ref.mime_type
        )
        return dataclasses.replace(ref, mime_type=verdict.mime_type), note
    return ref, None


def safe_filename(name: str) -> str:
    """A file name with no path, no control characters, at most 200 characters."""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_NAME.sub("_", name).strip(" .")
    if len(name) > 200:
        stem, dot, ext = name.rpartition(".")
        name = (stem[:190] + dot + ext[:9]) if dot and len(ext) < 10 else name[:200]
    return name or "file"


def _mib(size: int) -> str:
    return _("{size} MiB").format(size=f"{size / (1024 * 1024):.1f}")


# --- Locations ------------------------------------------------------------------------------------


def location(content: dict[str, Any]) -> Location | None:
    geo = content.get("geo_uri")
    if content.get("msgtype") != "m.location" or not isinstance(geo, str):
        return None
    match = _GEO.match(geo)
    if match is None:
        return None
    lat, lon = float(match.group(1)), float(match.group(2))
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    body = content.get("body")
    return Location(lat, lon, body if isinstance(body, str) and body else None)


def location_as_text(place: Location) -> str:
    label = f"{place.description} " if place.description else ""
    url = (
        f"https://www.openstreetmap.org/?mlat={place.latitude}&mlon={place.longitude}"
        f"#map=17/{place.latitude}/{place.longitude}"
    )
    return f"📍 {label}(geo:{place.latitude},{place.longitude}) {quote(url, safe=':/?&=#')}"


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
