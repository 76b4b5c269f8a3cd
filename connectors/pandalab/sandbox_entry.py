"""PandaLab's sandbox as the dev tools find it (entry point ``eimis_bridge.sandboxes``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from connectors.pandalab.connector import SANDBOX_WEBHOOK_SECRET
from connectors.sandbox_entry import VendorSandbox


def _app() -> web.Application:
    from connectors.pandalab.sandbox import create_app

    return create_app()


def _settings(sandbox_url: str) -> dict[str, Any]:
    from connectors.pandalab.sandbox import CLIENT_ID, CLIENT_SECRET

    return {
        "api_url": sandbox_url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "webhook_secret": SANDBOX_WEBHOOK_SECRET,
    }


SANDBOX = VendorSandbox(app=_app, settings=_settings)
