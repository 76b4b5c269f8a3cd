"""Idempotency keys of the vendor's pushes: a repeat gets the first answer, without new work.

Kept in memory, bounded and for a day: they only spare work and let a vendor tell a repeat from
a new request. What makes a repeat harmless is durable and lives elsewhere: the bridge stores
each (connector, event id) once, so a push repeated after a bridge restart (its key forgotten)
still stores nothing twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_MAX_KEYS = 20_000


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


@dataclass
class _Entry:
    digest: str
    at: float
    answer: Answer | None = None
    """None while the first request with the key is being processed."""


Verdict = Literal["new", "replay", "in_progress", "reused"]


class IdempotencyKeys:
    """Keys seen recently, each with the digest of its request body and its first answer."""

    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def begin(self, key: str, digest: str) -> tuple[Verdict, Answer | None]:
        """What to do with a request carrying ``key`` and a body of ``digest``.

        ``new``: process it (the key is now marked in progress; ``finish`` or ``abandon`` it);
        ``replay``: answer the returned first answer again; ``in_progress``: the first request
        with the key has not finished; ``reused``: the key came with another body.
        """
        self._expire()
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Entry(digest, self._clock())
            while len(self._entries) > self.max_keys:
                self._entries.popitem(last=False)
            return "new", None
        if entry.digest != digest:
            return "reused", None
        if entry.answer is None:
            return "in_progress", None
        return "replay", entry.answer

    def finish(self, key: str, answer: Answer) -> None:
        """Remember the first answer (only answers worth repeating: successes)."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.answer = answer

    def abandon(self, key: str) -> None:
        """Forget a key whose request failed: trying it again must do the work."""
        entry = self._entries.get(key)
        if entry is not None and entry.answer is None:
            del self._entries[key]

    def _expire(self) -> None:
        horizon = self._clock() - self.ttl_s
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.at >= horizon:
                break
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
