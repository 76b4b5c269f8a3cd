"""The directory published in the homeserver's user directory: professionals found from any
Matrix client's "start a chat" search.

Two steps, one pass (README, "Found from any Matrix client"):

1. **Listing**: each running connector that lists its users (``connectors.base.UserListing``)
   is read page by page; every page is recorded in one transaction (the directory's entry, the
   connector's word filling gaps only, and the ghost row, stamped as seen by this pass). After a
   COMPLETE listing the connector's ghost rows the pass did not see are forgotten (the person
   left that vendor): the choice rule stops picking that ghost, and a ghost that exists is
   renamed "<name> (former account)" so that old conversations keep a truthful name and a
   search shows the current way to reach the person. A listing that fails stops that
   connector's pass (logged, tried again next pass) and forgets nothing.
2. **Publication**: for every directory entry whose chosen Matrix ID (``bridge.directory.
   choice``: connectors in config order, none excluded) is a ghost, the ghost is registered with
   its display name ``"<Given> <FAMILY> - <Profession>"`` unless the ghost table already has it
   with that name. Keyset pages of ``PAGE`` entries, ``IN_FLIGHT`` homeserver calls at once, so
   memory stays bounded whatever the directory's size. With ``identity.require_directory_entry``
   only national entries are published. A ghost that fails is counted and logged (Matrix ID and
   errcode), the rest goes on.

The homeserver lists the ghosts because the registration claims them non-exclusively
(``appservice.ghosts_in_user_directory``) and Synapse runs ``user_directory.search_all_users``.
The running bridge runs a pass at start (in the background), every
``directory.publish_interval_s``, and a publication whenever the directory's latest stamp moved
(an import from the CLI), after ``GhostNames`` has renamed what the import changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mautrix.errors import MatrixRequestError

from bridge.config import Config
from bridge.core.connectors import ConnectorSet
from bridge.core.ghost_ids import GhostIds
from bridge.core.ghost_names import GhostNames
from bridge.core.periodic import Periodic
from bridge.db.clock import now_ms
from bridge.db.directory import GHOST, EntryPage
from bridge.db.stores import Stores
from bridge.directory.choice import choose
from bridge.i18n import _
from bridge.matrix.homeserver import Homeserver
from connectors.base import UserListing
from connectors.idnps import Idnps

log = logging.getLogger("eimis.directory")

PAGE = 1000
"""Directory entries read per keyset page of a publication."""
LIST_PAGE = 500
"""Users asked per page of a connector's listing."""
IN_FLIGHT = 16
"""Homeserver calls (register + name) at once."""
PROGRESS_EVERY_S = 10.0

Progress = Callable[[int, int], object]


@dataclass(frozen=True)
class ChosenGhost:
    """A directory entry whose chosen Matrix ID is a ghost, with the name it should carry and
    the one the ghost table has (None: not made yet)."""

    idnps: str
    mxid: str
    connector: str
    name: str
    current_name: str | None


def chosen(page: EntryPage, connectors_in_order: list[str]) -> list[ChosenGhost]:
    """The page's entries whose chosen Matrix ID (no connector excluded) is a ghost."""
    found = []
    for entry, mxids in page.entries:
        pick = choose(mxids, connectors_in_order)
        if pick is None or pick.kind != GHOST or not pick.connector:
            continue
        found.append(
            ChosenGhost(
                entry.idnps,
                pick.mxid,
                pick.connector,
                entry.display_name,
                page.ghost_names.get(pick.mxid),
            )
        )
    return found


@dataclass(frozen=True)
class PublishReport:
    considered: int
    """Entries whose chosen Matrix ID is a ghost."""
    registered: int
    """Ghosts registered (new to the ghost table)."""
    renamed: int
    """Ghosts that had another name."""
    unchanged: int
    failed: int
    seconds: float

    def summary(self) -> str:
        return (
            f"Published {self.considered} professional(s) in the user directory: "
            f"{self.registered} registered, {self.renamed} renamed, {self.unchanged} unchanged, "
            f"{self.failed} failed ({self.seconds:.1f} s)"
        )


@dataclass(frozen=True)
class ListingReport:
    listed: dict[str, int]
    """Users recorded per connector whose listing completed."""
    failed: tuple[str, ...]
    """Connectors whose listing stopped on an error (nothing forgotten)."""
    forgotten: int
    """Ghost rows forgotten (people who left a vendor)."""


def former_name(name: str) -> str:
    """The name of a ghost that no longer reaches its person."""
    return _("{name} (former account)").format(name=name)


