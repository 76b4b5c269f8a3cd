"""What the bridge tells a portal room about its conversation, told to the vendor users too.

Every notice about the conversation (someone could not be added, a message could not reach
someone, nobody of a vendor is left ...) also queues a ``SystemNotice`` for each open link of
the portal, so each vendor's users read it in their app. The dedup key derives from the
notice's own key: a retry of what posted the notice queues nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterable

from mautrix.util.async_db import Connection

from bridge.core.operations import SystemNotice
from bridge.db.stores import Stores


async def tell_everyone(
    stores: Stores,
    room_id: str,
    text: str,
    *,
    key: str,
    exclude: Iterable[str] = (),
    conn: Connection | None = None,
) -> list[str]:
    """Queue ``text`` as a system message for the users of every open link of the portal but
    the connectors in ``exclude`` (the vendor the notice is about, when it cannot be told).
    Returns the connectors it was newly queued for."""
    left_out = set(exclude)
    notice = SystemNotice(event_id=f"system:{key}", text=text)
    queued = []
    for link in await stores.portals.open_links(room_id):
        if link.connector in left_out:
            continue
        if await stores.outbox.enqueue(
            link.connector, room_id, notice.kind, notice.event_id, notice.to_json(), conn=conn
        ):
            queued.append(link.connector)
    return queued
