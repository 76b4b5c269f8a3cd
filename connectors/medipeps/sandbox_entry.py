"""Medipeps' sandbox as the dev tools find it (entry point ``eimis_bridge.sandboxes``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from connectors.sandbox_entry import VendorSandbox


def _app() -> web.Application:
    from connectors.medipeps.sandbox import create_app

    return create_app()


def _settings(sandbox_url: str) -> dict[str, Any]:
    from connectors.medipeps.sandbox import API_KEY

    return {"api_url": sandbox_url, "api_key": API_KEY}


SANDBOX = VendorSandbox(app=_app, settings=_settings)
