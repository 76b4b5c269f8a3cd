"""The trust list: the homeservers of the EIMIS trust space, and what follows from it.

Pure logic, no I/O (``bridge/core/trust.py``'s ``TrustWatcher`` polls the stored list and
calls back when it changes). Matching follows ``m.room.server_acl``: a server's port is never
considered (``hs.example``, ``hs.example:8448`` and ``hs.example:1234`` are one server for the
ACL, so they are one for the bridge too), and host names compare case-insensitively.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

# A DNS name: labels of letters, digits and hyphens (not at either end), dot-separated.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
SERVER_ACL = "m.room.server_acl"


class InvalidServerName(ValueError):
    """Not a server name the trust list can hold; the message says why."""


def validate_server_name(value: object) -> str:
    """A server name ``hostname[:port]``, lower-cased; raises InvalidServerName with the reason.

    IP literals are refused: every portal's ACL sets ``allow_ip_literals: false`` (servers of the
    trust space have DNS names and certificates for them), so such a server could never take part.
    """
    if not isinstance(value, str):
        raise InvalidServerName(f"a server name is a string, not {type(value).__name__}")
    name = value.strip()
    if not name:
        raise InvalidServerName("a server name cannot be empty")
    if len(name) > 255:
        raise InvalidServerName("a server name is at most 255 characters")
    host, port = _split(name)
    if host.startswith("[") or _is_ip(host):
        raise InvalidServerName(
            f"{name!r} is an IP literal; portals deny IP literals (allow_ip_literals: false), "
            "use the server's DNS name"
        )
    if not _HOSTNAME.fullmatch(host):
        raise InvalidServerName(
            f"{name!r} is not hostname[:port] (letters, digits, '-' and '.', e.g. "
            "'matrix.example.org' or 'matrix.example.org:8448')"
        )
    if port is not None:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InvalidServerName(f"{name!r}: the port must be a number from 1 to 65535")
        return f"{host.lower()}:{int(port)}"
    return host.lower()


def _split(name: str) -> tuple[str, str | None]:
    if name.startswith("["):  # [v6]:port
        end = name.find("]")
        return name[: end + 1], (name[end + 2 :] if name[end + 1 : end + 2] == ":" else None)
    if name.count(":") == 1:
        host, port = name.split(":")
        return host, port
    return name, None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def host_of(server_name: str) -> str:
    """The server name without its port, lower-cased (what the ACL compares)."""
    return _split(server_name.strip())[0].lower()


def server_of(mxid: str) -> str | None:
    """The server name of a Matrix user id (``@local:server[:port]``), or None if malformed."""
    if not isinstance(mxid, str) or not mxid.startswith("@") or ":" not in mxid:
        return None
    server = mxid.split(":", 1)[1]
    return server or None


def valid_mxid(value: str) -> str:
    """A Matrix user id ``@localpart:server``; raises InvalidServerName/ValueError naming why."""
    value = value.strip()
    if not value.startswith("@") or ":" not in value:
        raise ValueError(f"{value!r} is not a Matrix user id (@localpart:server)")
    localpart, server = value[1:].split(":", 1)
    if not localpart or not re.fullmatch(r"[a-z0-9._=/+-]+", localpart):
        raise ValueError(
            f"{value!r}: the localpart must be lower-case letters, digits and ._=/+- only"
        )
    return f"@{localpart}:{validate_server_name(server)}"


class TrustList:
    """The effective trust list: config servers, run-time additions and the bridge's own server.

    ``is_trusted`` is synchronous and cheap: it is asked for every Matrix event.
    """

    def __init__(
        self, own_domain: str, config_servers: Iterable[str] = (), extra: Iterable[str] = ()
    ) -> None:
        self.own_domain = own_domain
        self.config_servers = tuple(validate_server_name(s) for s in config_servers)
        self._extra: tuple[str, ...] = ()
        self._hosts: frozenset[str] = frozenset()
        self.replace_extra(extra)

    def replace_extra(self, extra: Iterable[str]) -> bool:
        """Set the run-time additions; True when the effective set of hosts changed."""
        before = self._hosts
        self._extra = tuple(sorted(set(extra)))
        self._hosts = frozenset(host_of(s) for s in self.servers)
        return self._hosts != before

    @property
    def servers(self) -> list[str]:
        """Every trusted server name, own first, then sorted, without duplicates."""
        others = sorted({*self.config_servers, *self._extra} - {self.own_domain})
        return [self.own_domain, *others]

    def is_trusted_server(self, server_name: str | None) -> bool:
        return server_name is not None and host_of(server_name) in self._hosts

    def is_trusted(self, mxid: str) -> bool:
        """Whether this Matrix user's homeserver is in the trust space."""
        return self.is_trusted_server(server_of(mxid))

    def acl(self) -> dict[str, Any]:
        """The ``m.room.server_acl`` content every portal carries."""
        return server_acl(self.servers)


def server_acl(servers: Iterable[str]) -> dict[str, Any]:
    """ACL content allowing exactly these servers (ports dropped, as the ACL ignores them)."""
    allow = sorted({_glob_escape(host_of(s)) for s in servers})
    return {"allow": allow, "deny": [], "allow_ip_literals": False}


def _glob_escape(host: str) -> str:
    # Validated host names hold no glob characters; refuse rather than widen the ACL.
    if any(c in host for c in "*?"):
        raise InvalidServerName(f"{host!r} holds a glob character")
    return host


def acl_matches(current: object, wanted: dict[str, Any]) -> bool:
    """Whether a room's current ACL content already says what the trust list wants."""
    if not isinstance(current, dict):
        return False
    return (
        sorted(current.get("allow") or []) == wanted["allow"]
        and list(current.get("deny") or []) == wanted["deny"]
        and current.get("allow_ip_literals") is False
    )
