"""Plain text made inert in Markdown: it renders as the very text that was written.

A backslash before ASCII punctuation always shows that character in CommonMark (and in the
chat dialects built on it), so escaping too much is never wrong, only noisier; this escapes what
can start a construct: links and images (``[``, ``]``), raw HTML and autolinks (``<``, ``>``),
character references (``&name;``), emphasis, code and strikethrough, tables, and the marks that
open a block at the start of a line (headings, quotes, list items, rules).

A whole message that a CommonMark renderer (with tables and strikethrough) already shows as the
very text written is left as it is: escaping it would only show backslashes in apps that display
the source, and change nothing where it is rendered.
"""

from __future__ import annotations

import re
from functools import lru_cache

from markdown_it import MarkdownIt

# Anywhere in a line ("_" too: in CommonMark it is no emphasis inside a word, but older Markdown
# renderers, which some vendors use, take it for one).
_INLINE = re.compile(r"[\\`*_~\[\]<>|]|&(?=#?[0-9A-Za-z]+;)")
# At the start of a line (after at most 3 spaces): a heading, a list item, a rule or setext
# underline. (">" is escaped everywhere.)
_LINE_START = re.compile(
    r"^([ \t]{0,3})(#{1,6}(?=[ \t]|$)|[-+](?=[ \t]|$)|[0-9]{1,9}[.)](?=[ \t]|$)|=+[ \t]*$|-)",
    re.MULTILINE,
)


# Indentation: 4 columns make a code block (where escapes show). No-break spaces look the same
# and are no indentation to Markdown.
_INDENT = re.compile(r"^[ \t]+", re.MULTILINE)


_WHITESPACE = re.compile(r"\s+")
# What some renderer may take for a link, an image, HTML, an entity or an escape even where
# CommonMark does not (a ``javascript:`` link is text to CommonMark, a link to others).
# An underscore between two letters or digits is no emphasis in CommonMark ("native_to_vendor",
# a file name): only one at a word's edge counts (older renderers took intraword ones for
# emphasis; the vendors' are CommonMark-based).
_HAZARD = re.compile(
    r"\\"  # an escape
    r"|(?<![^\W_])_|_(?![^\W_])"  # an underscore at a word's edge
    r"|\]\s*[(\[:]"  # a link, image, reference or definition
    r"|<[A-Za-z/!?]"  # a tag, comment or autolink
    r"|&#?[0-9A-Za-z]+;"  # a character reference
)


@lru_cache(maxsize=1)
def _renderer() -> MarkdownIt:
    return MarkdownIt("commonmark").enable(["table", "strikethrough"])


def renders_as_itself(text: str) -> bool:
    """Whether a Markdown renderer shows ``text`` as written: paragraphs of plain text only (no
    link, image, HTML, entity, escape, emphasis, code, heading, list, quote, table or rule), the
    same characters in the same order. Link-, tag- and entity-like sequences, backslashes and
    underscores at a word's edge count as formatting whatever CommonMark makes of them."""
    if _HAZARD.search(text):
        return False
    shown: list[str] = []
    for token in _renderer().parse(text):
        if token.type in ("paragraph_open", "paragraph_close"):
            continue
        if token.type != "inline" or token.children is None:
            return False
        for child in token.children:
            if child.type == "text":
                shown.append(child.content)
            elif child.type not in ("softbreak", "hardbreak"):
                return False
    return _WHITESPACE.sub("", "".join(shown)) == _WHITESPACE.sub("", text)


def escape_markdown(text: str, *, indentation: bool = True) -> str:
    """``text`` written so that a Markdown renderer shows it as it is: no link, image, HTML or
    formatting the writer did not mean. ``indentation=False`` leaves leading whitespace alone
    (for a piece of text that does not start a line): such pieces are always escaped, being
    parts of a larger Markdown text."""
    if indentation and renders_as_itself(text):
        return _INDENT.sub(lambda m: "\u00a0" * len(m.group().expandtabs(4)), text)
    text = _INLINE.sub(lambda m: "\\" + m.group(), text)
    text = _LINE_START.sub(_escape_line_start, text)
    if not indentation:
        return text
    return _INDENT.sub(lambda m: "\u00a0" * len(m.group().expandtabs(4)), text)


def _escape_line_start(match: re.Match[str]) -> str:
    indent, mark = match.group(1), match.group(2)
    if mark[0].isdigit():  # "12." -> "12\."
        return indent + mark[:-1] + "\\" + mark[-1]
    return indent + "\\" + mark
