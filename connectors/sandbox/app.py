"""Assembles a sandbox aiohttp app: the kernel, JSON errors, the body limit, the user-side API,
and the file store's temporary directory (removed when the app is cleaned up)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from connectors.sandbox.kernel import Kernel
from connectors.sandbox.user_api import add_user_routes
from connectors.sandbox.webtools import (
    KERNEL_KEY,
    MAX_BODY_BYTES,
    ErrorFormatter,
    error_middleware,
)


def new_sandbox_app(kernel: Kernel, vendor_error: ErrorFormatter) -> web.Application:
    """An app serving the user-side API on ``kernel``; the vendor layer adds its own routes.

    ``vendor_error`` formats refusals of the vendor API; the user-side API keeps its own format.
    """
    app = web.Application(
        middlewares=[error_middleware(vendor_error)], client_max_size=MAX_BODY_BYTES
    )
    app[KERNEL_KEY] = kernel
    add_user_routes(app, kernel)

    async def file_store(app: web.Application) -> AsyncIterator[None]:
        kernel.files.open()
        try:
            yield
        finally:
            kernel.files.close()

    app.cleanup_ctx.append(file_store)
    return app
