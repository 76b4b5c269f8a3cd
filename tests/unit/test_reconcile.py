"""Timeline reconciliation: what the homeserver never pushed is found in the rooms' timelines.

A fake homeserver serves ``/messages`` from a list of events per room; the inbox is a real SQLite
one. End to end, through a real Synapse that restarts and loses what it held for the bridge, see
``test_faults.py`` (tests 3 and 6).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp.test_utils import TestClient, TestServer
from mautrix.errors import MatrixConnectionError, make_request_error

from bridge.appservice.server import AppserviceServer
from bridge.config import DatabaseConfig, ReconcileConfig
from bridge.core.reconcile import HomeserverUnavailable, Reconciler, TransactionWatch
from bridge.db.database import open_database
from bridge.db.inbox import InboxStore

from fake_timeline import TimelineServer, page_backwards
from helpers import wait_until

ROOM = "!portal:eimis.example"
VOICE = "@eimis_bot:eimis.example"
GHOST = "@eimis_pandalab_810000001916:eimis.example"
HS_TOKEN = "hs-token-for-tests-0123456789abcdef"


def event(n: int, room: str = ROOM) -> dict[str, Any]:
    return {
        "event_id": f"$event{n}",
        "room_id": room,
        "type": "m.room.message",
        "sender": "@alice:eimis.example",
        "origin_server_ts": 1_700_000_000_000 + n,
        "content": {"msgtype": "m.text", "body": f"secret clinical note {n}"},
    }


class FakeHomeserver(TimelineServer):
    """Serves each room's timeline (oldest first) through ``/messages``, backwards, paged."""

    def __init__(self) -> None:
        self.timelines: dict[str, list[dict[str, Any]]] = {}
        self.refused: set[str] = set()
        """Users answered 403 (not in the room)."""
        self.down = False
        self.reads: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None
        """When set to an unset event, reads wait for it."""
        self.calls = 0
        """``/messages`` requests received (answered or not)."""

    async def called(self, times: int, timeout: float) -> None:
        """Return once ``/messages`` was asked at least ``times`` times."""
        await wait_until(lambda: self.calls >= times, timeout, f"{times} /messages request(s)")

    async def messages(self, viewer: str, path: str, query: dict[str, str]) -> dict[str, Any]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise MatrixConnectionError("Connection refused")
        room_id = unquote(path.split("/rooms/")[1].split("/")[0])
        self.reads.append((viewer, room_id))
        if viewer in self.refused:
            raise make_request_error(403, "", "M_FORBIDDEN", "not in the room")
        return page_backwards(self.timelines.get(room_id, []), query)


class Setup:
    def __init__(self, inbox: InboxStore, homeserver: FakeHomeserver, **config: Any) -> None:
        self.inbox = inbox
        self.hs = homeserver
        self.portals = {ROOM: [VOICE, GHOST]}
        self.notified = 0
        self.reconciler = Reconciler(
            inbox,
            homeserver,  # type: ignore[arg-type]
            self.viewers,
            self.notify,
            ReconcileConfig(**{"page_size": 10, "interval_s": 0, **config}),
        )

    async def viewers(self, room_id: str) -> list[str]:
        return self.portals.get(room_id, [])

    def notify(self) -> None:
        self.notified += 1

    async def stored(self) -> list[str]:
        return [i.payload["event_id"] for i in await self.inbox.pending(0, 1000)]


@pytest.fixture
async def inbox(tmp_path: Path) -> AsyncIterator[InboxStore]:
    db = await open_database(DatabaseConfig(url=f"sqlite:{tmp_path / 'bridge.db'}"))
    try:
        yield InboxStore(db)
    finally:
        await db.stop()


@pytest.fixture
def homeserver() -> FakeHomeserver:
    return FakeHomeserver()


@pytest.fixture
def setup(inbox: InboxStore, homeserver: FakeHomeserver) -> Setup:
    return Setup(inbox, homeserver)


# --- Passes --------------------------------------------------------------------------------------


async def test_a_pass_stores_what_the_homeserver_never_sent_oldest_first(setup: Setup) -> None:
    await setup.inbox.store_transaction("1", [event(1), event(2)])
    setup.hs.timelines[ROOM] = [event(n) for n in range(1, 6)]

    report = await setup.reconciler.run("test")

    assert report.missed == 3
    assert await setup.stored() == ["$event1", "$event2", "$event3", "$event4", "$event5"]
    # Stored as a transaction would have stored them: the late transaction changes nothing.
    items = await setup.inbox.pending(0, 10)
    assert items[2].payload == event(3) and items[2].lane == ROOM
    assert not await setup.inbox.store_transaction("2", [event(3), event(4)])
    assert setup.notified == 1
    # It read back to the first held event: one page, as the portal's voice.
    assert setup.hs.reads == [(VOICE, ROOM)]


