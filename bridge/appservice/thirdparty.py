"""The third-party lookups of the application-service API, for clients that use them.

``GET /_matrix/app/v1/thirdparty/protocol/{protocol}``: the protocol (``eimis``): users are
looked up by ``idnps`` (an IDNPS, or an RPPS or ADELI number as typed) or ``name``; one
instance per running connector. ``GET /_matrix/app/v1/thirdparty/user/{protocol}?<fields>``:
the professionals that match, each at the Matrix ID a conversation with them goes to (issue 5's
choice rule), as ``find`` answers in the bot's help desk. ``GET
/_matrix/app/v1/thirdparty/user?userid=<mxid>``: the professional behind a Matrix ID. Unknown
protocols and no matches are 404 ``M_NOT_FOUND`` (the specification's answers). The fields
name people: they are never logged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from bridge.appservice.auth import check_hs_token
from bridge.appservice.errors import matrix_error
from bridge.commands import CommandFailed
from bridge.commands import find as finding
from bridge.db.directory import DirectoryStore, Professional
from bridge.i18n import _

PROTOCOL = "eimis"
MAX_USERS = 10


class ThirdParty:
    def __init__(
        self,
        hs_token: str,
        directory: DirectoryStore,
        connectors: Callable[[], Sequence[str]],
        *,
        protocol: str = PROTOCOL,
    ) -> None:
        self._hs_token = hs_token
        self._directory = directory
        self._connectors = connectors
        """The running connectors, in the configuration's order."""
        self.protocol = protocol

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_matrix/app/v1/thirdparty/protocol/{protocol}", self.get_protocol),
            web.get("/_matrix/app/v1/thirdparty/user/{protocol}", self.get_users),
            web.get("/_matrix/app/v1/thirdparty/user", self.get_user_by_id),
        ]

    def _known(self, request: web.Request) -> None:
        check_hs_token(request, self._hs_token)
        if request.match_info["protocol"] != self.protocol:
            raise matrix_error(404, "M_NOT_FOUND", "Unknown protocol")

    async def get_protocol(self, request: web.Request) -> web.Response:
        self._known(request)
        return web.json_response(
            {
                "user_fields": ["idnps", "name"],
                "location_fields": [],
                "icon": "",
                "field_types": {
                    "idnps": {
                        "regexp": "[0-9]{9,12}",
                        "placeholder": _("IDNPS, RPPS or ADELI"),
                    },
                    "name": {
                        "regexp": ".{1,100}",
                        "placeholder": _("Family and/or given name"),
                    },
                },
                "instances": [
                    {
                        "desc": _("Health professionals reachable via {connector}").format(
                            connector=connector
                        ),
                        "fields": {},
                        "network_id": connector,
                    }
                    for connector in self._connectors()
                ],
            }
        )

    def _user(self, professional: Professional, mxid: str) -> dict[str, Any]:
        return {
            "userid": mxid,
            "protocol": self.protocol,
            "fields": {"idnps": professional.idnps, "name": professional.display_name},
        }

    async def get_users(self, request: web.Request) -> web.Response:
        self._known(request)
        query = request.query.get("idnps") or request.query.get("name") or ""
        try:
            matches = await finding.search(
                self._directory, list(self._connectors()), query, MAX_USERS
            )
        except CommandFailed:
            matches = []
        users = [self._user(m.professional, m.mxid) for m in matches if m.mxid]
        if not users:
            raise matrix_error(404, "M_NOT_FOUND", "No users were found with these fields")
        return web.json_response(users)

    async def get_user_by_id(self, request: web.Request) -> web.Response:
        check_hs_token(request, self._hs_token)
        mxid = request.query.get("userid", "")
        professional = await self._directory.by_mxid(mxid) if mxid else None
        if professional is None:
            raise matrix_error(404, "M_NOT_FOUND", "No professional has this Matrix ID")
        return web.json_response([self._user(professional, mxid)])
