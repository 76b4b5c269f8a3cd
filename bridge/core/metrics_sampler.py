"""What a metrics scrape reads from the running bridge: queue depths, dead letters, connector
states, and counts kept in memory (``bridge/metrics.py`` serves them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from bridge.core.connectors import ConnectorSet
from bridge.core.health import ConnectorHealth
from bridge.core.held_connector import HeldConnector
from bridge.db.stores import Stores
from bridge.metrics import Sample, Sampler


def bridge_sampler(
    stores: Stores,
    connectors: ConnectorSet,
    health: ConnectorHealth,
    *,
    buffered: Callable[[], Mapping[str, int]] = dict,
    untrusted_dropped: Callable[[], int] = lambda: 0,
    crypto: Callable[[], Mapping[str, int]] = dict,
) -> Sampler:
    """The running bridge's state, as a scrape sees it: a few counting queries per scrape,
    none per event. Connectors added at run time appear at the next scrape; a connector is up
    while its vendor answers the deliveries (``ConnectorHealth``) and it is not held."""

    def up(connector_id: str) -> bool:
        """Answering, and running (a held connector, disabled or failing, stands in)."""
        held = isinstance(connectors.get(connector_id), HeldConnector)
        return health.state(connector_id) == "CONNECTED" and not held

    async def sample() -> Sample:
        ids = connectors.ids()
        pending = {c: await stores.outbox.depth(c) for c in ids}
        dead: dict[str, int] = dict.fromkeys(ids, 0)
        for letter in await stores.dead_letters.list():
            dead[letter.connector] = dead.get(letter.connector, 0) + 1
        inbox = {state: await stores.inbox.count(state) for state in ("pending", "waiting")}
        return Sample(
            outbox_pending=pending,
            dead_letters=dead,
            inbox=inbox,
            connectors_up={c: up(c) for c in ids},
            buffered=dict(buffered()),
            untrusted_dropped=untrusted_dropped(),
            crypto=dict(crypto()),
        )

    return sample
