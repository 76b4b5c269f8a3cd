"""What every test needs, written once: waiting on a condition, a connector's key-value store in
memory, and a clock the test moves by hand.

    from helpers import FakeClock, MemoryStore, settle, wait_until
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

POLL_FIRST_S = 0.005
POLL_MAX_S = 0.1
POLLS_PER_TIMEOUT = 100


class WaitTimeout(AssertionError, TimeoutError):
    """The condition never came true: a test failure, and a ``TimeoutError`` for who waits."""


async def wait_until(
    condition: Callable[[], T | Awaitable[T]], timeout: float = 10.0, what: str = ""
) -> T:
    """Poll ``condition`` (a function, plain or async) until it returns something truthy, and
    return that. After ``timeout`` seconds, fail the test (``WaitTimeout``) naming ``what``.

    The poll starts at once and slows down to every 0.1 s (or a hundredth of a long timeout:
    end-to-end conditions ask real servers). Waiting on a condition, never on a fixed sleep:
    a test that asserts something did NOT happen first waits for something that proves the
    system went past that point.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay, longest = POLL_FIRST_S, max(POLL_MAX_S, timeout / POLLS_PER_TIMEOUT)
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if loop.time() > deadline:
            raise WaitTimeout(
                f"timed out after {timeout:g} s waiting for {what or _name(condition)}"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, longest)


async def settle(rounds: int = 50) -> None:
    """Let every task that is ready run until it blocks (on I/O, a lock, a timer): for a test
    asserting that in-memory work did NOT happen, without waiting real time."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def _name(condition: Callable[..., Any]) -> str:
    return getattr(condition, "__qualname__", None) or repr(condition)


class MemoryStore:
    """A connector's key-value store (``ConnectorContext.store``), in memory."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        return self.data.get(key)

    async def set(self, key: str, value: str) -> None:
        self.data[key] = value


class FakeClock:
    """Time that passes only when the test says so: ``advance(seconds)``.

    It fits both shapes code takes a clock in: ``bridge.db.clock.Clock`` (``now()``,
    ``monotonic()``, one timeline, and ``await sleep(s)``, which returns once the test has
    advanced past it), and a plain ``time.monotonic``-like function (``clock()``). ``step``
    moves it on every reading (a clock racing past, e.g. every token expired before use).
    """

    def __init__(self, start: float = 1000.0, *, step: float = 0.0) -> None:
        self.time = start
        self.step = step
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        self.time += self.step
        self._wake()
        return self.time

    def monotonic(self) -> float:
        return self.now()

    def __call__(self) -> float:
        return self.now()

    def advance(self, seconds: float) -> None:
        """Move time on; whoever sleeps until then wakes up."""
        self.time += seconds
        self._wake()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        woken = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.time + seconds, next(self._order), woken))
        await woken

    @property
    def sleeping(self) -> int:
        """How many sleeps are waiting for the test to move time."""
        return sum(1 for *_, f in self._sleepers if not f.done())

    def _wake(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self.time:
            *_, woken = heapq.heappop(self._sleepers)
            if not woken.done():
                woken.set_result(None)
