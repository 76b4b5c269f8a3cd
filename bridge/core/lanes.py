"""Ordered work lanes: items of one lane run one at a time in order; lanes run in parallel.

A lane is a conversation (a portal room, a vendor conversation, or a (connector, room) pair in
the outbox). The scheduler reads pending items from durable storage in sequence order and hands
them to one task per lane. A failing item blocks its lane (and only its lane) and is retried with
capped exponential backoff and jitter, so order within a conversation holds through outages.
After a restart, everything still pending in storage is read again: handlers are idempotent.

Memory is bounded twice: at most ``max_buffered`` items in all (a lane refilling itself may add
one more), and at most ``lane_cap`` per lane. A lane that reaches its cap stops being fed by the
shared reader and refills itself from storage once it has drained, so a conversation stuck
behind a vendor outage holds ``lane_cap`` items, not the whole buffer, and the other
conversations keep flowing.

The source must expose items in seq order: an item with a lower seq never becomes visible after
one with a higher seq (the stores serialise their appends to guarantee it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from bridge.logs import log_context
from connectors.kit.backoff import Backoff
from connectors.kit.tasks import cancel_and_wait


class LaneItem(Protocol):
    @property
    def seq(self) -> int: ...

    @property
    def lane(self) -> str: ...


T = TypeVar("T", bound=LaneItem)


DEFAULT_BACKOFF = Backoff(initial_s=0.5, max_s=60.0)
"""A failing item waits 0.5 s, doubling to at most a minute, with jitter."""


@dataclass
class _Lane(Generic[T]):
    queue: deque[T] = field(default_factory=deque)
    tail_seq: int = 0
    """Highest seq ever queued in this lane."""
    overflowing: bool = False
    """Items of this lane were left in storage; the lane reads them itself once drained."""


class LaneScheduler(Generic[T]):
    def __init__(
        self,
        name: str,
        fetch: Callable[[int, int], Awaitable[list[T]]],
        handle: Callable[[T], Awaitable[None]],
        on_error: Callable[[T, Exception], Awaitable[None]],
        *,
        fetch_lane: Callable[[str, int, int], Awaitable[list[T]]] | None = None,
        batch_size: int = 200,
        max_buffered: int = 4096,
        lane_cap: int = 32,
        poll_interval_s: float = 5.0,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self.name = name
        self._fetch = fetch
        self._fetch_lane = fetch_lane
        self._handle = handle
        self._on_error = on_error
        self._batch_size = max(1, batch_size)
        self._max_buffered = max(1, max_buffered)
        # Without a per-lane reader, a lane cannot leave items behind: no cap then.
        # A lane may hold at most half the buffer, so stuck lanes cannot starve the others.
        self._lane_cap = (
            max(1, min(lane_cap, self._max_buffered // 2)) if fetch_lane is not None else None
        )
        self._poll_interval_s = poll_interval_s
        self._backoff = backoff
        self._rng = random.Random()
        self._log = logging.getLogger(f"eimis.lanes.{name}")
        self._cursor = 0
        self._lanes: dict[str, _Lane[T]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._buffered = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._retry_now: dict[str, asyncio.Event] = {}
        self._dispatcher: asyncio.Task[None] | None = None

    # Lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._cursor = 0
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name=f"{self.name}-dispatch")

    async def stop(self) -> None:
        tasks = [t for t in (self._dispatcher, *self._tasks.values()) if t is not None]
        await cancel_and_wait(tasks)
        self._dispatcher = None
        self._tasks.clear()
        self._lanes.clear()
        self._buffered = 0

    async def reread(self) -> None:
        """Forget everything read ahead (items in hand are given up, to be read again) and
        read storage anew: work taken back from storage (an erasure) must not run from memory.
        Nothing happens when the scheduler is not running."""
        if self._dispatcher is None:
            return
        await self.stop()
        self.start()

    def notify(self) -> None:
        """New work was stored: look for it now rather than at the next poll."""
        self._wake.set()

    def retry_now(self, lane_prefix: str = "") -> None:
        """Lanes waiting to retry (whose name starts with ``lane_prefix``) try again at once:
        e.g. all of a connector's conversations when its vendor answers again."""
        for lane, event in self._retry_now.items():
            if lane.startswith(lane_prefix):
                event.set()

    def drop_backlog(self, lane_name: str) -> None:
        """Forget what this lane has read ahead (it stays in storage): after a dead letter,
        the rest of the conversation must wait, and is read again once released."""
        lane = self._lanes.get(lane_name)
        if lane is None or not lane.queue:
            return
        current = lane.queue[0]
        dropped = len(lane.queue) - 1
        lane.queue.clear()
        lane.queue.append(current)
        lane.tail_seq = current.seq
        lane.overflowing = False
        self._buffered -= dropped

    @property
    def buffered(self) -> int:
        return self._buffered

    # Dispatch ----------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            room = self._max_buffered - self._buffered
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            self._wake.clear()
            try:
                items = await self._fetch(self._cursor, min(self._batch_size, room))
            except Exception:
                self._log.exception("Reading pending work failed; trying again")
                await self._sleep_or_wake(min(self._backoff.max_s, 5.0))
                continue
            for item in items:
                self._cursor = max(self._cursor, item.seq)
                self._offer(item)
            if len(items) == min(self._batch_size, room):
                continue
            if not items:
                # Idle: read everything pending again next time, so work released behind the
                # cursor (a dead letter retried or discarded, by another process) is found.
                self._cursor = 0
            await self._sleep_or_wake(self._poll_interval_s)

    def _offer(self, item: T) -> None:
        lane = self._lanes.get(item.lane)
        if lane is None:
            lane = self._lanes[item.lane] = _Lane()
        if item.seq <= lane.tail_seq:
            return  # the lane already read it itself
        if lane.overflowing:
            return  # left in storage; the lane reads it when it has drained
        if self._lane_cap is not None and len(lane.queue) >= self._lane_cap:
            lane.overflowing = True
            return
        self._queue(item.lane, lane, item)

    def _queue(self, name: str, lane: _Lane[T], item: T) -> None:
        lane.queue.append(item)
        lane.tail_seq = item.seq
        self._buffered += 1
        if name not in self._tasks:
            self._tasks[name] = asyncio.create_task(self._run_lane(name), name=f"{self.name}-lane")

    async def _sleep_or_wake(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _run_lane(self, name: str) -> None:
        lane = self._lanes[name]
        try:
            while True:
                if not lane.queue and not (lane.overflowing and await self._refill(name, lane)):
                    break
                item = lane.queue[0]
                await self._run_item(item)
                lane.queue.popleft()
                self._buffered -= 1
                if self._buffered <= self._max_buffered // 2:
                    self._room.set()
        finally:
            self._tasks.pop(name, None)
            if not lane.queue and not lane.overflowing:
                self._lanes.pop(name, None)

    async def _refill(self, name: str, lane: _Lane[T]) -> bool:
        """Read this lane's items that the shared reader left in storage; False when none."""
        assert self._fetch_lane is not None and self._lane_cap is not None
        while True:
            try:
                room = max(1, min(self._lane_cap, self._max_buffered - self._buffered))
                items = await self._fetch_lane(name, lane.tail_seq, room)
                break
            except Exception:
                self._log.exception("Reading a conversation's pending work failed; trying again")
                await asyncio.sleep(min(self._backoff.max_s, 5.0))
        # No await from here on: the shared reader cannot interleave with the hand-over.
        for item in items:
            self._queue(name, lane, item)
        if len(items) < room:
            lane.overflowing = False
        return bool(items)

    async def _run_item(self, item: T) -> None:
        # Every record logged while the item is in hand names it: {"inbox": seq} / {"outbox": seq}.
        with log_context(**{self.name: item.seq}):
            await self._run_item_in_context(item)

    async def _run_item_in_context(self, item: T) -> None:
        attempt = 0
        while True:
            try:
                await self._handle(item)
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:
                attempt += 1
                delay = self._backoff.delay(attempt, self._rng)
                retry_after = getattr(error, "retry_after", None)
                if isinstance(retry_after, int | float) and retry_after > delay:
                    delay = float(retry_after)  # the other side asked for at least this long
                self._log.warning(
                    "Item %d failed (attempt %d: %s); its conversation waits %.1fs",
                    item.seq,
                    attempt,
                    type(error).__name__,
                    delay,
                    # The traceback only at DEBUG: exception texts may quote what was processed.
                    exc_info=self._log.isEnabledFor(logging.DEBUG),
                )
                with contextlib.suppress(Exception):
                    await self._on_error(item, error)
                wake = self._retry_now.setdefault(item.lane, asyncio.Event())
                wake.clear()
                try:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await wake.wait()
                finally:
                    self._retry_now.pop(item.lane, None)
