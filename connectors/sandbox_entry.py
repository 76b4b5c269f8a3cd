"""What a connector type ships for development: its vendor emulator (a sandbox) and how to
connect to it, registered under the entry-point group ``eimis_bridge.sandboxes``.

The production contract (``connectors.base``) knows nothing of sandboxes; the dev tools (``make
demo``, ``eimis-bridge sandbox``, the end-to-end tests) find them by connector type name
through ``bridge/devtools/sandboxes.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

ENTRY_POINT_GROUP = "eimis_bridge.sandboxes"


@dataclass(frozen=True)
class VendorSandbox:
    """One connector type's sandbox: registered under the type's name."""

    app: Callable[[], web.Application]
    """A new vendor-style emulator app (an emulator, never the vendor's API)."""
    settings: Callable[[str], dict[str, Any]]
    """The connector ``settings`` block that connects to the sandbox served at this URL."""
