"""Matrix HTML reduced to the spec's safe subset, and Matrix reply fallbacks removed."""

from __future__ import annotations

import re

import nh3

from bridge.formatting._text import scrub
from bridge.formatting.limits import bound_raw_depth

# The HTML subset the Matrix client-server spec recommends (m.room.message, "HTML").
TAGS = frozenset(
    {
        "font", "del", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "p", "a", "ul", "ol",
        "sup", "sub", "li", "b", "i", "u", "strong", "em", "s", "strike", "code", "hr", "br",
        "div", "table", "thead", "tbody", "tr", "th", "td", "caption", "pre", "span", "details",
        "summary", "img", "mx-reply",
    }
)  # fmt: skip
ATTRIBUTES: dict[str, set[str]] = {
    "*": set(),  # none on every tag (nh3 would allow lang and title)
    "a": {"href"},
    "img": {"src", "alt", "title", "width", "height"},
    "code": {"class"},
    "ol": {"start"},
    "span": {"data-mx-spoiler", "data-mx-color", "data-mx-bg-color"},
    "font": {"data-mx-color", "data-mx-bg-color", "color"},
}
LINK_SCHEMES = frozenset({"https", "http", "ftp", "mailto", "magnet"})
# Removed together with everything inside them (other unknown tags keep their text).
_DROPPED_WITH_CONTENT = {
    "script", "style", "iframe", "frame", "frameset", "object", "embed", "applet", "svg", "math",
    "noscript", "noembed", "noframes", "template", "textarea", "select", "title", "xmp",
}  # fmt: skip

_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
_NUMBER = re.compile(r"[0-9]{1,9}")
_LANGUAGE = re.compile(r"language-[A-Za-z0-9_+#.-]+")
# In nh3's output ``<`` and ``>`` are always escaped inside text and attribute values, and ``"``
# inside attribute values: a literal ``<img ...>`` is a tag, and `` src="`` in it its src.
_IMG = re.compile(r"<img\b[^>]*>")


def _filter_attribute(tag: str, attribute: str, value: str) -> str | None:
    if attribute == "href":
        scheme = value.split(":", 1)[0].lower()
        return value if ":" in value and scheme in LINK_SCHEMES else None
    if attribute == "src":
        return value if value.startswith("mxc://") else None
    if attribute in {"data-mx-color", "data-mx-bg-color", "color"}:
        return value if _COLOUR.fullmatch(value) else None
    if attribute in {"start", "width", "height"}:
        return value if _NUMBER.fullmatch(value) else None
    if attribute == "class":
        return " ".join(c for c in value.split() if _LANGUAGE.fullmatch(c)) or None
    return value


def _cleaner(drop_replies: bool) -> nh3.Cleaner:
    return nh3.Cleaner(
        tags=set(TAGS - {"mx-reply"}) if drop_replies else set(TAGS),
        clean_content_tags=_DROPPED_WITH_CONTENT | ({"mx-reply"} if drop_replies else set()),
        attributes=ATTRIBUTES,
        attribute_filter=_filter_attribute,
        url_schemes=set(LINK_SCHEMES | {"mxc"}),
        url_relative="deny",
        link_rel=None,
        strip_comments=True,
    )


_KEEP_REPLIES = _cleaner(drop_replies=False)
_DROP_REPLIES = _cleaner(drop_replies=True)


def _clean(cleaner: nh3.Cleaner, html: str) -> str:
    html = cleaner.clean(scrub(bound_raw_depth(html)))
    # An image whose src was not mxc:// lost its src above: the whole image goes.
    return _IMG.sub(lambda m: m.group() if ' src="' in m.group() else "", html)


def sanitize_html(html: str) -> str:
    """``html`` reduced to the Matrix spec's safe subset (links to http(s)/ftp/mailto/magnet,
    images only from ``mxc://``, no scripts, styles, event handlers or foreign content)."""
    return _clean(_KEEP_REPLIES, html)


def strip_reply_fallback(html: str) -> str:
    """Sanitised ``html`` without its ``<mx-reply>`` reply fallback (the quoted original)."""
    return _clean(_DROP_REPLIES, html)


def strip_plain_reply_fallback(body: str) -> str:
    """A plain ``body`` without its reply fallback: the ``> `` lines it starts with, when an empty
    line follows them. Apply it to replies only: elsewhere these lines are the sender's quote."""
    lines = body.split("\n")
    quoted = 0
    while quoted < len(lines) and (lines[quoted].startswith("> ") or lines[quoted] == ">"):
        quoted += 1
    if quoted == 0 or quoted >= len(lines) or lines[quoted].strip():
        return body
    return "\n".join(lines[quoted + 1 :])
