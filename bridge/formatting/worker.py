"""Conversions of large content off the event loop: in a worker process, with a time limit and a
memory limit, so that no message can freeze the bridge or grow it without bound.

Small content (at most ``OFF_LOOP_CHARS`` characters) is converted in place: its conversion is
bounded by its size (``bridge.formatting.limits``) and a round trip to the worker would cost
more. Larger content goes to one worker process (started on first use), one conversion at a
time; past ``TIME_LIMIT_S`` (counted in the worker, by a timer signal) or ``MEMORY_LIMIT_BYTES``
of address space, the conversion fails with ``ConversionFailed`` and the caller falls back to a
plain rendering. A worker that does not answer in time is killed and replaced.

The worker is started with multiprocessing's "spawn": like any such program, a script that runs
the bridge in its own process must guard its main code with ``if __name__ == "__main__"``
(``python -m bridge`` and the ``eimis-bridge`` command do); else the worker fails to start and
large messages go as plain text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import resource
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

OFF_LOOP_CHARS = 4096
"""Content longer than this is converted in the worker process."""
TIME_LIMIT_S = 5.0
"""A conversion taking longer fails (and the message is rendered as plain text)."""
MEMORY_LIMIT_BYTES = 1024 * 1024 * 1024
"""The worker process's address space (a conversion needing more fails the same way)."""
_STARTUP_GRACE_S = 30.0  # starting the worker (imports) and a busy machine, on top of the limit


class ConversionFailed(Exception):
    """The conversion ran out of time or memory, or its worker died."""


class _TimeLimit(BaseException):
    """Raised in the worker by its timer; a BaseException, so no ``except Exception`` eats it."""


def _init_worker(memory_limit: int) -> None:
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    signal.signal(signal.SIGALRM, _on_alarm)


_expired = False  # in the worker: the current conversion's timer fired


def _on_alarm(signum: int, frame: Any) -> None:
    global _expired
    _expired = True
    raise _TimeLimit


def _call(fn: Callable[..., T], args: tuple[Any, ...], time_limit: float) -> T:
    """In the worker: ``fn(*args)`` under the time limit."""
    global _expired
    _expired = False
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        return fn(*args)
    except MemoryError:
        raise ConversionFailed("memory limit") from None
    except RecursionError:
        raise ConversionFailed("nesting") from None
    except BaseException:
        # The timer's exception, or whatever a library made of it (raised in its callback).
        if _expired:
            raise ConversionFailed("time limit") from None
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class _Worker:
    def __init__(self) -> None:
        self.pool: ProcessPoolExecutor | None = None
        self.lock: asyncio.Lock | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(MEMORY_LIMIT_BYTES,),
            )
        return self.pool

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self.lock is None or self.loop is not loop:
            self.lock, self.loop = asyncio.Lock(), loop
        return self.lock

    def discard(self) -> None:
        """Stops the worker process (killed if busy); the next conversion starts another."""
        pool, self.pool = self.pool, None
        if pool is None:
            return
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., T], args: tuple[Any, ...], time_limit: float) -> T:
        async with self._lock():  # one at a time: the time limit counts the work, not a queue
            try:
                future = self._pool().submit(_call, fn, args, time_limit)
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
                async with asyncio.timeout(time_limit + _STARTUP_GRACE_S):
                    return await asyncio.wrap_future(future)
            except (TimeoutError, BrokenProcessPool) as error:
                self.discard()
                raise ConversionFailed(type(error).__name__) from None


_WORKER = _Worker()


async def run(fn: Callable[..., T], *args: Any, time_limit: float = TIME_LIMIT_S) -> T:
    """``fn(*args)`` in the worker process (``fn`` and ``args`` must pickle); raises
    ``ConversionFailed`` past the time or memory limit. Other exceptions of ``fn`` pass."""
    return await _WORKER.run(fn, args, time_limit)


async def bounded(fn: Callable[..., T], *args: Any, size: int, fallback: Callable[[], T]) -> T:
    """``fn(*args)``: in place for content of ``size`` at most ``OFF_LOOP_CHARS``, else in the
    worker; ``fallback()`` (which must be cheap) when the worker fails."""
    if size <= OFF_LOOP_CHARS:
        return fn(*args)
    try:
        return await run(fn, *args)
    except ConversionFailed as error:
        log.warning("Conversion of %d characters failed (%s): sent as plain text", size, error)
        return fallback()


def shutdown() -> None:
    """Stops the worker process, if one runs."""
    _WORKER.discard()