async def test_a_pass_that_finds_nothing_missing_stores_nothing(setup: Setup) -> None:
    await setup.inbox.store_transaction("1", [event(1), event(2)])
    setup.hs.timelines[ROOM] = [event(1), event(2)]

    assert (await setup.reconciler.run("test")).missed == 0
    assert await setup.stored() == ["$event1", "$event2"]
    assert setup.notified == 0


async def test_events_lost_before_later_ones_that_arrived_are_found_too(setup: Setup) -> None:
    # A first pass finds the room complete up to event 3.
    await setup.inbox.store_transaction("1", [event(1), event(2), event(3)])
    setup.hs.timelines[ROOM] = [event(n) for n in range(1, 4)]
    await setup.reconciler.run("start-up")
    # Then the homeserver loses 4 and 5 in a restart, and sends 6.
    setup.hs.timelines[ROOM] += [event(4), event(5), event(6)]
    await setup.inbox.store_transaction("1", [event(6)])

    assert (await setup.reconciler.run("periodic sweep")).missed == 2
    # Found late: stored after 6, which was already on its way (see the module's doc on order).
    assert await setup.stored() == [f"$event{n}" for n in (1, 2, 3, 6, 4, 5)]


async def test_a_long_gap_is_read_over_several_pages(setup: Setup) -> None:
    await setup.inbox.store_transaction("1", [event(1)])
    setup.hs.timelines[ROOM] = [event(n) for n in range(1, 26)]

    assert (await setup.reconciler.run("test")).missed == 24
    assert await setup.stored() == [f"$event{n}" for n in range(1, 26)]
    assert len(setup.hs.reads) == 3


async def test_a_room_read_to_its_page_limit_keeps_only_what_lies_between_held_events(
    inbox: InboxStore, homeserver: FakeHomeserver, caplog: pytest.LogCaptureFixture
) -> None:
    setup = Setup(inbox, homeserver, max_pages=2)
    # Nothing held within two pages: events older than anything held may predate the portal.
    await inbox.store_transaction("1", [event(100)])
    homeserver.timelines[ROOM] = [event(n) for n in range(1, 31)]
    assert (await setup.reconciler.run("test")).missed == 0
    assert "stopped after 2 pages" in caplog.text
    # Held events seen on the way frame a gap: what lies between them and the end is stored.
    await inbox.store_transaction("2", [event(25)])
    setup.reconciler._verified[ROOM] = 0  # an earlier pass vouched for nothing that is held
    assert (await setup.reconciler.run("test")).missed == 5
    assert await setup.stored() == ["$event100", "$event25"] + [f"$event{n}" for n in range(26, 31)]


async def test_only_portals_with_recent_activity_are_read(setup: Setup) -> None:
    await setup.inbox.store_transaction("1", [event(1), event(1, "!other:x") | {"event_id": "$o"}])
    setup.hs.timelines[ROOM] = [event(1), event(2)]
    setup.hs.timelines["!other:x"] = [event(3, "!other:x")]

    await setup.reconciler.run("test")

    assert [room for _, room in setup.hs.reads] == [ROOM]  # "!other:x" is no portal
    assert await setup.stored() == ["$event1", "$o", "$event2"]


async def test_a_voice_that_left_the_room_gives_way_to_a_ghost_still_there(setup: Setup) -> None:
    await setup.inbox.store_transaction("1", [event(1)])
    setup.hs.timelines[ROOM] = [event(1), event(2)]
    setup.hs.refused.add(VOICE)

    assert (await setup.reconciler.run("test")).missed == 1
    assert setup.hs.reads == [(VOICE, ROOM), (GHOST, ROOM)]


async def test_a_homeserver_that_does_not_answer_fails_the_pass_for_a_retry(setup: Setup) -> None:
    await setup.inbox.store_transaction("1", [event(1)])
    setup.hs.down = True
    with pytest.raises(HomeserverUnavailable):
        await setup.reconciler.run("test")


