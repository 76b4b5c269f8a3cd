"""Stopping background tasks without losing the caller's own cancellation.

``task.cancel(); with suppress(CancelledError): await task`` (the usual idiom) also swallows a
cancellation aimed at the caller while it waits: a stop() bounded by a timeout would then return
as if it had finished, leaving the task running. Here the task's own CancelledError is absorbed
and the caller's is passed on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: asyncio.Task[object] | Iterable[asyncio.Task[object]]) -> None:
    """Cancel the tasks and wait until each has ended (their errors are theirs: not raised)."""
    pending = [tasks] if isinstance(tasks, asyncio.Task) else list(tasks)
    for task in pending:
        task.cancel()
    if not pending:
        return
    await asyncio.wait(pending)  # never raises the tasks' errors; raises if we are cancelled
    for task in pending:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log "never retrieved"
