"""Timeline reconciliation: room events the homeserver never pushed are found and stored anyway.

The bridge learns of room events through appservice transactions, and Synapse can lose some: it
keeps the events queued behind a transaction in flight only in memory, so a restart drops them
(element-hq/synapse#11637), and a transaction it stores while it thinks the bridge is down can
stay unsent. Each portal room's timeline is the truth: a pass reads it backwards from the live
end with ``/messages`` (as a user of the bridge joined there, the portal's voice first) down to an
event the inbox already holds, and stores the events in between, oldest first, exactly as a
transaction would have (same dedup keys, so the late transaction changes nothing).

When to look (``TransactionWatch`` reads the first two in the transactions themselves):

- a transaction id that does not follow the previous one: ids that start again (Synapse
  restarted and numbers from 1: the events it held in memory are gone) or that jump (a
  transaction in between was never sent);
- the homeserver hanging up before the bridge answered a transaction (it went away meanwhile);
- the bridge starting, and the homeserver answering again after the bridge found it down;
- a periodic sweep, as a backstop, with ``reconcile.interval_s``.

Order: a pass run because of a transaction runs *before* that transaction's events are stored,
and any other pass run because of a fault holds incoming transactions (``wait_open``) until it
is done, so recovered events take their place in the inbox ahead of what follows them in the
timeline. Each conversation's lane processes the inbox in that order, so a vendor gets a
room's messages in timeline order, per sender and across senders, as long as the recovered
events are found before a later event of their room was stored. Events found later than that (by
the sweep, or after a fault no signal revealed) are still delivered, once, but after the later
ones that were already delivered.

The work is bounded (rooms with homeserver events in the last ``active_within_s``, at most
``max_rooms`` of them, ``max_pages`` pages of ``page_size`` events per room) and nothing of the
events' content is ever logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientError
from mautrix.errors import MatrixConnectionError, MatrixRequestError

from bridge.config import ReconcileConfig
from bridge.core.periodic import Periodic
from bridge.db.clock import now_ms
from bridge.db.inbox import InboxStore
from bridge.matrix.homeserver import Homeserver
from connectors.kit.tasks import cancel_and_wait

log = logging.getLogger("eimis.reconcile")

TRANSACTION_IDS_KEPT_MS = 7 * 24 * 3600 * 1000
"""Transaction ids only serve to notice restarts: a week of them is plenty."""
RETRY_FOR_S = 600.0
"""How long a pass asked for by a fault keeps trying while the homeserver does not answer."""

SWEEP = "periodic sweep"
START_UP = "start-up"

Viewers = Callable[[str], Awaitable[list[str]]]
"""The users of the bridge who can read a room's timeline, best first (none: not a portal)."""


class HomeserverUnavailable(Exception):
    """The homeserver did not answer a pass: try again later."""

    def __init__(self, reason: str, *, answering: bool = False) -> None:
        super().__init__(reason)
        self.answering = answering
        """It answers, with errors (5xx, 429): transactions may be flowing meanwhile."""


@dataclass
class RoomPass:
    """What one pass found in one room."""

    room_id: str
    missed: int = 0
    pages: int = 0
    complete: bool = False
    """It reached an event held since before the pass (else it ran out of pages)."""


@dataclass
class PassReport:
    reason: str
    rooms: list[RoomPass] = field(default_factory=list)

    @property
    def missed(self) -> int:
        return sum(r.missed for r in self.rooms)