async def test_a_requested_pass_holds_transactions_until_it_is_done(setup: Setup) -> None:
    await setup.inbox.store_transaction("1", [event(1)])
    setup.hs.timelines[ROOM] = [event(1), event(2)]
    setup.hs.gate = asyncio.Event()

    setup.reconciler.request("the homeserver answers again")
    waiting = asyncio.create_task(setup.reconciler.wait_open())
    await setup.hs.called(1, timeout=5)  # the pass is reading, held at the gate
    assert not waiting.done()
    setup.hs.gate.set()
    async with asyncio.timeout(5):
        await waiting
    assert await setup.stored() == ["$event1", "$event2"]
    await setup.reconciler.stop()


async def test_a_requested_pass_retries_until_the_homeserver_answers(setup: Setup) -> None:
    await setup.inbox.store_transaction("1", [event(1)])
    setup.hs.timelines[ROOM] = [event(1), event(2)]
    setup.hs.down = True

    setup.reconciler.request("the homeserver hung up on a transaction")
    await setup.hs.called(2, timeout=10)  # refused once, and tried again
    setup.hs.down = False
    async with asyncio.timeout(10):
        await setup.reconciler.wait_open()
    assert await setup.stored() == ["$event1", "$event2"]
    await setup.reconciler.stop()


async def test_a_homeserver_answering_with_errors_stops_holding_transactions(
    setup: Setup,
) -> None:
    await setup.inbox.store_transaction("1", [event(1)])
    setup.hs.timelines[ROOM] = [event(1), event(2)]
    failing = setup.hs.messages

    async def bad_gateway(*args: Any) -> dict[str, Any]:
        raise make_request_error(502, "", None, None)

    setup.hs.messages = bad_gateway  # type: ignore[method-assign]
    setup.reconciler.request("the homeserver answers again")
    # It answers (badly): transactions flow again at once, the pass goes on trying.
    async with asyncio.timeout(5):
        await setup.reconciler.wait_open()
    setup.hs.messages = failing  # type: ignore[method-assign]

    async def recovered() -> bool:
        return await setup.stored() == ["$event1", "$event2"]

    await wait_until(recovered, 10)
    await setup.reconciler.stop()


async def test_a_failed_start_up_pass_does_not_stop_the_bridge_from_starting(
    setup: Setup,
) -> None:
    await setup.inbox.store_transaction("1", [event(1)])
    setup.hs.down = True
    setup.reconciler.hold()
    await setup.reconciler.start()
    async with asyncio.timeout(1):  # transactions flow
        await setup.reconciler.wait_open()
    await setup.reconciler.stop()


async def test_the_periodic_sweep_finds_what_no_signal_revealed(
    inbox: InboxStore, homeserver: FakeHomeserver
) -> None:
    setup = Setup(inbox, homeserver, interval_s=0.05)
    await inbox.store_transaction("1", [event(1)])
    homeserver.timelines[ROOM] = [event(1)]
    await setup.reconciler.start()
    try:
        homeserver.timelines[ROOM].append(event(2))  # never pushed, no sign of a fault

        async def swept() -> bool:
            return await setup.stored() == ["$event1", "$event2"]

        await wait_until(swept, 5)
    finally:
        await setup.reconciler.stop()


