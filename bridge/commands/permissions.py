"""Per-person permissions of vendor users (TI-Messenger's permission concept): who may invite a
professional, by IDNPS. allow-all or block-all, with exceptions by server and by Matrix user
(blocked under allow-all, allowed under block-all); no setting means allow-all. The running
bridge reads them at each invite.
"""

from __future__ import annotations

from collections.abc import Iterable

from bridge.commands import BadInput
from bridge.commands.trust import server_name
from bridge.db.permissions import PermissionStore
from bridge.values.permissions import exception_change
from bridge.values.trust import valid_mxid
from connectors.idnps import Idnps, InvalidIdnps


def idnps_of(value: str) -> Idnps:
    try:
        return Idnps(value)
    except InvalidIdnps as error:
        raise BadInput(f"invalid IDNPS: {error}") from None


def exceptions_of(
    action: str, servers: Iterable[str], users: Iterable[str]
) -> list[tuple[str, str]]:
    """(kind, value) of the servers and users typed, checked."""
    exceptions = [("server", server_name(value, action)) for value in servers]
    for value in users:
        try:
            exceptions.append(("user", valid_mxid(value)))
        except ValueError as error:
            raise BadInput(f"invalid --user: {error}") from None
    return exceptions


class PermissionCommands:
    def __init__(self, store: PermissionStore) -> None:
        self.store = store

    async def show(self, idnps: Idnps) -> list[str]:
        lines = (await self.store.effective(idnps)).describe()
        stored = await self.store.get(idnps)
        if stored is None:
            lines.append("  (nothing stored: the default)")
        return lines

    async def clear(self, idnps: Idnps) -> list[str]:
        cleared = await self.store.clear(idnps)
        return [f"{idnps}: " + ("cleared, now allow-all." if cleared else "nothing stored.")]

    async def set_default(self, idnps: Idnps, setting: str) -> list[str]:
        """Set the default; the exceptions are dropped when it changes (their meaning flips)."""
        current = await self.store.effective(idnps)
        flips = current.default_setting != setting
        await self.store.set_default(idnps, setting, keep_exceptions=not flips)  # type: ignore[arg-type]
        lines = []
        if flips and (current.servers or current.users):
            lines.append("The default changed, so the previous exceptions were dropped.")
        return lines + (await self.store.effective(idnps)).describe()

    async def except_(
        self, idnps: Idnps, action: str, exceptions: list[tuple[str, str]]
    ) -> list[str]:
        """``allow`` or ``block`` these servers and users: an exception added or removed,
        depending on the default."""
        if not exceptions:
            raise BadInput(f"'{action}' needs --server SERVER and/or --user MXID")
        change = exception_change(await self.store.effective(idnps), action)  # type: ignore[arg-type]
        for kind, value in exceptions:
            if change == "add":
                await self.store.add_exception(idnps, kind, value)
            else:
                await self.store.remove_exception(idnps, kind, value)
        return (await self.store.effective(idnps)).describe()
