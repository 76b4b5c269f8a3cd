"""Conversions between the bridge's text formats: Markdown, HTML (Matrix) and plain text.

Every function is total: any ``str`` gives a result (lone surrogates become U+FFFD). HTML input is
sanitised first and HTML output is sanitised. The Markdown dialect is chat Markdown: CommonMark
plus tables and ``~~strikethrough~~``, where a single newline is a line break.
"""

from __future__ import annotations

import html as html_lib
import re

from bs4 import BeautifulSoup
from bs4.element import NavigableString, PageElement, PreformattedString, Tag
from markdown_it import MarkdownIt
from markdownify import MarkdownConverter

from bridge.formatting._text import scrub
from bridge.formatting.limits import MAX_FORMATTED_CHARS, bound_structure
from bridge.formatting.sanitize import sanitize_html
from connectors.kit.markdown import escape_markdown

_MARKDOWN = MarkdownIt("commonmark", {"html": False, "linkify": False, "breaks": True}).enable(
    ["table", "strikethrough"]
)


def markdown_to_html(md: str) -> str:
    """Chat Markdown as sanitised Matrix HTML; raw HTML in the Markdown is shown, not obeyed.
    Markdown longer than ``MAX_FORMATTED_CHARS`` is shown as plain text."""
    if len(md) > MAX_FORMATTED_CHARS:  # one paragraph of its plain text
        return sanitize_html(f"<p>{plain_to_html(md)}</p>")
    try:
        rendered = _MARKDOWN.render(scrub(md))
    except RecursionError:  # pathological nesting: show the text as it is
        return plain_to_html(md)
    return sanitize_html(rendered).strip()


def plain_to_html(text: str) -> str:
    """Plain text as Matrix HTML: escaped, each line break a ``<br>``."""
    lines = re.split(r"\r\n|\r|\n", html_lib.escape(scrub(text), quote=False))
    return sanitize_html("<br>".join(lines))


def markdown_to_plain(md: str) -> str:
    """Chat Markdown as readable plain text (the formatting marks removed)."""
    return html_to_plain(markdown_to_html(md))


# --- HTML to Markdown -----------------------------------------------------------------------------


class _Markdown(MarkdownConverter):
    """markdownify, made to write chat Markdown: text is escaped so that it shows as written (no
    link, image or HTML the sender did not format), and list items are numbered in linear time."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._numbers: dict[int, dict[int, int]] = {}  # per <ol>: its <li> children's positions

    def escape(self, text: str, parent_tags: set[str]) -> str:
        # A text node: markdownify lays out its whitespace itself.
        return escape_markdown(text, indentation=False) if text else ""

    def convert_br(self, el: Tag, text: str, parent_tags: set[str]) -> str:
        return "\n" if "_inline" not in parent_tags else " "

    def convert_li(self, el: Tag, text: str, parent_tags: set[str]) -> str:
        # markdownify numbers an <ol> item by counting its previous siblings: quadratic in the
        # list's length (4,000 items took seconds). Each list's items are counted once here.
        parent = el.parent
        if parent is None or parent.name != "ol":
            return str(super().convert_li(el, text, parent_tags))
        positions = self._numbers.get(id(parent))
        if positions is None:
            items = (c for c in parent.children if isinstance(c, Tag) and c.name == "li")
            positions = self._numbers[id(parent)] = {id(li): i for i, li in enumerate(items)}
        start = parent.get("start")
        first = int(start) if isinstance(start, str) and start.isdigit() else 1
        text = (text or "").strip()
        if not text:
            return "\n"
        bullet = f"{first + positions.get(id(el), 0)}. "
        indent = " " * len(bullet)
        text = re.sub(r"^(.*)$", lambda m: indent + m.group(1) if m.group(1) else "", text,
                      flags=re.MULTILINE)  # fmt: skip
        return f"{bullet}{text[len(bullet) :]}\n"


# In sanitised HTML an image is one <img ...> tag, its alt and title values HTML-escaped.
_IMG = re.compile(r"<img\b[^>]*>")
_ALT = re.compile(r'\salt="([^"]*[^"\s][^"]*)"')
_TITLE = re.compile(r'\stitle="([^"]*[^"\s][^"]*)"')


def _images_as_text(clean: str) -> str:
    """An mxc:// image means nothing outside Matrix: its description stands in for it."""

    def text(img: re.Match[str]) -> str:
        description = _ALT.search(img.group()) or _TITLE.search(img.group())
        return description.group(1).strip() if description else "[image]"

    return _IMG.sub(text, clean)


