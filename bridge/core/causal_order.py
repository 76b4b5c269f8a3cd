"""Causal order across a federation: no room event reaches a vendor before the events it follows.

Over federation the bridge's homeserver can hold an event before the events it follows. Synapse,
for one, prunes a long incoming queue to its newest events, stores them with a gap behind them,
and fetches the events of the gap afterwards; it then pushes those to the bridge *after* the
later ones. Forwarded as pushed, a vendor would read an answer before its question.

The room graph says what follows what. In the federation event format (a ``/messages`` filter
with ``event_format: federation``) each event names the events it follows (``prev_events``), and
``/messages`` lists the timeline newest first in graph order. So, when a transaction brings an
event sent from another server (or one for a room that is waiting already), the room is read
backwards from its live end, following ``prev_events``, down to events the inbox holds and has
put in order (pending, done or failed):

- **complete**: every event the new ones follow is held or was found. The room's unheld events,
  its waiting rows and the transaction's own go into the inbox in timeline order, oldest first
  (``InboxStore.settle``); the transaction then adds nothing more for that room.
- **a gap**: an event they follow is not on the homeserver yet. The transaction's rows for that
  room are stored *waiting* (durable, acknowledged, not processed), and so is whatever comes for
  the room after them. The room is read again when a transaction brings it news, else after a
  short delay (reading ``/messages`` is also what makes Synapse fetch missing history), and
  settles as soon as the gap is filled, or at ``reconcile.gap_wait_s`` at the latest. Then what is
  held goes in timeline order, and an event that comes later still is delivered after it: late,
  logged, but never lost and never twice.

Only events the graph ties to what the bridge holds are stored: the read stops at held events
once nothing it found still points below them, so history from before a portal existed (and what
its viewer may not see) is never bridged. Rooms with senders of the bridge's own server only are
never read: a homeserver stores its own users' events in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientError
from mautrix.errors import MatrixConnectionError, MatrixRequestError

from bridge.config import ReconcileConfig
from bridge.core.reconcile import HomeserverUnavailable
from bridge.db.clock import SYSTEM_CLOCK, Clock, now_ms
from bridge.db.inbox import WAITING, InboxStore
from bridge.matrix.homeserver import Homeserver
from connectors.kit.tasks import cancel_and_wait

log = logging.getLogger("eimis.order")

Viewers = Callable[[str], Awaitable[list[str]]]
"""The users of the bridge who can read a room's timeline, best first (none: not a portal)."""

FEDERATION_ONLY = ("auth_events", "prev_events", "hashes", "signatures", "depth", "origin")
"""Keys of the federation format that the client format does not have."""
DEPTH_SLACK = 50
"""How far below the newest place a missing event could be the read goes before calling it a
gap (events that join two branches may follow an older one)."""
RETRY_DELAYS_S = (0.1, 0.25, 0.5, 1.0)
"""Delays between reads of a waiting room (the last repeats) when no transaction brings news."""


