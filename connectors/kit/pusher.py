"""A sandbox vendor's push to the bridge: queued requests delivered in order, each one again and
again until the bridge answers 2xx.

A vendor that pushes (webhooks) redelivers what was not acknowledged; the sandboxes do so with
this: after a failed attempt (an error status, a refused connection, a timeout) the pusher waits
per its ``Backoff`` (or, when told to honour it, what the receiver's ``Retry-After`` asks within
the backoff's cap) and tries the same request again. ``interrupt`` ends a wait early (the target
changed: no reason to wait for the old one).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from connectors.kit.backoff import Backoff


@dataclass(frozen=True)
class Delivery:
    """One attempt at the request at the head of the queue."""

    url: str
    body: bytes
    headers: Mapping[str, str]
    label: str
    """What the request carries, for logs (ids and counts, never content)."""


class Pusher(abc.ABC):
    """Delivers ``next_delivery()`` until a 2xx, then calls ``delivered()``; forever.

    Subclasses keep the queue: ``next_delivery`` builds the head request (anew for each attempt,
    so a signature can carry a fresh timestamp), None while there is nothing to deliver;
    ``wake`` says there may be now."""

    def __init__(
        self, *, backoff: Backoff, log: logging.Logger, honour_retry_after: bool = False
    ) -> None:
        self.backoff = backoff
        self.honour_retry_after = honour_retry_after
        self._log = log
        self._work = asyncio.Event()
        self._interrupt = asyncio.Event()

    @abc.abstractmethod
    def next_delivery(self) -> Delivery | None:
        """The head request to attempt now, or None when nothing can be delivered."""

    @abc.abstractmethod
    def delivered(self) -> None:
        """The head request was acknowledged: drop it from the queue."""

    def wake(self) -> None:
        """Something may be deliverable now (a new item, a target)."""
        self._work.set()

    def interrupt(self) -> None:
        """End the wait after a failure now, and start the backoff over."""
        self._interrupt.set()
        self._work.set()

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Deliver forever (until cancelled), in order, each request until a 2xx."""
        failures = 0
        while True:
            delivery = self.next_delivery()
            if delivery is None:
                self._work.clear()
                await self._work.wait()
                continue
            delivered, retry_after = await self._attempt(session, delivery, failures + 1)
            if delivered:
                self.delivered()
                failures = 0
                continue
            failures += 1
            delay = self.backoff.delay(failures)
            if self.honour_retry_after and retry_after is not None:
                delay = max(delay, min(retry_after, self.backoff.max_s))
            self._interrupt.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._interrupt.wait()
                failures = 0

    async def _attempt(
        self, session: aiohttp.ClientSession, delivery: Delivery, attempt: int
    ) -> tuple[bool, float | None]:
        """(acknowledged, the receiver's ``Retry-After`` in seconds if it sent one)."""
        retry_after = None
        try:
            async with session.post(
                delivery.url,
                data=delivery.body,
                headers=dict(delivery.headers),
                allow_redirects=False,
            ) as resp:
                delivered = 200 <= resp.status < 300
                status = str(resp.status)
                with contextlib.suppress(ValueError):
                    retry_after = float(resp.headers.get("Retry-After", ""))
        except (aiohttp.ClientError, TimeoutError) as exc:
            delivered, status = False, type(exc).__name__
        if delivered:
            self._log.debug("%s delivered", delivery.label)
        else:
            self._log.info(
                "%s, attempt %d, not acknowledged (%s); will retry",
                delivery.label,
                attempt,
                status,
            )
        return delivered, retry_after
