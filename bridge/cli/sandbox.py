"""``eimis-bridge sandbox TYPE``: serve a vendor-style API emulator."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import yaml


def register(sub: Any) -> None:
    sandbox = sub.add_parser("sandbox", help="serve a vendor-style API emulator")
    sandbox.add_argument(
        "type", help="connector type (e.g. one listed by 'sandbox --list')", nargs="?"
    )
    sandbox.add_argument("--port", type=int, default=0, help="port to listen on")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--list", action="store_true", help="list the connector types")
    sandbox.set_defaults(handler=lambda args: _sandbox(args.type, args.host, args.port, args.list))


def _sandbox(type_name: str | None, host: str, port: int, list_only: bool) -> int:
    from aiohttp import web

    from bridge.devtools.sandboxes import vendor_sandboxes

    with_sandbox = vendor_sandboxes()
    if list_only or type_name is None:
        print("Connector types with a sandbox: " + ", ".join(sorted(with_sandbox)))
        return 0 if list_only else 2
    sandbox = with_sandbox.get(type_name)
    if sandbox is None:
        print(
            f"No sandbox for {type_name!r}; choose one of: {', '.join(sorted(with_sandbox))}",
            file=sys.stderr,
        )
        return 2
    app = sandbox.app()

    async def serve() -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        url = f"http://{host}:{bound}"
        print(f"{type_name}-style sandbox (an emulator, not the vendor's API) on {url}")
        print("Connector settings for the bridge config:")
        print(yaml.safe_dump({"settings": sandbox.settings(url)}, sort_keys=False))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0