def _code_language(el: Tag) -> str | None:
    code = el.find("code")
    classes = code.get("class") if isinstance(code, Tag) else None
    for name in classes or ():
        if name.startswith("language-"):
            return name.removeprefix("language-")
    return None


_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)


def html_to_markdown(html: str) -> str:
    """Matrix HTML as chat Markdown (images by their description, ``<br>`` as a newline); text
    is escaped, so only the formatting of the HTML is Markdown. Nesting and lists are bounded
    (``bridge.formatting.limits``); HTML longer than ``MAX_FORMATTED_CHARS`` is shown as plain
    text."""
    clean = sanitize_html(html)
    if len(clean) > MAX_FORMATTED_CHARS:
        return escape_markdown(html_to_plain(clean))
    clean = _images_as_text(bound_structure(clean))
    try:
        md = _Markdown(
            heading_style="ATX",
            bullets="-",
            code_language_callback=_code_language,
            escape_misc=False,
        ).convert(clean)
    except RecursionError:  # pathological nesting: the text alone
        return escape_markdown(html_to_plain(clean))
    return _TRAILING_SPACE.sub("", md).strip("\n")


# --- HTML to plain text ---------------------------------------------------------------------------

_BLOCKS = frozenset(
    {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "ul", "ol", "pre", "table",
     "caption", "hr", "details", "summary", "mx-reply"}
)  # fmt: skip
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")


def _image_text(el: Tag) -> str:
    for attribute in ("alt", "title"):
        value = el.get(attribute)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return "[image]"


def _link_suffix(el: Tag) -> str:
    href = el.get("href")
    if not isinstance(href, str) or not href:
        return ""
    text = _HTML_SPACE.sub(" ", el.get_text()).strip()
    bare = re.sub(r"^(?:https?://|mailto:)", "", href).rstrip("/")
    return "" if text in {href, bare} else f" ({href})"