class Reconciler:
    def __init__(
        self,
        inbox: InboxStore,
        homeserver: Homeserver,
        viewers: Viewers,
        on_stored: Callable[[], None],
        config: ReconcileConfig,
    ) -> None:
        self.inbox = inbox
        self.hs = homeserver
        self._viewers = viewers
        self._on_stored = on_stored
        self.config = config
        self._lock = asyncio.Lock()
        self._open = asyncio.Event()
        self._open.set()
        self._holds = 0
        self._requested: str | None = None
        self._runner: asyncio.Task[None] | None = None
        self._sweeper = Periodic(
            "periodic reconciliation",
            lambda: self.run(SWEEP),
            config.interval_s,
            log,
            # The homeserver down: its return asks for a pass of its own.
            quiet=(HomeserverUnavailable,),
        )
        self._verified: dict[str, int] = {}
        """Per room, the inbox seq of an event up to which its timeline is known to be held."""
        self.passes = 0

    # Lifecycle ---------------------------------------------------------------------------------

    def hold(self) -> None:
        """Incoming transactions wait (see ``wait_open``) until the start-up pass is done."""
        self._close()

    async def start(self) -> None:
        """The start-up pass (what was missed while the bridge was away), then the sweep."""
        try:
            await self.run(START_UP)
        except Exception as error:  # never a reason not to start: the sweep tries again
            log.warning("The start-up reconciliation failed (%s)", type(error).__name__)
        finally:
            self._release()
        with contextlib.suppress(Exception):
            await self.inbox.forget_transactions(now_ms() - TRANSACTION_IDS_KEPT_MS)
        self._sweeper.start()

    async def stop(self) -> None:
        await self._sweeper.stop()
        if self._runner is not None:
            await cancel_and_wait(self._runner)
        self._runner = None
        self._open.set()

    # Triggers ----------------------------------------------------------------------------------

    def request(self, reason: str) -> None:
        """A fault may have lost events: reconcile soon, holding new transactions meanwhile."""
        if self._requested is None and (self._runner is None or self._runner.done()):
            self._close()
            self._requested = reason
            self._runner = asyncio.create_task(self._run_requested(), name="reconcile")
        elif self._requested is None:
            self._requested = reason  # after the pass running now: it may have started too early

    async def wait_open(self) -> None:
        """Before storing a transaction: wait for a pass a fault asked for (bounded: a pass
        that hangs must not make the homeserver give up on its transaction)."""
        if self._open.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.hold_transactions_s):
                await self._open.wait()

    async def run_inline(self, reason: str) -> None:
        """A pass now, bounded in time, for a transaction that waits to be stored after it."""
        try:
            async with asyncio.timeout(self.config.hold_transactions_s):
                await self.run(reason)
        except Exception as error:
            log.warning(
                "Reconciliation (%s) did not finish (%s); trying again in the background",
                reason,
                type(error).__name__,
            )
            self.request(reason)

    # Passes ------------------------------------------------------------------------------------

    async def run(self, reason: str) -> PassReport:
        """One pass over the rooms with recent activity; raises HomeserverUnavailable."""
        async with self._lock:
            self.passes += 1
            began = time.monotonic()
            since = now_ms() - int(self.config.active_within_s * 1000)
            rooms = await self.inbox.active_rooms(since, self.config.max_rooms)
            floor = await self.inbox.max_seq()
            report = PassReport(reason)
            for room_id in rooms:
                try:
                    report.rooms.append(await self._room(room_id, floor))
                except HomeserverUnavailable:
                    raise
                except Exception:  # one room's trouble must not keep the others unread
                    log.exception("Reconciliation of %s failed", room_id)
            for room_id in set(self._verified) - set(rooms):
                del self._verified[room_id]  # not active any more: it starts afresh next time
            if report.missed:
                self._on_stored()
                # At start-up and in a sweep, events whose transaction is on its way (a
                # recoverer's resend, a push in flight) are found too: no fault in itself.
                log.log(
                    logging.INFO if reason in (SWEEP, START_UP) else logging.WARNING,
                    "Reconciliation (%s): %d event(s) the bridge had not received, in %s",
                    reason,
                    report.missed,
                    ", ".join(r.room_id for r in report.rooms if r.missed),
                )
            log.debug(
                "Reconciliation (%s): %d room(s), %d page(s), %.0f ms",
                reason,
                len(rooms),
                sum(r.pages for r in report.rooms),
                (time.monotonic() - began) * 1000,
            )
            return report

    async def _room(self, room_id: str, floor: int) -> RoomPass:
        """Read the room backwards to an event held since before this pass (at or below the
        room's verified point, or ``floor`` when it has none) and store what is missing."""
        found = RoomPass(room_id)
        viewers = await self._viewers(room_id)
        if not viewers:
            return found  # not a portal: nothing of it is bridged
        stop_at = self._verified.get(room_id, floor)
        missing: list[dict[str, Any]] = []
        newest: str | None = None
        bracketed = 0
        """How many of ``missing`` (newest first) are newer than a held event."""
        token: str | None = None
        viewer_index = 0
        while found.pages < self.config.max_pages:
            try:
                page = await self._messages(viewers[viewer_index], room_id, token)
            except MatrixRequestError as error:
                if error.http_status in (401, 403, 404) and viewer_index + 1 < len(viewers):
                    viewer_index += 1  # that user left the room: another one reads it
                    continue
                if error.http_status >= 500 or error.http_status == 429:
                    raise HomeserverUnavailable(
                        f"HTTP {error.http_status}", answering=True
                    ) from None
                log.warning("Cannot read the timeline of %s (%s)", room_id, error.errcode)
                return found
            found.pages += 1
            chunk = [e for e in page.get("chunk") or () if isinstance(e, dict)]
            chunk = [e for e in chunk if isinstance(e.get("event_id"), str)]
            if newest is None and chunk:
                newest = chunk[0]["event_id"]
            held = await self.inbox.held_events([e["event_id"] for e in chunk])
            for event in chunk:
                seq = held.get(event["event_id"])
                if seq is None:
                    missing.append(event)
                elif seq <= stop_at:
                    found.complete = True
                    break
                else:
                    bracketed = len(missing)
            token = page.get("end")
            if found.complete or not chunk or not isinstance(token, str):
                # The start of what the viewer may see counts as reached too.
                found.complete = True
                break
        if not found.complete:
            # Out of pages: only what lies between held events is surely a gap (older events
            # may predate the portal), the rest waits for a later pass.
            log.warning(
                "Reconciliation of %s stopped after %d pages without reaching a known event",
                room_id,
                found.pages,
            )
            missing = missing[:bracketed]
        if missing:
            for event in missing:
                event.setdefault("room_id", room_id)
            found.missed = await self.inbox.store_missed(list(reversed(missing)))
        if found.complete and newest is not None:
            seqs = await self.inbox.held_events([newest])
            if newest in seqs:
                self._verified[room_id] = seqs[newest]
        return found

    async def _messages(self, viewer: str, room_id: str, token: str | None) -> dict[str, Any]:
        try:
            return await self.hs.timeline_page(viewer, room_id, token, self.config.page_size)
        except (MatrixConnectionError, ClientError, TimeoutError) as error:
            raise HomeserverUnavailable(type(error).__name__) from None

    # Background --------------------------------------------------------------------------------

    async def _run_requested(self) -> None:
        holding = True
        try:
            while self._requested is not None:
                reason, self._requested = self._requested, None
                deadline = time.monotonic() + RETRY_FOR_S
                delay = 0.5
                while True:
                    try:
                        await self.run(reason)
                        break
                    except HomeserverUnavailable as error:
                        if error.answering and holding:
                            # Transactions may flow while it fails us: stop holding them.
                            holding = False
                            self._release()
                        if time.monotonic() + delay > deadline:
                            log.warning(
                                "Reconciliation (%s) given up: the homeserver does not answer "
                                "(%s); the sweep will try again",
                                reason,
                                error,
                            )
                            break
                        # While it does not answer at all no transaction comes either: the hold
                        # stays, and a short delay catches its return within the hold's bound.
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 5.0)
                    except Exception:
                        log.exception("Reconciliation (%s) failed", reason)
                        break
        finally:
            if holding:
                self._release()

    def _close(self) -> None:
        self._holds += 1
        self._open.clear()

    def _release(self) -> None:
        self._holds = max(0, self._holds - 1)
        if self._holds == 0:
            self._open.set()