async def test_nothing_of_the_events_content_reaches_the_logs(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await setup.inbox.store_transaction("1", [event(1)])
    setup.hs.timelines[ROOM] = [event(n) for n in range(1, 4)]
    await setup.reconciler.run("test")
    assert "2 event(s) the bridge had not received" in caplog.text
    assert "secret clinical note" not in caplog.text


# --- What transactions say -----------------------------------------------------------------------


class SpyReconciler:
    """Records each pass asked for, and what the inbox held at that moment."""

    def __init__(self, inbox: InboxStore) -> None:
        self.inbox = inbox
        self.inline: list[tuple[str, list[str]]] = []
        self.requested: list[str] = []

    async def wait_open(self) -> None:
        pass

    async def run_inline(self, reason: str) -> None:
        held = [i.payload["event_id"] for i in await self.inbox.pending(0, 100)]
        self.inline.append((reason, held))

    def request(self, reason: str) -> None:
        self.requested.append(reason)


async def put(watch: TransactionWatch, inbox: InboxStore, txn_id: str, *events: int) -> None:
    """What the appservice endpoint does with a transaction."""
    body = [event(n) for n in events]
    restarted = await watch.before_store(txn_id, body, [])
    await inbox.store_transaction(txn_id, body, [])
    watch.stored(txn_id, restarted)


@pytest.fixture
def spy(inbox: InboxStore) -> SpyReconciler:
    return SpyReconciler(inbox)


@pytest.fixture
def watch(inbox: InboxStore, spy: SpyReconciler) -> TransactionWatch:
    return TransactionWatch(inbox, spy)  # type: ignore[arg-type]


async def test_transactions_that_follow_each_other_ask_for_nothing(
    watch: TransactionWatch, inbox: InboxStore, spy: SpyReconciler
) -> None:
    for n in range(1, 5):
        await put(watch, inbox, str(n), n)
    await put(watch, inbox, "4", 4)  # resent whole (the answer was lost)
    assert spy.inline == []


async def test_a_jump_in_transaction_ids_reads_the_timelines_before_storing(
    watch: TransactionWatch, inbox: InboxStore, spy: SpyReconciler
) -> None:
    await put(watch, inbox, "1", 1)
    await put(watch, inbox, "3", 3)  # 2 was never sent
    assert spy.inline == [("transaction ids jumped from 1 to 3", ["$event1"])]
    # When 2 comes after all (a recoverer), holding nothing new, it is no news either.
    await inbox.store_missed([event(2)])
    await put(watch, inbox, "2", 2)
    await put(watch, inbox, "4", 4)
    assert len(spy.inline) == 1


async def test_transaction_ids_that_start_again_read_the_timelines_once(
    watch: TransactionWatch, inbox: InboxStore, spy: SpyReconciler
) -> None:
    for n in range(1, 4):
        await put(watch, inbox, str(n), n)
    # The homeserver restarted and numbers from 1 again, with new events.
    await put(watch, inbox, "1", 10)
    await put(watch, inbox, "2", 11)
    await put(watch, inbox, "3", 12)
    assert spy.inline == [
        ("transaction ids started again (1 after 3)", [f"$event{n}" for n in (1, 2, 3)])
    ]
    assert [i.payload["event_id"] for i in await inbox.pending(0, 100)][-3:] == [
        "$event10",
        "$event11",
        "$event12",
    ]


async def test_the_last_transaction_id_is_remembered_across_a_bridge_restart(
    inbox: InboxStore, spy: SpyReconciler
) -> None:
    first = TransactionWatch(inbox, spy)  # type: ignore[arg-type]
    for n in range(1, 4):
        await put(first, inbox, str(n), n)
    again = TransactionWatch(inbox, spy)  # type: ignore[arg-type]
    await put(again, inbox, "4", 4)
    assert spy.inline == []
    await put(again, inbox, "1", 5)
    assert [reason for reason, _ in spy.inline] == ["transaction ids started again (1 after 4)"]


async def test_a_known_transaction_id_bringing_new_events_reads_the_timelines(
    watch: TransactionWatch, inbox: InboxStore, spy: SpyReconciler
) -> None:
    await put(watch, inbox, "txn-a", 1)
    await put(watch, inbox, "txn-a", 1)
    assert spy.inline == []
    await put(watch, inbox, "txn-a", 2)
    assert spy.inline == [("a known transaction id brought new events", ["$event1"])]


async def test_through_the_endpoint_recovered_events_precede_the_transaction_that_revealed_them(
    inbox: InboxStore, homeserver: FakeHomeserver
) -> None:
    setup = Setup(inbox, homeserver)
    server = AppserviceServer(
        hs_token=HS_TOKEN,
        inbox=inbox,
        on_stored=setup.notify,
        query_user=lambda _: asyncio.sleep(0, False),
        ready=lambda: asyncio.sleep(0, {}),
        max_body_bytes=1 << 20,
        watch=TransactionWatch(inbox, setup.reconciler),
    )
    client = TestClient(TestServer(server.app))
    await client.start_server()
    try:

        async def send(txn_id: str, *events: int) -> None:
            response = await client.put(
                f"/_matrix/app/v1/transactions/{txn_id}",
                data=json.dumps({"events": [event(n) for n in events]}),
                headers={"Authorization": f"Bearer {HS_TOKEN}"},
            )
            assert response.status == 200

        await send("1", 1)
        await send("2", 2)
        # Synapse restarts: 3 and 4, queued in its memory, are gone; it numbers from 1 again.
        homeserver.timelines[ROOM] = [event(n) for n in range(1, 6)]
        await send("1", 5)
        await send("2", 6)
        homeserver.timelines[ROOM].append(event(6))
    finally:
        await client.close()
    assert await setup.stored() == [f"$event{n}" for n in range(1, 7)]
    assert setup.reconciler.passes == 1
