"""The webhook contract's sandbox vendor as the dev tools find it (entry point
``eimis_bridge.sandboxes``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from connectors.sandbox_entry import VendorSandbox


def _app() -> web.Application:
    from connectors.webhook.sandbox import create_app

    return create_app()


def _settings(sandbox_url: str) -> dict[str, Any]:
    from connectors.webhook.sandbox import CAPABILITIES, SECRET

    return {"base_url": sandbox_url, "secret": SECRET, "capabilities": CAPABILITIES}


SANDBOX = VendorSandbox(app=_app, settings=_settings)
