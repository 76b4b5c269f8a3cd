"""Ordered work lanes: items of one lane run one at a time in order; lanes run in parallel.

A lane is a conversation (a portal room, or a vendor conversation, or a (connector, room) pair in
the outbox). The scheduler reads pending items from durable storage in sequence order and hands
them to one task per lane. A failing item blocks its lane (and only its lane) and is retried with
capped exponential backoff and jitter, so order within a conversation holds through outages.
After a restart, everything still pending in storage is read again: handlers are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class LaneItem(Protocol):
    @property
    def seq(self) -> int: ...

    @property
    def lane(self) -> str: ...


T = TypeVar("T", bound=LaneItem)


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.5
    max_s: float = 60.0
    factor: float = 2.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter exponential backoff for the given (1-based) attempt."""
        ceiling = min(self.max_s, self.initial_s * self.factor ** (attempt - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


class LaneScheduler(Generic[T]):
    def __init__(
        self,
        name: str,
        fetch: Callable[[int, int], Awaitable[list[T]]],
        handle: Callable[[T], Awaitable[None]],
        on_error: Callable[[T, Exception], Awaitable[None]],
        *,
        batch_size: int = 200,
        max_buffered: int = 2000,
        poll_interval_s: float = 5.0,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.name = name
        self._fetch = fetch
        self._handle = handle
        self._on_error = on_error
        self._batch_size = batch_size
        self._max_buffered = max_buffered
        self._poll_interval_s = poll_interval_s
        self._backoff = backoff
        self._rng = random.Random()
        self._log = logging.getLogger(f"eimis.lanes.{name}")
        self._cursor = 0
        self._lanes: dict[str, deque[T]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._buffered = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._idle = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None

    # Lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._cursor = 0
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name=f"{self.name}-dispatch")

    async def stop(self) -> None:
        tasks = [t for t in (self._dispatcher, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._dispatcher = None
        self._tasks.clear()
        self._lanes.clear()
        self._buffered = 0

    def notify(self) -> None:
        """New work was stored: look for it now rather than at the next poll."""
        self._wake.set()

    @property
    def buffered(self) -> int:
        return self._buffered

    # Dispatch ----------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                items = await self._fetch(self._cursor, self._batch_size)
            except Exception:
                self._log.exception("Reading pending work failed; trying again")
                await self._sleep_or_wake(self._backoff.max_s / 10)
                continue
            for item in items:
                self._cursor = max(self._cursor, item.seq)
                self._lanes.setdefault(item.lane, deque()).append(item)
                self._buffered += 1
                if item.lane not in self._tasks:
                    self._tasks[item.lane] = asyncio.create_task(
                        self._run_lane(item.lane), name=f"{self.name}-lane"
                    )
            if self._buffered >= self._max_buffered:
                # Bounded memory: wait for lanes to drain before reading more.
                self._drained.clear()
                await self._drained.wait()
                continue
            if len(items) == self._batch_size:
                continue
            await self._sleep_or_wake(self._poll_interval_s)

    async def _sleep_or_wake(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _run_lane(self, lane: str) -> None:
        queue = self._lanes[lane]
        try:
            while queue:
                item = queue[0]
                await self._run_item(item)
                queue.popleft()
                self._buffered -= 1
                if self._buffered < self._max_buffered // 2:
                    self._drained.set()
        finally:
            if not queue:
                self._lanes.pop(lane, None)
            self._tasks.pop(lane, None)

    async def _run_item(self, item: T) -> None:
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
                self._log.warning(
                    "Item %d failed (attempt %d: %s); its conversation waits %.1fs",
                    item.seq,
                    attempt,
                    type(error).__name__,
                    delay,
                )
                with contextlib.suppress(Exception):
                    await self._on_error(item, error)
                await asyncio.sleep(delay)
