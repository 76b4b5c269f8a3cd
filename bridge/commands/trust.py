"""The trust list: the homeservers whose users may share conversations with vendor users.

The bridge's own server and the config's ``trust.servers`` are always trusted (they change in
the config); operators add and remove others at run time, stored in the database. The running
bridge applies a change to every portal's ``m.room.server_acl`` within
``trust.poll_interval_s``. One behaviour for the CLI's ``trust`` and the admin room's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bridge.commands import BadInput, Refused
from bridge.db.trust import TrustStore
from bridge.values.trust import InvalidServerName, TrustList, validate_server_name


def server_name(value: str | None, action: str) -> str:
    """A server name as typed, checked and normalised (``HS2.example`` -> ``hs2.example``)."""
    if not value:
        raise BadInput(f"'trust {action}' needs a server name (hostname[:port])")
    try:
        return validate_server_name(value)
    except InvalidServerName as error:
        raise BadInput(f"invalid server name: {error}") from None


@dataclass(frozen=True)
class TrustedServer:
    name: str
    origin: str
    """Why it is trusted, for people: this bridge's homeserver, the config, who added it."""


@dataclass
class TrustListing:
    servers: list[TrustedServer]
    acl_allow: list[str]
    """The ``allow`` list of the ACL every portal carries."""

    def text(self) -> str:
        lines = ["Trusted servers:"]
        lines += [f"  {server.name}  ({server.origin})" for server in self.servers]
        lines.append(f"ACL allow: {', '.join(self.acl_allow)}")
        return "\n".join(lines)


class TrustCommands:
    def __init__(self, store: TrustStore, own_domain: str, config_servers: Iterable[str]) -> None:
        self.store = store
        self.own = own_domain
        self.configured = TrustList(own_domain, config_servers).config_servers

    def _fixed(self, server: str) -> bool:
        return server == self.own or server in self.configured

    async def listing(self) -> TrustListing:
        rows = await self.store.list()
        servers = [TrustedServer(self.own, "this bridge's homeserver")]
        servers += [
            TrustedServer(s, "config trust.servers") for s in self.configured if s != self.own
        ]
        servers += [
            TrustedServer(row.server_name, f"added by {row.added_by}")
            for row in rows
            if not self._fixed(row.server_name)
        ]
        effective = TrustList(self.own, self.configured, [row.server_name for row in rows])
        return TrustListing(servers, list(effective.acl()["allow"]))

    async def add(self, value: str | None, added_by: str) -> str:
        """Trust a server; a server of the config (or ours) is trusted already: nothing stored."""
        server = server_name(value, "add")
        if self._fixed(server):
            return f"{server} is already trusted (config)."
        if await self.store.add(server, added_by):
            return f"{server} added: trusted; every portal's ACL follows within seconds."
        return f"{server} was already in the trust list."

    def removable(self, value: str | None) -> str:
        """The server to remove, once checked that it can be (not ours, not the config's)."""
        server = server_name(value, "remove")
        if server == self.own:
            raise BadInput(f"{server} is this bridge's own homeserver: always trusted")
        if server in self.configured:
            raise BadInput(f"{server} is in the config file's trust.servers: remove it there")
        return server

    async def remove(self, value: str | None) -> str:
        server = self.removable(value)
        if await self.store.remove(server):
            return (
                f"{server} removed: no longer trusted; every portal's ACL follows within seconds."
            )
        raise Refused(f"{server} is not in the run-time trust list.")
