"""Connector health: is each vendor answering? A down vendor is waited for, not hammered."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

log = logging.getLogger("eimis.health")

State = Literal["CONNECTED", "DOWN", "REJECTED"]
"""DOWN: the vendor does not answer. REJECTED: it answers, refusing the bridge's credentials.
Either way deliveries wait, in order, without spending their retry budgets."""


class ConnectorHealth:
    def __init__(self, on_back: Callable[[str], None]) -> None:
        self._state: dict[str, State] = {}
        self._on_back = on_back

    def state(self, connector: str) -> State:
        return self._state.get(connector, "CONNECTED")

    def unreachable(self, connector: str) -> None:
        if self.state(connector) != "DOWN":
            self._state[connector] = "DOWN"
            log.warning(
                "Connector %s is down (its vendor does not answer); deliveries wait", connector
            )

    def rejected(self, connector: str) -> None:
        if self.state(connector) != "REJECTED":
            self._state[connector] = "REJECTED"
            log.warning(
                "Connector %s: its vendor rejects the bridge's credentials; deliveries wait",
                connector,
            )

    def answered(self, connector: str) -> None:
        if self.state(connector) != "CONNECTED":
            self._state[connector] = "CONNECTED"
            log.info("Connector %s is back; its deliveries resume in order", connector)
            self._on_back(connector)
