"""A polled event feed: read a page after the stored cursor, emit it, then move the cursor.

For a vendor that does not push, the connector polls: at once after a page that may not be the
last, else every ``interval_s``. The cursor is stored only once the page's events are durably
stored (``emit_many`` returned), so a crash or a failed emit re-reads the page, and the bridge
ignores the events it already holds (their ``event_id`` is stable). Any failure (the vendor
down, the store failing) backs off and polls again: the feed never dies until cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from connectors.base import BatchSink, KeyValueStore, RemoteEvent
from connectors.kit.backoff import Backoff


@dataclass(frozen=True)
class Page:
    """One poll's answer."""

    events: Sequence[RemoteEvent]
    """The page's events, in order (those the connector could not parse already left out)."""
    cursor: str
    """Where the next poll starts, as stored."""
    more: bool
    """Another page may follow at once (poll again without waiting)."""


PageReader = Callable[[str], Awaitable[Page]]
"""Reads the page after a cursor (raising if the cursor is not one it can read)."""


class PolledFeed:
    """Polls ``read`` from the cursor kept under ``cursor_key`` in ``store`` (``start`` when
    none is stored yet) until cancelled.

    ``name`` starts every log line (a connector type and id, never content); ``describe`` turns
    a failure into the reason logged (a connector's own messages, else only a type name)."""

    def __init__(
        self,
        *,
        name: str,
        read: PageReader,
        emit: BatchSink,
        store: KeyValueStore,
        interval_s: float,
        backoff: Backoff,
        log: logging.Logger,
        describe: Callable[[BaseException], str] = lambda exc: type(exc).__name__,
        cursor_key: str = "cursor",
        start: str = "",
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self.backoff = backoff
        self.cursor_key = cursor_key
        self.start = start
        self._read = read
        self._emit = emit
        self._store = store
        self._log = log
        self._describe = describe

    async def run(self) -> None:
        """Poll until cancelled (mid-page is safe: the cursor only moves after a whole page)."""
        cursor: str | None = None
        failures = 0
        while True:
            try:
                if cursor is None:
                    stored = await self._store.get(self.cursor_key)
                    cursor = self.start if stored is None else stored
                page = await self.poll_once(cursor)
            except Exception as exc:  # noqa: BLE001 - any failure: back off, never die
                # Read the cursor again: the store holds the last one stored (an operator may
                # have fixed one the reader refused).
                cursor = None
                failures += 1
                delay = self.backoff.delay(failures)
                self._log.warning(
                    "%s: polling failed (%s), attempt %d, retrying in %.1f s",
                    self.name,
                    self._describe(exc),
                    failures,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            cursor = page.cursor
            if failures:
                self._log.info("%s: polling recovered after %d failures", self.name, failures)
                failures = 0
            if not page.more:
                await asyncio.sleep(self.interval_s)

    async def poll_once(self, cursor: str) -> Page:
        """Read one page, emit it in order, then store its cursor (when it moved)."""
        page = await self._read(cursor)
        await self._emit(page.events)
        if page.cursor != cursor:
            await self._store.set(self.cursor_key, page.cursor)
        return page