@dataclass
class Walk:
    """What one backwards read of a room found."""

    found: list[dict[str, Any]] = field(default_factory=list)
    """Events not yet put in order (unheld, waiting, or this transaction's), newest first."""
    missing: set[str] = field(default_factory=set)
    """Events the found ones follow that the homeserver does not show."""
    pages: int = 0

    def oldest_first(self, incoming: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """The found events, oldest first, in the client format (a transaction's own copy where
        it has one)."""
        return [incoming.get(e["event_id"]) or client_format(e) for e in self.found[::-1]]


@dataclass(frozen=True)
class Admission:
    """What ``before_store`` did for a transaction."""

    park: frozenset[str]
    """Rooms whose rows in the transaction must wait."""
    stored: int
    """Events it stored itself, in timeline order (the transaction's own among them)."""


class CausalOrder:
    def __init__(
        self,
        inbox: InboxStore,
        homeserver: Homeserver,
        viewers: Viewers,
        own_server: str,
        on_stored: Callable[[], None],
        config: ReconcileConfig,
        lock: asyncio.Lock,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.inbox = inbox
        self.hs = homeserver
        self._viewers = viewers
        self._own = own_server
        self._on_stored = on_stored
        self.config = config
        self.clock = clock
        self.lock = lock
        """Held while a transaction is stored (the appservice server's), and by every settle."""
        self._waiting: dict[str, _Waiting] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.gaps = 0
        """Rooms held because of a gap, since start."""
        self.released_at_deadline = 0
        """Of those, how many were released with the gap still open."""

    @property
    def enabled(self) -> bool:
        return self.config.gap_wait_s > 0

    def waiting_rooms(self) -> list[str]:
        return list(self._waiting)

    # Lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Rooms left waiting by a previous run wait the rest of their time, then the loop."""
        for room_id, since_ms in (await self.inbox.waiting_rooms()).items():
            waited_s = max(0.0, (now_ms() - since_ms) / 1000)
            self._waiting[room_id] = _Waiting(
                deadline=self.clock.monotonic() + max(0.0, self.config.gap_wait_s - waited_s)
            )
        if self._waiting:
            log.info("%d room(s) still wait for events before their latest", len(self._waiting))
        self._task = asyncio.create_task(self._loop(), name="causal-order")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    # Transactions ------------------------------------------------------------------------------

    async def before_store(self, events: list[dict[str, Any]]) -> Admission:
        """For a transaction about to be stored (``lock`` held by the caller): put in order the
        rooms it brings remote events for, and say which rooms must wait."""
        rooms: dict[str, dict[str, dict[str, Any]]] = {}
        for event in events:
            room_id = event["room_id"]
            if room_id in self._waiting or (self.enabled and self._remote(event["sender"])):
                rooms.setdefault(room_id, {})[event["event_id"]] = event
        park: set[str] = set()
        stored = 0
        for room_id, incoming in rooms.items():
            if room_id in self._waiting:
                park.add(room_id)  # behind what waits already; the loop reads it again now
                self._waiting[room_id].news = True
                self._wake.set()
                continue
            try:
                # Bounded: a homeserver that is slow to answer must not make it give up on its
                # transaction (it would send it again, and wait again).
                async with asyncio.timeout(self.config.hold_transactions_s):
                    walk = await self._walk(room_id, incoming)
            except (HomeserverUnavailable, TimeoutError) as error:
                # Cannot look: store as pushed (the reconciler's sweep still finds what is lost).
                log.warning("Cannot read %s to order it (%s)", room_id, type(error).__name__)
                continue
            if walk is None:
                continue
            if walk.missing:
                park.add(room_id)
                self._hold(room_id, walk)
                continue
            stored += await self.inbox.settle(room_id, walk.oldest_first(incoming))
        if stored:
            self._on_stored()
        return Admission(frozenset(park), stored)

    def _hold(self, room_id: str, walk: Walk) -> None:
        self.gaps += 1
        now = self.clock.monotonic()
        self._waiting[room_id] = _Waiting(
            deadline=now + self.config.gap_wait_s, next_read=now + RETRY_DELAYS_S[0]
        )
        self._wake.set()
        log.info(
            "Room %s: %d event(s) the latest follow are not on the homeserver yet; holding the "
            "room's events until they are (at most %.0f s)",
            room_id,
            len(walk.missing),
            self.config.gap_wait_s,
        )

    # Waiting rooms -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self.clock.monotonic()
            due = [
                room_id
                for room_id, waiting in self._waiting.items()
                if waiting.news or waiting.next_read <= now or waiting.deadline <= now
            ]
            for room_id in due:
                try:
                    async with self.lock:
                        await self._read_again(room_id)
                except Exception:  # one room's trouble must not keep the others waiting
                    log.exception("Reading the waiting room %s failed", room_id)
                    waiting = self._waiting.get(room_id)
                    if waiting is not None:
                        waiting.later(self.clock.monotonic())
            if self._waiting:
                soonest = min(min(w.next_read, w.deadline) for w in self._waiting.values())
                self._wake.clear()
                await self._woken_or_slept(max(0.0, soonest - self.clock.monotonic()))

    async def _woken_or_slept(self, seconds: float) -> None:
        """Until ``_wake`` is set or ``seconds`` have passed on the clock."""
        woken = asyncio.ensure_future(self._wake.wait())
        slept = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            await asyncio.wait((woken, slept), return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            slept.cancel()

    async def _read_again(self, room_id: str) -> None:
        waiting = self._waiting.get(room_id)
        if waiting is None:
            return
        waiting.news = False
        expired = waiting.deadline <= self.clock.monotonic()
        try:
            walk = await self._walk(room_id, {})
        except HomeserverUnavailable:
            if not expired:
                waiting.later(self.clock.monotonic())
                return
            walk = None  # past its time: release in the order stored
        if walk is not None and walk.missing and not expired:
            waiting.later(self.clock.monotonic())
            return
        released = await self.inbox.settle(room_id, walk.oldest_first({}) if walk else [])
        del self._waiting[room_id]
        if walk is not None and walk.missing:
            self.released_at_deadline += 1
            log.warning(
                "Room %s: %d event(s) still missing after %.0f s; its held events go on now, "
                "in timeline order (a missing one is delivered when it arrives, late)",
                room_id,
                len(walk.missing),
                self.config.gap_wait_s,
            )
        else:
            log.info("Room %s: the gap is filled; its held events go on, in order", room_id)
        if released or walk is None or walk.found:
            self._on_stored()

    # Reading a room ----------------------------------------------------------------------------

    async def _walk(self, room_id: str, incoming: dict[str, dict[str, Any]]) -> Walk | None:
        """Read the room backwards (see the module's docstring); None: it cannot be read (not a
        portal, or the homeserver refuses), so there is nothing to order."""
        viewers = await self._viewers(room_id)
        if not viewers:
            return None
        walk = Walk()
        needed: dict[str, int] = {}
        """Events found ones follow, not yet seen: the highest depth each can have."""
        seen: set[str] = set()
        anchored = False
        floor: int | None = None
        """The lowest depth of an event held in order that the read passed."""
        token: str | None = None
        viewer_index = 0
        while walk.pages < self.config.max_pages:
            try:
                page = await self.hs.timeline_page(
                    viewers[viewer_index],
                    room_id,
                    token,
                    self.config.page_size,
                    federation_format=True,
                )
            except MatrixRequestError as error:
                if error.http_status in (401, 403, 404) and viewer_index + 1 < len(viewers):
                    viewer_index += 1
                    continue
                if error.http_status >= 500 or error.http_status == 429:
                    raise HomeserverUnavailable(f"HTTP {error.http_status}") from None
                log.warning("Cannot read the timeline of %s (%s)", room_id, error.errcode)
                return None
            except (MatrixConnectionError, ClientError, TimeoutError) as error:
                raise HomeserverUnavailable(type(error).__name__) from None
            walk.pages += 1
            chunk = [
                e
                for e in page.get("chunk") or ()
                if isinstance(e, dict) and isinstance(e.get("event_id"), str)
            ]
            states = await self.inbox.held_states(
                [e["event_id"] for e in chunk] + [p for e in chunk for p in _prevs(e)]
            )
            in_order = _in_order(states, incoming)
            depth = None
            for event in chunk:
                event_id = event["event_id"]
                seen.add(event_id)
                wanted = event_id in needed or not anchored
                needed.pop(event_id, None)
                depth = _depth(event)
                if in_order(event_id):
                    anchored = True
                    if depth is not None:
                        floor = depth if floor is None else min(floor, depth)
                elif wanted:
                    walk.found.append(event)
                    for prev in _prevs(event):
                        if prev not in seen and not in_order(prev):
                            bound = depth - 1 if depth is not None else 0
                            needed[prev] = max(needed.get(prev, bound), bound)
                if anchored and not needed:
                    return walk
            token = page.get("end")
            if not chunk or not isinstance(token, str):
                # The start of what the viewer may see. What is still missing there and would
                # lie above an event held in order is a gap; below, it is history the viewer
                # may not see (from before the portal), not the bridge's to wait for.
                walk.missing = {
                    p for p, bound in needed.items() if floor is not None and bound > floor
                }
                return walk
            if (
                depth is not None
                and needed
                and all(depth < bound - DEPTH_SLACK for bound in needed.values())
            ):
                break  # well below where they would be: the homeserver does not have them
        if not needed and not anchored:
            return walk  # out of pages above anything held: order what was found
        walk.missing = set(needed)
        return walk

    def _remote(self, sender: str) -> bool:
        return sender.partition(":")[2] != self._own


@dataclass
class _Waiting:
    deadline: float
    next_read: float = 0.0
    attempt: int = 0
    news: bool = False

    def later(self, now: float) -> None:
        delay = RETRY_DELAYS_S[min(self.attempt, len(RETRY_DELAYS_S) - 1)]
        self.attempt += 1
        self.next_read = now + delay


def _in_order(states: dict[str, str], incoming: dict[str, dict[str, Any]]) -> Callable[[str], bool]:
    """Whether an event is held and put in order already (pending, done or failed)."""

    def in_order(event_id: str) -> bool:
        state = states.get(event_id)
        return state is not None and state != WAITING and event_id not in incoming

    return in_order


def _prevs(event: dict[str, Any]) -> list[str]:
    prevs = event.get("prev_events")
    if not isinstance(prevs, list):
        return []  # a homeserver that ignores the format: the timeline's order is all there is
    # Room versions 1 and 2 list [event_id, hashes] pairs.
    ids = [p[0] if isinstance(p, list) and p else p for p in prevs]
    return [p for p in ids if isinstance(p, str)]


def _depth(event: dict[str, Any]) -> int | None:
    depth = event.get("depth")
    return depth if isinstance(depth, int) and not isinstance(depth, bool) else None


def client_format(event: dict[str, Any]) -> dict[str, Any]:
    """A federation-format event as a client would have received it."""
    return {k: v for k, v in event.items() if k not in FEDERATION_ONLY}
