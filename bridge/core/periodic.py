"""A background step repeated at an interval until stopped (polls and sweeps).

A failing step is logged (its type only, never what it was working on) and tried again at the
next tick; errors listed in ``quiet`` are expected and pass without a log line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from connectors.kit.tasks import cancel_and_wait


class Periodic:
    def __init__(
        self,
        name: str,
        step: Callable[[], Awaitable[object]],
        interval_s: float,
        log: logging.Logger,
        *,
        at_once: bool = False,
        quiet: tuple[type[Exception], ...] = (),
    ) -> None:
        """``at_once``: the first step runs at start, not after the first interval."""
        self.name = name
        self._step = step
        self.interval_s = interval_s
        self._log = log
        self._at_once = at_once
        self._quiet = quiet
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None and self.interval_s > 0:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def _run(self) -> None:
        if not self._at_once:
            await asyncio.sleep(self.interval_s)
        while True:
            try:
                await self._step()
            except self._quiet:
                pass
            except Exception as error:
                self._log.warning("%s failed (%s); tried again", self.name, type(error).__name__)
            await asyncio.sleep(self.interval_s)
