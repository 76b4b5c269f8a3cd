"""Ghosts carry their directory entry's name, and follow it when the directory changes.

The directory is changed by imports (``eimis-bridge directory import|fetch``, another process)
and by the bridge itself. The running bridge looks at the directory's latest ``updated_at``
every ``directory.sync_interval_s``; when it moved, it renames (on the homeserver, then in its
ghost table) every ghost whose entry was written since and now names it differently. What was
applied is remembered in the database, so a start compares only what changed while the bridge
was stopped (a bridge with 100,000 ghosts does not read them all at every start). When the way
names are written changes (``connectors.names.RULE``), the next start compares every ghost once.
"""

from __future__ import annotations

import logging

from mautrix.errors import MatrixRequestError

from bridge.core.periodic import Periodic
from bridge.db.connector_state import BRIDGE_STATE, ConnectorStateStore
from bridge.db.stores import Stores
from bridge.matrix.homeserver import Homeserver
from connectors.names import RULE

log = logging.getLogger("eimis.directory")

SEEN_KEY = "directory_names_applied_up_to"
GHOSTS_LISTED_KEY = "directory_ghosts_listed"
NAMING_RULE_KEY = "directory_naming_rule"


class GhostNames:
    def __init__(self, stores: Stores, homeserver: Homeserver, interval_s: float) -> None:
        self.stores = stores
        self.hs = homeserver
        self.seen = 0
        """The directory's latest ``updated_at`` already applied."""
        self._state = ConnectorStateStore(stores.db, BRIDGE_STATE)
        self._poll = Periodic("directory names pass", self.apply, interval_s, log)

    async def start(self) -> None:
        if await self._state.get(GHOSTS_LISTED_KEY) is None:
            # Once: ghosts made before the directory existed; later ones are listed as made.
            await self.stores.directory.backfill_ghosts()
            await self._state.set(GHOSTS_LISTED_KEY, "1")
        self.seen = int(await self._state.get(SEEN_KEY) or 0)
        if await self._state.get(NAMING_RULE_KEY) != RULE:
            # Names are written differently now: every ghost is compared once, then recorded.
            self.seen = 0
            await self._state.set(SEEN_KEY, "0")
            await self._state.set(NAMING_RULE_KEY, RULE)
        try:
            await self.apply()
        except Exception:  # the loop tries again; a rename is not worth failing the start
            log.exception("Could not apply the directory's names to ghosts")
        self._poll.start()

    async def stop(self) -> None:
        await self._poll.stop()

    async def apply(self) -> int:
        """Rename the ghosts whose entries changed since the last pass; returns how many."""
        latest = await self.stores.directory.latest_stamp()
        if latest == self.seen:
            return 0
        renamed = 0
        failed = False
        for rename in await self.stores.directory.renames(self.seen):
            try:
                await self.hs.ensure_ghost(rename.mxid, rename.new_name)
            except MatrixRequestError as error:
                log.warning("Could not rename the ghost %s (%s)", rename.mxid, error.errcode)
                failed = True
                continue
            await self.stores.ghosts.upsert(
                rename.mxid, rename.connector, rename.idnps, rename.new_name
            )
            renamed += 1
        if renamed:
            log.info("Renamed %d ghost(s) after their directory entries", renamed)
        if not failed:
            self.seen = latest
            await self._state.set(SEEN_KEY, str(latest))
        return renamed
