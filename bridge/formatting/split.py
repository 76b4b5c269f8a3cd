"""Long text cut into parts a vendor accepts, at the most natural places."""

from __future__ import annotations

import re
import unicodedata

# Where text may be cut: paragraph breaks, then line breaks, then spaces (not the no-break ones,
# U+00A0, U+2007 and U+202F).
_SPACE = " \t\n\r\f\v\u1680\u2028\u2029\u205f\u3000" + "".join(
    chr(c) for c in range(0x2000, 0x200B) if c != 0x2007
)
_SPACES = f"[{re.escape(_SPACE)}]"
_SEPARATORS = (
    re.compile(rf"\n[ \t\r\f\v]*\n{_SPACES}*"),
    re.compile(rf"\n{_SPACES}*"),
    re.compile(rf"{_SPACES}+"),
)
_ZWJ = "\u200d"


def _extends(char: str) -> bool:
    """``char`` belongs with the character before it (a combining mark, a joiner, a variation
    selector, an emoji modifier or tag, a Hangul vowel or final consonant)."""
    code = ord(char)
    return (
        unicodedata.category(char) in {"Mn", "Mc", "Me"}
        or char == _ZWJ
        or 0xFE00 <= code <= 0xFE0F  # variation selectors
        or 0xE0100 <= code <= 0xE01EF
        or 0x1F3FB <= code <= 0x1F3FF  # skin tones
        or 0xE0020 <= code <= 0xE007F  # emoji tags (subdivision flags)
        or 0x1160 <= code <= 0x11FF  # Hangul jamo vowels and finals
        or 0xD7B0 <= code <= 0xD7FF
        or 0xDC00 <= code <= 0xDFFF  # a low surrogate, in text that kept its UTF-16 pairs
    )


def _regional_indicator(char: str) -> bool:
    return 0x1F1E6 <= ord(char) <= 0x1F1FF


def _boundary(text: str, i: int) -> bool:
    """Cutting ``text`` at ``i`` keeps every user-perceived character whole (roughly: a base and
    what extends it, a ZWJ emoji sequence, a flag, an Indic conjunct, CR LF)."""
    if i <= 0 or i >= len(text):
        return True
    before, after = text[i - 1], text[i]
    if _extends(after) or before == _ZWJ or (before, after) == ("\r", "\n"):
        return False
    if unicodedata.combining(before) == 9 and unicodedata.category(after).startswith("L"):
        # A virama joins the consonants around it into one conjunct (Indic scripts).
        return False
    if _regional_indicator(before) and _regional_indicator(after):
        run = 0
        while i - run - 1 >= 0 and _regional_indicator(text[i - run - 1]):
            run += 1
        return run % 2 == 0
    return True


def _cut(text: str, max_chars: int) -> tuple[int, int]:
    """Where the first part ends and where the rest starts (after the separator cut, if any)."""
    window = text[: max_chars + 64]  # a separator starting within max_chars may end after it
    first = len(window) - len(window.lstrip())  # a part is more than leading whitespace
    for separator in _SEPARATORS:
        for match in reversed(list(separator.finditer(window, 1))):
            start = match.start()
            if start > max_chars or start <= first:
                continue
            end = match.end()
            while end < len(text) and text[end] in _SPACE:
                end += 1
            if _boundary(text, start) and _boundary(text, end):
                return start, end
    for i in range(max_chars, 0, -1):
        if _boundary(text, i):
            return i, i
    return max_chars, max_chars  # one unbreakable cluster longer than max_chars


def split_text(text: str, max_chars: int) -> list[str]:
    """``text`` in parts of at most ``max_chars`` characters, cut at the last paragraph break that
    fits, else line break, else space, else between two characters (never inside a character
    with its combining marks, a ZWJ emoji sequence or a flag, unless one is over ``max_chars``).

    The whitespace at each cut is dropped: the parts, joined with it, give back ``text``. Text
    that fits is returned whole; empty or whitespace-only text gives no part at all (``[]``).
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, not {max_chars}")
    if not text.strip():
        return []
    parts: list[str] = []
    rest = text
    while len(rest) > max_chars:
        part_end, rest_start = _cut(rest, max_chars)
        part = rest[:part_end].rstrip(_SPACE)
        if part.strip():
            parts.append(part)
        rest = rest[rest_start:].lstrip(_SPACE)
    if rest.strip():
        parts.append(rest)
    return parts
