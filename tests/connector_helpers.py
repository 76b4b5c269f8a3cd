"""The harness that every connector test puts around a connector and its vendor's sandbox.

The connector tests (PandaLab, Medipeps, webhook) each play the bridge around one connector: its
event store, its web server, and an IDNPS that is no sandbox user. Those parts
do not depend on the vendor, so they live here once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from connectors.base import Connector, RemoteEvent
from connectors.idnps import Idnps, luhn_check_digit

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def rpps(n: int) -> Idnps:
    """A valid RPPS-based IDNPS that is not a sandbox user."""
    partial = f"9{n:09d}"
    return Idnps("8" + partial + luhn_check_digit(partial))


@dataclass
class Recorder:
    """The bridge's event store: records events; ``fail_next`` makes the next stores raise;
    ``gate`` holds stores until set."""

    events: list[RemoteEvent] = field(default_factory=list)
    fail_next: int = 0
    failures: int = 0
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, event: RemoteEvent) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            self.failures += 1
            raise RuntimeError("storage unavailable")
        self.events.append(event)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class Served:
    """An aiohttp app on 127.0.0.1 that a test can take down and bring back on the same port;
    it records each request's method, path and headers."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        app.middlewares.insert(0, self._record)
        self.runner = web.AppRunner(app)
        self.site: web.TCPSite | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def paths(self) -> list[str]:
        """The path of every request served, in order."""
        return [path for _, path, _ in self.requests]

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path, dict(request.headers)))
        return await handler(request)

    async def start(self) -> None:
        if self.runner.server is None:
            await self.runner.setup()
        self.site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await self.site.start()
        self.port = self.runner.addresses[0][1]

    async def down(self) -> None:
        """Stop listening and drop open connections, as a crashed server would."""
        assert self.site is not None and self.runner.server is not None
        await self.site.stop()
        self.site = None
        self.runner.server.pre_shutdown()
        await self.runner.server.shutdown(1.0)

    async def close(self) -> None:
        await self.runner.cleanup()


def mounted(connector: Connector, connector_id: str) -> web.Application:
    """The bridge's web server, as the bridge mounts connectors: routes under /connectors/<id>."""
    sub = web.Application()
    sub.add_routes(connector.web_routes())
    app = web.Application()
    app.add_subapp(f"/connectors/{connector_id}", sub)
    return app
