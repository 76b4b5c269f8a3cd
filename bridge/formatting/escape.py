"""Plain text made inert in Markdown: it renders as the very text that was written.

A backslash before ASCII punctuation always shows that character in CommonMark (and in the
chat dialects built on it), so escaping too much is never wrong, only noisier; this escapes what
can start a construct: links and images (``[``, ``]``), raw HTML and autolinks (``<``, ``>``),
character references (``&name;``), emphasis, code and strikethrough, tables, and the marks that
open a block at the start of a line (headings, quotes, list items, rules).
"""

from __future__ import annotations

import re

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


def escape_markdown(text: str, *, indentation: bool = True) -> str:
    """``text`` written so that a Markdown renderer shows it as it is: no link, image, HTML or
    formatting the writer did not mean. ``indentation=False`` leaves leading whitespace alone
    (for a piece of text that does not start a line)."""
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
