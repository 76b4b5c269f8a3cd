"""A bounded read-through cache for rows that only this process writes.

Writers call ``forget`` once their write is committed. A read that was already on its way to the
database when a write was forgotten may carry the old value: it is returned but not kept, so the
cache never holds a value older than the last committed write.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from cachetools import LRUCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ReadThroughCache(Generic[K, V]):
    def __init__(self, size: int) -> None:
        """``size`` 0: nothing is kept (every read goes to the database)."""
        self._data: LRUCache[K, V] = LRUCache(max(size, 1))
        self._keeps = size > 0
        self._generation = 0

    async def get(
        self,
        key: K,
        load: Callable[[], Awaitable[V]],
        keep: Callable[[V], bool] = lambda _: True,
    ) -> V:
        try:
            return self._data[key]
        except KeyError:
            pass
        generation = self._generation
        value = await load()
        if self._keeps and generation == self._generation and keep(value):
            self._data[key] = value
        return value

    def forget(self, key: K) -> None:
        self._generation += 1
        self._data.pop(key, None)

    def clear(self) -> None:
        self._generation += 1
        self._data.clear()
