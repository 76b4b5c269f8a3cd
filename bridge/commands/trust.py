"""``eimis-bridge trust ...``: operator commands (filled by the trust-space issue)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add this module's subcommands to the ``eimis-bridge`` parser."""
    del sub

