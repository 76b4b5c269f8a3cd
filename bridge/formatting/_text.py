"""Text made safe to hand to any parser: no lone UTF-16 surrogates (they become U+FFFD)."""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub(text: str) -> str:
    """``text`` with surrogate pairs joined into their character and lone surrogates as U+FFFD."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
