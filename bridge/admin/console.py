"""Building the operators' console (admin room and alerts) over a running bridge."""

from __future__ import annotations

from typing import Any

from bridge.admin.alerts import AlertWatch, Snapshot
from bridge.admin.commands import AdminContext
from bridge.admin.room import AdminRoom


class Console:
    """The admin room and its alert watch, started and stopped with the bridge."""

    def __init__(self, bridge: Any) -> None:
        config = bridge.config
        self.context = AdminContext(
            config=config,
            stores=bridge.stores,
            homeserver=bridge.homeserver,
            connectors=bridge.connectors,
            health=bridge.delivery.health,
            media=bridge.media,
            ids=bridge.ids,
            manager=getattr(bridge, "connector_manager", None),
            audit=getattr(bridge.stores, "audit", None),
            erasure=getattr(bridge, "erasure", None),
        )
        self.room = AdminRoom(self.context)
        self._bridge = bridge
        self.alerts = AlertWatch(
            self.snapshot,
            self.room.post,
            debounce_s=config.admin.notify_debounce_s,
            stalled_after_s=config.admin.stalled_after_s,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.context.config.admin.admins)

    async def snapshot(self) -> Snapshot:
        health = self.context.health
        return Snapshot(
            states={cid: health.state(cid) for cid in self.context.connectors.ids()},
            dead={d.seq: d.connector for d in await self.context.stores.dead_letters.list()},
            heads=await self.context.stores.reports.queue_heads(),
        )

    def start(self) -> None:
        if self.enabled:
            self.alerts.start()

    async def stop(self) -> None:
        await self.alerts.stop()
