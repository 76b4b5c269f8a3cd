"""The running bridge follows the trust list: ``TrustWatcher`` polls the stored run-time list
and calls back when the effective list changes (every portal's ACL follows it).

The values (server names, the list, its ACL) are ``bridge/values/trust.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from bridge.core.periodic import Periodic
from bridge.values.trust import TrustList

log = logging.getLogger("eimis.trust")


class TrustWatcher:
    """Polls the run-time trust list and calls back when the effective list changes.

    ``load`` returns the run-time server names (the table); ``changed`` is awaited after the
    list changed (e.g. to update every portal's ACL). Errors are logged and the poll goes on.
    """

    def __init__(
        self,
        trust: TrustList,
        load: Callable[[], Awaitable[Iterable[str]]],
        changed: Callable[[], Awaitable[None]],
        interval_s: float = 2.0,
    ) -> None:
        self.trust = trust
        self._load = load
        self._changed = changed
        self._poll = Periodic("trust-list poll", self.refresh, interval_s, log, at_once=True)
        self._pending = False
        """The list changed but the callback has not completed yet (it is tried again)."""

    async def refresh(self) -> bool:
        """Read the list once; True (and the callback run) when it changed."""
        if self.trust.replace_extra(await self._load()):
            log.info("Trust list is now: %s", ", ".join(self.trust.servers))
            self._pending = True
        if not self._pending:
            return False
        await self._changed()
        self._pending = False
        return True

    def start(self, *, sweep: bool = True) -> None:
        """Poll from now on; ``sweep``: run the callback once at once even if nothing changed
        (the list may have changed while the bridge was not running)."""
        self._pending = self._pending or sweep
        self._poll.start()

    async def stop(self) -> None:
        await self._poll.stop()
