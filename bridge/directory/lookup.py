"""The directory as connectors see it (``connectors.base.DirectoryLookup``): secure mailboxes
resolved to professionals and back, read from ``DirectoryStore`` at each call (an import under
a running bridge is seen at once)."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.db.directory import DirectoryStore
from connectors.base import Idnps, InvalidIdnps, RemoteUser


class StoreDirectoryLookup:
    """``connectors.base.DirectoryLookup`` backed by the bridge's directory store."""

    def __init__(self, store: DirectoryStore) -> None:
        self.store = store

    async def idnps_for_mailbox(self, address: str) -> Idnps | None:
        entry = await self.store.by_mailbox(address)
        if entry is None:
            return None
        try:
            return Idnps(entry.idnps)
        except InvalidIdnps:  # only valid IDNPS are stored; never trust a row blindly
            return None

    async def mailboxes_of(self, idnps: Idnps) -> Sequence[str]:
        return tuple(m.address for m in await self.store.mailboxes(idnps))

    async def describe(self, idnps: Idnps) -> RemoteUser | None:
        """Names and profession (its label, else its code, else empty) from the directory."""
        entry = await self.store.get(idnps)
        if entry is None:
            return None
        return RemoteUser(
            idnps=idnps,
            given_name=entry.given_name,
            family_name=entry.family_name,
            profession=entry.profession_label or entry.profession_code or "",
        )