class TransactionWatch:
    """Reads the homeserver's transaction ids for signs that events went missing.

    Synapse numbers transactions 1, 2, 3... and sends them one at a time, in order. An id that
    is not the previous one plus one means a transaction was skipped (stored while the bridge
    was thought down, and never sent) or that the numbering started again (a restart: what it
    held in memory is gone). Either way the timelines are read before the transaction is stored.
    Ids that are not numbers (other homeservers) are only compared with the stored ones.
    """

    def __init__(self, inbox: InboxStore, reconciler: Reconciler) -> None:
        self.inbox = inbox
        self.reconciler = reconciler
        self._last: int | None = None
        self._loaded = False

    async def before_store(
        self, txn_id: str, events: list[dict[str, Any]], ephemeral: list[dict[str, Any]]
    ) -> bool:
        """Wait for a pass in progress and run one if this transaction shows a fault; returns
        whether the numbering started again (to pass to ``stored``)."""
        await self.reconciler.wait_open()
        if not self._loaded:
            self._last = _last_number(await self.inbox.latest_transaction_ids())
            self._loaded = True
        reason, restarted = await self._fault(txn_id, events, ephemeral)
        if reason is not None:
            log.warning("Transaction %s: %s; reading the rooms' timelines first", txn_id, reason)
            await self.reconciler.run_inline(reason)
        return restarted

    def stored(self, txn_id: str, restarted: bool) -> None:
        number = _number(txn_id)
        if number is not None and (restarted or self._last is None or number > self._last):
            self._last = number

    def hung_up(self, txn_id: str) -> None:
        """The homeserver went away before its transaction was answered."""
        log.warning("The homeserver hung up before transaction %s was answered", txn_id)
        self.reconciler.request("the homeserver hung up on a transaction")

    async def _fault(
        self, txn_id: str, events: list[dict[str, Any]], ephemeral: list[dict[str, Any]]
    ) -> tuple[str | None, bool]:
        number, last = _number(txn_id), self._last
        if number is not None and last is not None and number == last + 1:
            return None, False  # the usual case, decided without a look at the database
        seen, all_held = await self.inbox.transaction_check(txn_id, events, ephemeral)
        if seen and all_held:
            return None, False  # sent again: nothing new
        if number is not None and last is not None:
            if number > last + 1:
                return f"transaction ids jumped from {last} to {number}", False
            if all_held:
                return None, False  # a late resend of what the bridge holds already
            return f"transaction ids started again ({number} after {last})", True
        if seen:
            return "a known transaction id brought new events", True
        return None, False


def _number(txn_id: str) -> int | None:
    return int(txn_id) if txn_id.isascii() and txn_id.isdigit() and len(txn_id) < 19 else None


def _last_number(newest_first: list[tuple[str, int]]) -> int | None:
    """The number of the transaction received last (the highest of those received in the same
    millisecond)."""
    numbered = [(at, n) for txn_id, at in newest_first if (n := _number(txn_id)) is not None]
    return max(numbered)[1] if numbered else None
