"""Per-person permissions for vendor users, after TI-Messenger's permission concept.

Each professional (by IDNPS) has a default, ``allow-all`` or ``block-all``, and exceptions by
server and by Matrix user: with ``allow-all`` the exceptions are who is blocked, with
``block-all`` they are who is allowed. No setting at all means ``allow-all``. Servers compare
as the ACL does (port ignored, host case-insensitive). Pure logic: the store is
``bridge/db/permissions.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bridge.values.trust import host_of, server_of

ALLOW_ALL = "allow-all"
BLOCK_ALL = "block-all"
DEFAULT_SETTINGS = (ALLOW_ALL, BLOCK_ALL)
Setting = Literal["allow-all", "block-all"]
ExceptionKind = Literal["server", "user"]


@dataclass(frozen=True)
class Permission:
    idnps: str
    default_setting: Setting = ALLOW_ALL
    servers: frozenset[str] = field(default_factory=frozenset)
    """Server exceptions (blocked under allow-all, allowed under block-all)."""
    users: frozenset[str] = field(default_factory=frozenset)
    """User exceptions, Matrix user ids (same meaning)."""

    def _excepted(self, inviter: str) -> bool:
        if inviter in self.users:
            return True
        server = server_of(inviter)
        return server is not None and host_of(server) in {host_of(s) for s in self.servers}

    def decide(self, inviter: str) -> Decision:
        """Whether this professional accepts an invitation from ``inviter`` (a Matrix user id)."""
        excepted = self._excepted(inviter)
        if self.default_setting == BLOCK_ALL:
            if excepted:
                return Decision(True)
            return Decision(False, "this professional does not accept invitations")
        if excepted:
            return Decision(
                False,
                "this professional does not accept invitations from "
                + ("this user" if inviter in self.users else "this server"),
            )
        return Decision(True)

    def describe(self) -> list[str]:
        """Human-readable lines (the CLI's ``show``)."""
        label = "blocked" if self.default_setting == ALLOW_ALL else "allowed"
        lines = [f"{self.idnps}: {self.default_setting}"]
        for server in sorted(self.servers):
            lines.append(f"  {label} server: {server}")
        for user in sorted(self.users):
            lines.append(f"  {label} user:   {user}")
        if not self.servers and not self.users:
            lines.append("  no exceptions")
        return lines


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


def default_for(idnps: str) -> Permission:
    """What a professional without a stored setting gets: allow-all, no exceptions."""
    return Permission(idnps)


def exception_change(
    permission: Permission, action: Literal["allow", "block"]
) -> Literal["add", "remove"]:
    """What ``allow``/``block`` of a server or user means for the exception list.

    Under allow-all, exceptions are blocks: block adds, allow removes. Under block-all,
    exceptions are allowances: allow adds, block removes.
    """
    adds = "block" if permission.default_setting == ALLOW_ALL else "allow"
    return "add" if action == adds else "remove"
