"""The connectors' web routes (vendor webhooks), found at request time.

aiohttp freezes an application's routes when it starts, so routes mounted once at start could
never serve a connector registered later. One catch-all route, ``/connectors/{connector_id}/...``,
is mounted instead, and each request goes to the routes its connector has now: a connector
added at run time gets its webhooks at once, one disabled answers 503 (its vendor delivers
again later, nothing is lost), one unknown 404.

Bodies are bounded before a route runs: the connector's ``refuse_unread`` sees the headers
first (an unsigned or stale request: 401 unread), then a declared ``Content-Length`` over the
connector's ``max_request_bytes`` is answered 413 unread, and ``request.read()`` (``json()``,
``text()``, ``post()``) in a route stops at it (413 too), so a stalled or endless upload cannot
make the bridge hold more than the connector accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiohttp import web

from connectors.base import MAX_REQUEST_BYTES

PREFIX = "/connectors"
RETRY_AFTER_S = 30


class ConnectorRoutes:
    def __init__(self) -> None:
        self._routers: dict[str, web.UrlDispatcher] = {}
        self._limits: dict[str, int] = {}
        self._refuse_unread: dict[str, Callable[[web.BaseRequest], web.StreamResponse | None]] = {}
        self._held: set[str] = set()

    def mount(self, app: web.Application) -> None:
        """Add the catch-all route (before the application starts)."""
        app.router.add_route("*", PREFIX + "/{connector_id}/{tail:.*}", self._dispatch)

    def serve(
        self,
        connector_id: str,
        routes: Sequence[web.AbstractRouteDef],
        max_body_bytes: int = MAX_REQUEST_BYTES,
        refuse_unread: Callable[[web.BaseRequest], web.StreamResponse | None] | None = None,
    ) -> None:
        """From now on, requests under the connector's path go to these routes (``web.get``,
        ``web.post`` ... with paths relative to ``/connectors/<connector id>``), with bodies of
        at most ``max_body_bytes`` (the connector's ``max_request_bytes``), once
        ``refuse_unread`` (the connector's: a check of the headers alone) let them through."""
        router = web.UrlDispatcher()
        prefix = f"{PREFIX}/{connector_id}"
        for route in routes:
            if not isinstance(route, web.RouteDef):
                raise TypeError(
                    f"connector {connector_id}: web_routes() must give route definitions "
                    f"(web.get, web.post ...), not {type(route).__name__}"
                )
            router.add_route(route.method, prefix + route.path, route.handler, **route.kwargs)
        self._routers[connector_id] = router
        self._limits[connector_id] = max_body_bytes
        self._refuse_unread[connector_id] = refuse_unread or _none
        self._held.discard(connector_id)

    def hold(self, connector_id: str) -> None:
        """The connector exists but does not run: its vendor is asked to come back later."""
        self._routers.pop(connector_id, None)
        self._limits.pop(connector_id, None)
        self._refuse_unread.pop(connector_id, None)
        self._held.add(connector_id)

    def drop(self, connector_id: str) -> None:
        self._routers.pop(connector_id, None)
        self._limits.pop(connector_id, None)
        self._refuse_unread.pop(connector_id, None)
        self._held.discard(connector_id)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        connector_id = request.match_info["connector_id"]
        router = self._routers.get(connector_id)
        if router is None:
            if connector_id in self._held:
                return web.json_response(
                    {
                        "error": "connector_unavailable",
                        "message": "this connector is not running; deliver again later",
                    },
                    status=503,
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            return web.json_response(
                {"error": "not_found", "message": "no such connector"}, status=404
            )
        match = await router.resolve(request)
        if match.http_exception is not None:
            # A JSON error, like every other answer vendors get (the Allow header kept).
            error = match.http_exception
            return web.json_response(
                {
                    "error": "not_found" if error.status == 404 else "method_not_allowed",
                    "message": error.reason,
                },
                status=error.status,
                headers={k: v for k, v in error.headers.items() if k == "Allow"},
            )
        refusal = self._refuse_unread.get(connector_id, _none)(request)
        if refusal is not None:
            return refusal
        limit = self._limits.get(connector_id, MAX_REQUEST_BYTES)
        if request.content_length is not None and request.content_length > limit:
            return _too_large(limit)
        # What aiohttp does for a sub-application: the handler sees its own match_info
        # (path parameters of its route) on a copy of the request, here one whose read() stops
        # at the connector's limit.
        match.add_app(request.app)
        match.freeze()
        inner = request.clone(client_max_size=limit)
        inner._match_info = match
        try:
            return await match.handler(inner)
        except web.HTTPRequestEntityTooLarge:
            return _too_large(limit)


def _none(request: web.BaseRequest) -> None:
    return None


def _too_large(limit: int) -> web.Response:
    return web.json_response(
        {
            "error": "body_too_large",
            "message": f"the body is larger than the {limit} bytes accepted",
        },
        status=413,
    )
