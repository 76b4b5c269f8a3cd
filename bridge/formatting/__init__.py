"""The bridge's text formatting: sanitising Matrix HTML, converting between Markdown, HTML and
plain text, mention pills, and splitting long text. ``render`` picks the right path."""

from __future__ import annotations

from typing import Literal

from bridge.formatting.convert import html_to_markdown, html_to_plain, plain_to_html
from bridge.formatting.sanitize import (
    sanitize_html,
    strip_plain_reply_fallback,
    strip_reply_fallback,
)

Target = Literal["plain", "markdown", "html"]


def render(content_html: str | None, body: str, target: Target, *, reply: bool = False) -> str:
    """A Matrix message (its ``formatted_body`` if any, else its plain ``body``) as ``target``
    text. HTML is sanitised first; for a ``reply``, the reply fallback is dropped.

    Plain text going to Markdown is escaped (it shows as it was written).
    """
    if content_html is not None:
        html = strip_reply_fallback(content_html) if reply else sanitize_html(content_html)
        if target == "html":
            return html
        return html_to_markdown(html) if target == "markdown" else html_to_plain(html)
    text = strip_plain_reply_fallback(body) if reply else body
    if target == "plain":
        return text
    html = plain_to_html(text)
    return html if target == "html" else html_to_markdown(html)