class Discovery:
    def __init__(
        self,
        stores: Stores,
        homeserver: Homeserver,
        connectors: ConnectorSet,
        config: Config,
        *,
        names: GhostNames | None = None,
    ) -> None:
        """``names``: the running bridge's renamer, applied before a publication (one after
        the other, never both on one ghost at once)."""
        self.stores = stores
        self.hs = homeserver
        self.connectors = connectors
        self.config = config
        self.names = names
        self.ids = GhostIds(
            config.appservice.user_prefix,
            config.homeserver.domain,
            config.appservice.bot_username,
        )
        self.seen = 0
        """The directory's latest stamp when the last publication started."""
        self._lock = asyncio.Lock()
        self._periodic = Periodic(
            "directory publication", self.run_pass, config.directory.publish_interval_s, log
        )
        self._watch = Periodic(
            "directory publication after imports",
            self._publish_if_changed,
            config.directory.sync_interval_s,
            log,
        )
        self._first: asyncio.Task[None] | None = None

    def connector_order(self) -> list[str]:
        """Connectors in the configuration's order (enabled ones)."""
        return [cid for cid, c in self.config.connectors.items() if c.enabled]

    # Running bridge ----------------------------------------------------------------------------

    def start(self) -> None:
        """A first pass in the background (never delays the bridge being ready), then the
        periodic passes and the watch on imports."""
        self._first = asyncio.create_task(self._first_pass(), name="directory publication")
        self._periodic.start()

    async def _first_pass(self) -> None:
        try:
            await self.run_pass()
        except Exception as error:  # tried again at the next pass
            log.warning("Directory publication failed (%s); tried again", type(error).__name__)
        self._watch.start()

    async def stop(self) -> None:
        task, self._first = self._first, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._watch.stop()
        await self._periodic.stop()

    async def run_pass(self) -> PublishReport:
        """List the connectors' users, then publish (logged progress)."""
        await self.list_users()
        return await self.publish(progress=self._log_progress())

    async def _publish_if_changed(self) -> PublishReport | None:
        if await self.stores.directory.latest_stamp() == self.seen:
            return None
        return await self.publish(progress=self._log_progress())

    def _log_progress(self) -> Progress:
        state = {"at": time.monotonic(), "tenth": 0}

        def progress(done: int, total: int) -> None:
            tenth = done * 10 // total if total else 10
            now = time.monotonic()
            if tenth > state["tenth"] or now - state["at"] >= PROGRESS_EVERY_S:
                state["tenth"], state["at"] = tenth, now
                log.info("Directory publication: %d/%d entries", done, total)

        return progress

    # Listing -----------------------------------------------------------------------------------

    async def list_users(self) -> ListingReport:
        listed: dict[str, int] = {}
        failed: list[str] = []
        forgotten = 0
        for connector_id, connector in list(self.connectors):
            if not isinstance(connector, UserListing):
                continue
            pass_stamp = await self.stores.directory.next_stamp()
            count = 0
            cursor: str | None = None
            try:
                while True:
                    page = await connector.list_users(cursor, LIST_PAGE)
                    count += await self.stores.directory.record_listed_users(
                        connector_id,
                        page.users,
                        lambda idnps, c=connector_id: self.ids.mxid(c, Idnps(idnps)),
                        pass_stamp,
                    )
                    if page.next_cursor is None:
                        break
                    cursor = page.next_cursor
            except Exception as error:  # that connector's pass stops; nothing is forgotten
                log.warning(
                    "Listing the users of %s stopped (%s); tried again at the next pass",
                    connector_id,
                    type(error).__name__,
                )
                failed.append(connector_id)
                continue
            listed[connector_id] = count
            gone = await self.stores.directory.forget_unlisted(connector_id, pass_stamp)
            forgotten += len(gone)
            await self._name_former([mxid for _idnps, mxid in gone])
            log.info("Listed %d user(s) of %s; %d no longer there", count, connector_id, len(gone))
        return ListingReport(listed, tuple(failed), forgotten)

    async def _name_former(self, mxids: list[str]) -> None:
        """Ghosts that no longer reach their person keep a truthful name."""
        for mxid in mxids:
            row = await self.stores.ghosts.get(mxid)
            if row is None or not row.display_name:
                continue
            name = former_name(row.display_name)
            try:
                await self.hs.ensure_ghost(mxid, name, check_current=False)
            except MatrixRequestError as error:
                log.warning("Could not rename the former ghost %s (%s)", mxid, error.errcode)
                continue
            await self.stores.ghosts.mark_former(mxid, name, now_ms())

    # Publication -------------------------------------------------------------------------------

    async def publish(self, progress: Progress | None = None) -> PublishReport:
        async with self._lock:
            return await self._publish(progress)

    async def _publish(self, progress: Progress | None) -> PublishReport:
        started = time.monotonic()
        directory = self.stores.directory
        latest = await directory.latest_stamp()
        if self.names is not None:
            await self.names.apply()
        national_only = self.config.identity.require_directory_entry
        order = self.connector_order()
        total = await directory.count_with_ghosts(national_only)
        counts = {"considered": 0, "registered": 0, "renamed": 0, "unchanged": 0, "failed": 0}
        done = 0
        gate = asyncio.Semaphore(IN_FLIGHT)
        after: str | None = None
        while True:
            page = await directory.chosen_ghosts(after, PAGE, order, national_only)
            todo: list[ChosenGhost] = []
            for ghost in chosen(page, order):
                counts["considered"] += 1
                if ghost.current_name == ghost.name:
                    counts["unchanged"] += 1
                else:
                    todo.append(ghost)

            async def one(ghost: ChosenGhost) -> ChosenGhost | None:
                async with gate:
                    try:
                        await self.hs.ensure_ghost(ghost.mxid, ghost.name, check_current=False)
                    except MatrixRequestError as error:
                        log.warning(
                            "Could not publish the ghost %s (%s)", ghost.mxid, error.errcode
                        )
                        return None
                    except (TimeoutError, OSError) as error:
                        log.warning(
                            "Could not publish the ghost %s (%s)", ghost.mxid, type(error).__name__
                        )
                        return None
                    return ghost

            made = [g for g in await asyncio.gather(*(one(g) for g in todo)) if g is not None]
            counts["failed"] += len(todo) - len(made)
            for ghost in made:
                counts["registered" if ghost.current_name is None else "renamed"] += 1
            await self.stores.ghosts.upsert_many(
                [(g.mxid, g.connector, g.idnps, g.name) for g in made]
            )
            done += len(page.entries)
            if progress is not None:
                progress(min(done, total), total)
            if page.last_idnps is None:
                break
            after = page.last_idnps
        self.seen = latest
        report = PublishReport(**counts, seconds=round(time.monotonic() - started, 3))
        if report.registered or report.renamed or report.failed:
            log.info("%s", report.summary())
        return report
