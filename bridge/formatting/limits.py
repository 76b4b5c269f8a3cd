"""Bounds on the structure a conversion works through, so its time and output grow linearly with
its input whatever the input is.

Deeply nested lists and quotes are what made conversions blow up: every line of an item is
indented (or prefixed with ``> ``) once per level, so 4,000 nested items gave text of millions of
characters. Beyond ``MAX_DEPTH`` open elements, the deeper tags are dropped, their text kept (a
dropped block starts a new line; a dropped list item with a ``- `` mark); a list keeps its first
``MAX_LIST_ITEMS`` items as items, the rest follow as lines of its last item. HTML (or Markdown)
longer than ``MAX_FORMATTED_CHARS`` is shown as plain text.

Everything here reads sanitised HTML, where each ``<...>`` is one tag and tags are well nested.
"""

from __future__ import annotations

import html as html_lib
import re

MAX_FORMATTED_CHARS = 64 * 1024
"""Formatted text longer than this is shown as its plain text, without the formatting."""
MAX_DEPTH = 16
"""Elements nested deeper than this lose their tags (their text stays)."""
MAX_LIST_ITEMS = 500
"""Items of one list past this many become lines of its last item."""

_TAG = re.compile(r"<(/?)([a-zA-Z0-9-]+)([^>]*)>")
_VOID = frozenset({"br", "hr", "img"})
_BLOCK = frozenset(
    {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "ul", "ol", "pre", "table",
     "tr", "caption", "details", "summary", "mx-reply"}
)  # fmt: skip
_START = re.compile(r'\sstart="([0-9]{1,9})"')

MAX_RAW_DEPTH = 256
"""Before sanitising: opening tags past this depth are dropped (the HTML parser's work per tag
grows with the depth; its end tags still close what is open)."""
_RAW_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)[^>]*>")
# Void elements, and elements that close their open sibling when they start (they do not nest
# without a list, table or definition list between them, which counts).
_RAW_FLAT = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
     "track", "wbr", "li", "p", "td", "th", "tr", "dt", "dd", "option"}
)  # fmt: skip


def bound_raw_depth(html: str) -> str:
    """Any HTML, with its opening tags past ``MAX_RAW_DEPTH`` open elements dropped (and their
    end tags): linear, so that no input makes sanitising it quadratic. Counting is
    approximate (unclosed elements count as open): only what is past the bound changes."""
    depth = 0
    dropped: dict[str, int] = {}
    out: list[str] = []
    end = 0
    for match in _RAW_TAG.finditer(html):
        name = match.group(2).lower()
        if name in _RAW_FLAT:
            continue
        if not match.group(1):
            if depth < MAX_RAW_DEPTH:
                depth += 1
                continue
            dropped[name] = dropped.get(name, 0) + 1
        elif dropped.get(name):
            dropped[name] -= 1
        else:
            depth = max(depth - 1, 0)
            continue
        out.append(html[end : match.start()])
        end = match.end()
    if not out:
        return html
    out.append(html[end:])
    return "".join(out)


def _at_line_start(out: list[str]) -> bool:
    """What was written so far ends with a tag or a line break, or is empty."""
    for piece in reversed(out):
        if piece:
            return piece.endswith(">")
    return True


def bound_structure(clean: str) -> str:
    """Sanitised HTML with at most ``MAX_DEPTH`` nested elements and ``MAX_LIST_ITEMS`` items per
    list; what is past the bounds is kept as text (see the module's description)."""
    out: list[str] = []
    stack: list[tuple[str, str]] = []  # per open element: its name, "kept", "dropped", "overflow"
    lists: list[_List] = []  # per open kept list
    end = 0
    for match in _TAG.finditer(clean):
        out.append(clean[end : match.start()])
        end = match.end()
        closing, name = match.group(1), match.group(2).lower()
        if name in _VOID:
            out.append(match.group())
        elif not closing:
            stack.append((name, _open(name, match, len(stack) < MAX_DEPTH, stack, lists, out)))
        elif stack and stack[-1][0] == name:  # sanitised HTML is well nested
            mode = stack.pop()[1]
            if mode == "kept":
                if name in {"ul", "ol"} and lists and lists.pop().overflowing:
                    out.append("</li>")  # the item holding the items past the bound
                out.append(match.group())
    out.append(clean[end:])
    return "".join(out)


class _List:
    __slots__ = ("number", "items", "overflowing")

    def __init__(self, number: int | None) -> None:
        self.number = number  # the next item's number (ol), None (ul)
        self.items = 0
        self.overflowing = False  # the item holding the items past the bound is open

    def mark(self) -> str:
        """The mark of the item that opens (``- `` or ``<n>. ``), counting it."""
        self.items += 1
        if self.number is None:
            return "- "
        self.number += 1
        return f"{self.number - 1}. "


def _open(
    name: str,
    tag: re.Match[str],
    kept: bool,
    stack: list[tuple[str, str]],
    lists: list[_List],
    out: list[str],
) -> str:
    """Writes what an opening tag becomes; returns its mode ("kept", "dropped", "overflow")."""
    in_list = bool(stack) and stack[-1] in {("ul", "kept"), ("ol", "kept")} and bool(lists)
    mark = lists[-1].mark() if name == "li" and in_list else "- "
    if not kept:
        if name == "li":
            out.append("<br>" + html_lib.escape(mark, quote=False))
        elif name in _BLOCK and name not in {"ul", "ol"} and not _at_line_start(out):
            out.append("<br>")
        return "dropped"
    if name == "li" and in_list and lists[-1].items > MAX_LIST_ITEMS:
        current = lists[-1]
        if current.overflowing:  # a line of the item holding the rest
            out.append("<br>" + html_lib.escape(mark, quote=False))
        else:  # the first item past the bound opens the one that holds the rest
            current.overflowing = True
            out.append(tag.group())
        return "overflow"
    if name in {"ul", "ol"}:
        start = _START.search(tag.group(3))
        lists.append(_List((int(start.group(1)) if start else 1) if name == "ol" else None))
    out.append(tag.group())
    return "kept"
