"""Building the operators' console (admin room and alerts) over a running bridge."""

from __future__ import annotations

from typing import Any

from bridge.admin.alerts import AlertWatch, Snapshot
from bridge.admin.commands import AdminContext
from bridge.admin.room import AdminRoom
from bridge.config import Config
from bridge.core.connectors import ConnectorSet
from bridge.core.ghost_ids import GhostIds
from bridge.core.health import ConnectorHealth
from bridge.db.stores import Stores
from bridge.matrix.homeserver import Homeserver
from bridge.matrix.media import MediaRepository


class Console:
    """The admin room and its alert watch, started and stopped with the bridge."""

    def __init__(
        self,
        *,
        config: Config,
        stores: Stores,
        homeserver: Homeserver,
        connectors: ConnectorSet,
        health: ConnectorHealth,
        media: MediaRepository,
        ids: GhostIds,
        manager: Any = None,
        erasure: Any = None,
        crypto: Any = None,
        portals: Any = None,
    ) -> None:
        self.context = AdminContext(
            config=config,
            stores=stores,
            homeserver=homeserver,
            connectors=connectors,
            health=health,
            media=media,
            ids=ids,
            manager=manager,
            audit=stores.audit,
            erasure=erasure,
            crypto=crypto,
            portals=portals,
        )
        self.room = AdminRoom(self.context)
        """The admin rooms: ``FromMatrix``'s admin hook (``bridge/core/admin_hook.py``)."""
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