class _PlainWriter:
    """Lines of plain text, with the prefixes (quote marks, list markers) of their blocks."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.line: str | None = None  # the line being written, None between lines
        self.content = False  # the line being written has more than its prefix
        self.blank: str | None = None  # an empty line due before the next one (its prefix)
        self.prefixes: list[list[str]] = []  # [prefix of the next line, of the ones after]

    def _start(self) -> None:
        if self.blank is not None and self.lines and self.lines[-1].strip(" >"):
            self.lines.append(self.blank)
        self.blank = None
        self.line, self.content = self._prefix(advance=True), False

    def _prefix(self, advance: bool) -> str:
        prefix = "".join(p[0] for p in self.prefixes)
        if advance:
            for p in self.prefixes:
                p[0] = p[1]
        return prefix

    def text(self, text: str, pre: bool = False) -> None:
        if pre:
            for i, line in enumerate(text.split("\n")):
                if i:
                    self.newline()
                if self.line is None:
                    self._start()
                self.line = (self.line or "") + line
                self.content = self.content or bool(line)
            return
        text = _HTML_SPACE.sub(" ", text)
        if not self.content or self.line is not None and self.line.endswith(" "):
            text = text.lstrip(" ")
        if not text:
            return
        if self.line is None:
            self._start()
        self.line = (self.line or "") + text
        self.content = True

    def newline(self) -> None:
        if self.line is None:
            self._start()
        self.lines.append((self.line or "").rstrip(" \t"))
        self.line, self.content = None, False

    def end_line(self) -> None:
        if self.line is not None:
            self.newline()

    def block(self) -> None:
        """Ends the line; the next one comes after an empty line (in the outermost block)."""
        self.end_line()
        blank = "".join(p[1] for p in self.prefixes).rstrip()
        if self.blank is None or len(blank) < len(self.blank):
            self.blank = blank

    def result(self) -> str:
        self.end_line()
        return "\n".join(self.lines).strip("\n")


class _ToPlain:
    """The walk of sanitised HTML into a ``_PlainWriter``: what each tag does entering, leaving."""

    def __init__(self) -> None:
        self.out = _PlainWriter()
        self.lists: list[int | None] = []  # per open list: the next number (ol) or None (ul)
        self.items = 0  # open list items
        self.cells: list[int] = []  # per open table row: cells so far
        self.pre = 0

    def block(self, name: str) -> None:
        """A block starts or ends: an empty line around it, a line break for a nested list."""
        if name in {"ul", "ol"} and self.items:
            self.out.end_line()
        else:
            self.out.block()

    def enter(self, node: Tag) -> None:
        name, out = node.name, self.out
        if name in _BLOCKS:
            self.block(name)
        if name == "ol":
            start = node.get("start")
            self.lists.append(int(start) if isinstance(start, str) and start.isdigit() else 1)
        elif name == "ul":
            self.lists.append(None)
        elif name == "li":
            out.end_line()
            number = self.lists[-1] if self.lists else None
            marker = "- " if number is None else f"{number}. "
            if number is not None:
                self.lists[-1] = number + 1
            out.prefixes.append([marker, " " * len(marker)])
            self.items += 1
        elif name == "blockquote":
            out.prefixes.append(["> ", "> "])
        elif name == "tr":
            out.end_line()
            self.cells.append(0)
        elif name in {"td", "th"} and self.cells:
            if self.cells[-1]:
                out.text(" | ")
            self.cells[-1] += 1
        elif name in {"del", "s", "strike"}:
            out.text("~~")
        elif name == "pre":
            self.pre += 1
        elif name == "br":
            out.newline()
        elif name == "hr":
            out.text("---")
        elif name == "img":
            out.text(_image_text(node))

    def exit(self, node: Tag) -> None:
        name, out = node.name, self.out
        if name in {"ul", "ol"} and self.lists:
            self.lists.pop()
        elif name in {"blockquote", "li"}:
            out.end_line()
            out.prefixes.pop()
            self.items -= name == "li"
        elif name == "tr":
            out.end_line()
            if self.cells:
                self.cells.pop()
        elif name in {"del", "s", "strike"}:
            out.text("~~")
        elif name == "a":
            out.text(_link_suffix(node))
        elif name == "pre":
            self.pre -= 1
        if name in _BLOCKS:
            self.block(name)


def html_to_plain(html: str) -> str:
    """Matrix HTML as readable plain text: blocks on their own lines, ``- ``/``1. `` list items,
    ``> `` quotes, links as ``text (url)``, images as their description, ``~~struck~~`` text.
    Nesting and lists are bounded (``bridge.formatting.limits``): linear in the HTML's length."""
    walk = _ToPlain()
    # Iterative, so deep nesting meets no recursion limit: (entering?, node) events.
    stack: list[tuple[bool, PageElement]] = [
        (True, BeautifulSoup(bound_structure(sanitize_html(html)), "html.parser"))
    ]
    while stack:
        entering, node = stack.pop()
        if isinstance(node, NavigableString):
            if not isinstance(node, PreformattedString):
                walk.out.text(str(node), pre=walk.pre > 0)
        elif not isinstance(node, Tag):
            continue
        elif entering:
            walk.enter(node)
            stack.append((False, node))
            stack.extend((True, child) for child in reversed(node.contents))
        else:
            walk.exit(node)
    return walk.out.result()
