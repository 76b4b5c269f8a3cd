"""``SystemNotice`` at a vendor: what the bridge told the portal room, told to the vendor's
users too, as a system message where the vendor has them, else as a message from "EIMIS"."""

from __future__ import annotations

import time
from typing import cast

from bridge.core.executors.context import Context, Target
from bridge.core.executors.outcome import Delivered
from bridge.core.executors.stand_in import eimis, send_stand_in
from bridge.core.operations import SystemNotice
from connectors.base import SystemMessages


async def system_notice(ctx: Context, target: Target, notice: SystemNotice) -> Delivered:
    request_id = notice.event_id  # "system:<the notice's key>"
    if target.caps.system_messages:
        vendor = cast(SystemMessages, target.connector)
        await vendor.send_system_message(target.conversation, notice.text, request_id)
        return Delivered(target.conversation)
    # No message map: the stand-in stands for no Matrix event.
    await send_stand_in(
        target,
        event_id=notice.event_id,
        request_id=request_id,
        sender=eimis(ctx),
        text=notice.text,
        ts=int(time.time() * 1000),
        about=None,
    )
    return Delivered(target.conversation)
