"""System messages to vendor users (issue 14 point 4): what the bridge tells a portal room about
its conversation is queued as a ``SystemNotice`` for every open link (but the vendor it is
about), once per notice; the executor uses the vendor's system messages where it has them, else
a message from "EIMIS"."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from mautrix.util.async_db import Database

from bridge.config import MediaConfig
from bridge.core import operations as op
from bridge.core.delivery import Delivery
from bridge.core.executors import Delivered, Executors
from bridge.core.members import Member
from bridge.core.send_status import StatusReporter
from bridge.core.system_notices import tell_everyone
from bridge.db.portal import Portal
from bridge.db.stores import Stores
from connectors.base import (
    Capabilities,
    ConnectorError,
    OutboundMessage,
    Sender,
    SystemMessages,
    derive_capabilities,
)

BOT = "@eimis_bot:eimis.example"
ROOM = "!ward:eimis.example"
EIMIS = Sender(mxid=BOT, display_name="EIMIS")


class Vendor:
    def __init__(self, capabilities: Capabilities) -> None:
        self.capabilities = capabilities
        self.calls: list[tuple[Any, ...]] = []

    async def send_message(self, conversation_id: str, message: OutboundMessage) -> str:
        self.calls.append(("send", conversation_id, message.sender, message.text))
        return f"m-{len(self.calls)}"

    async def send_system_message(self, conversation_id: str, text: str, request_id: str) -> None:
        self.calls.append(("system", conversation_id, text, request_id))


@pytest.fixture
async def stores(db: Database) -> Stores:
    stores = Stores.of(db)
    await stores.portals.create(Portal(ROOM, None, False, BOT))
    await stores.portals.add_link(ROOM, "pl", "conv-pl")
    await stores.portals.add_link(ROOM, "mp", "conv-mp")
    await stores.portals.add_link(ROOM, "gone", "conv-gone")
    await stores.portals.close_link(ROOM, "gone")
    return stores


def executors(stores: Stores, vendors: dict[str, Vendor]) -> Executors:
    hs = SimpleNamespace(config=SimpleNamespace(bot_mxid=BOT))
    return Executors(
        stores,
        hs,  # type: ignore[arg-type]
        vendors,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        MediaConfig(),
        SimpleNamespace(),  # type: ignore[arg-type]
    )


def test_the_capability_is_derived_from_the_class() -> None:
    assert Capabilities().system_messages is False
    assert derive_capabilities(SystemMessages, Capabilities()).system_messages is True
    assert derive_capabilities(object, Capabilities()).system_messages is False


async def test_a_notice_is_queued_once_for_every_open_link_but_the_one_it_is_about(
    stores: Stores,
) -> None:
    text = "Un message n'a pas pu être remis à mp : refusé"
    assert await tell_everyone(stores, ROOM, text, key="t1", exclude=("mp",)) == ["pl"]
    # A retry of what posted the notice queues nothing twice.
    assert await tell_everyone(stores, ROOM, text, key="t1", exclude=("mp",)) == []
    pending = await stores.outbox.pending(0, 100)
    assert [(i.connector, i.operation, i.dedup_key) for i in pending] == [
        ("pl", op.SYSTEM_NOTICE, "system:t1")
    ]
    assert op.from_stored(pending[0].operation, pending[0].payload) == op.SystemNotice(
        event_id="system:t1", text=text
    )
    # Without exclusion every open link is told (a closed one is not).
    assert sorted(await tell_everyone(stores, ROOM, "x", key="t2")) == ["mp", "pl"]


async def test_the_executor_uses_system_messages_or_the_eimis_stand_in(stores: Stores) -> None:
    with_system = Vendor(Capabilities(system_messages=True))
    without = Vendor(Capabilities(replies=True))
    run = executors(stores, {"pl": with_system, "mp": without}).run
    notice = op.SystemNotice(event_id="system:k", text="Impossible d'ajouter : X.")
    assert await run("pl", ROOM, notice) == Delivered("conv-pl")
    assert with_system.calls == [("system", "conv-pl", "Impossible d'ajouter : X.", "system:k")]
    assert await run("mp", ROOM, notice) == Delivered("conv-mp")
    assert without.calls == [("send", "conv-mp", EIMIS, "Impossible d'ajouter : X.")]


class Voice:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def send_event(
        self, sender: str, room_id: str, event_type: str, content: dict[str, Any], *, txn_id: str
    ) -> str:
        self.sent.append((event_type, content))
        return f"$e{len(self.sent)}"


async def test_a_message_that_failed_at_one_vendor_is_told_to_the_others_in_french(
    stores: Stores,
) -> None:
    hs = Voice()
    status = StatusReporter(stores, hs, {})  # type: ignore[arg-type]
    for _ in range(2):  # a retry of the report queues nothing twice
        await status.report(
            room_id=ROOM,
            event_id="$m",
            sender=Member("@alice:eimis.example", "Alice"),
            target="mp",
            outcome="FAIL_PERMANENT",
            detail="fichier trop gros",
        )
    [item] = await stores.outbox.pending(0, 100)
    assert item.connector == "pl", "not told to mp, whose users never had the message"
    notice = op.from_stored(item.operation, item.payload)
    assert notice == op.SystemNotice(
        event_id=notice.event_id,  # type: ignore[union-attr]
        text="Un message n'a pas pu être remis à mp : fichier trop gros",
    )
    bodies = [c.get("body") for t, c in hs.sent if t == "m.room.message"]
    assert bodies == ["Un message n'a pas pu être remis à mp : fichier trop gros"] * 2


async def test_a_system_message_refused_for_good_is_told_to_nobody(stores: Stores) -> None:
    class Refusing(Vendor):
        async def send_system_message(
            self, conversation_id: str, text: str, request_id: str
        ) -> None:
            raise ConnectorError("no", retriable=False)

    hs = Voice()
    hs.config = SimpleNamespace(bot_mxid=BOT)  # type: ignore[attr-defined]
    vendors = {"pl": Refusing(Capabilities(system_messages=True))}
    status = StatusReporter(stores, hs, vendors)  # type: ignore[arg-type]
    delivery = Delivery(
        stores,
        hs,  # type: ignore[arg-type]
        vendors,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        MediaConfig(),
        status,
        portals=SimpleNamespace(),  # type: ignore[arg-type]
    )
    await tell_everyone(stores, ROOM, "Impossible d'ajouter : X.", key="k", exclude=("mp",))
    [item] = await stores.outbox.pending(0, 10)
    await delivery.handle(item)
    assert await stores.outbox.pending(0, 10) == [], "failed, not queued again"
    assert hs.sent == [], "no notice about a notice, no system message about it"
