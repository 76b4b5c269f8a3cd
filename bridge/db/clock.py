"""The one clock of the bridge: integer milliseconds since the epoch for storage (``now_ms``),
and the ``Clock`` a part takes when a test must move its time by hand (grace periods, deadlines).
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (what is stored, compared with stored times)."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go back (deadlines within one run)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: ``time.time``, ``time.monotonic`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


def now_ms(clock: Clock = SYSTEM_CLOCK) -> int:
    return int(clock.now() * 1000)
