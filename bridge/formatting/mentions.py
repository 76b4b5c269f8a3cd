"""Matrix mention pills (``<a href="https://matrix.to/#/@user:server">Name</a>``) to and from the
bridge's text form of a mention, ``@Name`` (see ``connectors.base``)."""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Iterator, Sequence
from urllib.parse import quote, unquote

from bridge.formatting.sanitize import sanitize_html

_MATRIX_TO = "https://matrix.to/#/"
_USER_ID = re.compile(r"@[^:\s]+:\S+")
# Sanitised HTML escapes "<" and ">" in text and attribute values: each <...> is one tag.
_TAG = re.compile(r"<(/?)([a-zA-Z0-9-]+)([^>]*)>")
_HREF = re.compile(r'\shref="([^"]*)"')
_VOID = frozenset({"br", "hr", "img"})
_NO_PILLS_IN = frozenset({"a", "code", "pre"})


def mention_text(display_name: str) -> str:
    """How a mention of ``display_name`` is written in text."""
    return f"@{display_name}"


def pill(mxid: str, display_name: str) -> str:
    """The HTML pill mentioning ``mxid``, showing ``display_name``."""
    href = html_lib.escape(_MATRIX_TO + quote(mxid, safe="@:"))
    return f'<a href="{href}">{html_lib.escape(display_name, quote=False)}</a>'


def _pill_mxid(attributes: str) -> str | None:
    """The user a link mentions: ``https://matrix.to/#/<user id, maybe %-encoded>[/...][?via=]``."""
    match = _HREF.search(attributes)
    href = html_lib.unescape(match.group(1)) if match else ""
    if not href.startswith(_MATRIX_TO):
        return None
    identifier = unquote(href[len(_MATRIX_TO) :].split("?", 1)[0].split("/", 1)[0])
    return identifier if _USER_ID.fullmatch(identifier) else None


def _tokens(clean: str) -> Iterator[tuple[str, re.Match[str] | None]]:
    """Sanitised HTML as (tag, its match) and (text, None) pieces."""
    end = 0
    for match in _TAG.finditer(clean):
        if match.start() > end:
            yield clean[end : match.start()], None
        yield match.group(), match
        end = match.end()
    if end < len(clean):
        yield clean[end:], None


def mxids_in(html: str) -> list[str]:
    """The Matrix users the pills of ``html`` mention, in order, each once."""
    mxids = (_pill_mxid(tag.group(3)) for _, tag in _tokens(sanitize_html(html)) if tag)
    return list(dict.fromkeys(m for m in mxids if m))


def pills_to_mentions(html: str) -> tuple[str, list[str]]:
    """Sanitised ``html`` with each user pill turned into the text ``@Name`` (its link text), and
    the mentioned Matrix users in order, each once."""
    out: list[str] = []
    mxids: list[str] = []
    pill_mxid: str | None = None  # inside a pill: its user
    name: list[str] = []
    for piece, tag in _tokens(sanitize_html(html)):
        if pill_mxid is None:
            if tag and not tag.group(1) and tag.group(2) == "a":
                pill_mxid = _pill_mxid(tag.group(3))
                if pill_mxid is not None:
                    name = []
                    continue
            out.append(piece)
        elif tag is None:
            name.append(piece)
        elif tag.group(1) and tag.group(2) == "a":  # links do not nest in sanitised HTML
            text = html_lib.unescape("".join(name))
            shown = text if text.startswith("@") else mention_text(text) if text else pill_mxid
            out.append(html_lib.escape(shown, quote=False))
            mxids.append(pill_mxid)
            pill_mxid = None
    return sanitize_html("".join(out)), list(dict.fromkeys(mxids))


def mentions_to_pills(html: str, mentions: Sequence[tuple[str, str]]) -> str:
    """Sanitised ``html`` with each ``@Name`` of ``mentions`` (``(display name, mxid)`` pairs)
    turned into a pill, in text only: not inside links or code."""
    clean = sanitize_html(html)
    mxids = {name: mxid for name, mxid in mentions if name}
    if not mxids:
        return clean
    # Longest names first, so "@Jean Dupont" is not taken for "@Jean"; a name ending in a letter
    # or digit does not match the start of a longer word ("@Jean" in "@Jeanne").
    names = sorted(mxids, key=len, reverse=True)
    pattern = re.compile(
        r"(?<!\w)@("
        + "|".join(re.escape(n) + (r"(?!\w)" if re.match(r"\w", n[-1]) else "") for n in names)
        + ")"
    )
    out: list[str] = []
    open_tags: list[str] = []  # sanitised HTML is well formed: a closing tag closes the last one
    blocked = 0  # how many of them are links or code
    for piece, tag in _tokens(clean):
        if tag is not None:
            name = tag.group(2).lower()
            if tag.group(1) and open_tags and open_tags[-1] == name:
                blocked -= open_tags.pop() in _NO_PILLS_IN
            elif not tag.group(1) and name not in _VOID:
                open_tags.append(name)
                blocked += name in _NO_PILLS_IN
            out.append(piece)
            continue
        text = html_lib.unescape(piece)
        if blocked or pattern.search(text) is None:
            out.append(piece)
            continue
        end = 0
        for match in pattern.finditer(text):
            out.append(html_lib.escape(text[end : match.start()], quote=False))
            out.append(pill(mxids[match.group(1)], match.group(1)))
            end = match.end()
        out.append(html_lib.escape(text[end:], quote=False))
    return sanitize_html("".join(out))
