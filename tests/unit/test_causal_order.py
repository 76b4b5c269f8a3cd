"""Causal order across a federation: no room event goes on before the events it follows.

A fake homeserver serves each room's graph (events with ``depth`` and ``prev_events``) through
``/messages`` in the federation format; the inbox is a real SQLite one and transactions go
through the real appservice endpoint. End to end, through two federating Synapses, see
``test_e2e_federation.py`` (a remote question pushed after its answer).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp.test_utils import TestClient, TestServer
from mautrix.util.async_db import Database

from bridge.appservice.server import AppserviceServer
from bridge.config import ReconcileConfig
from bridge.core.causal_order import FEDERATION_ONLY, CausalOrder
from bridge.db.clock import SYSTEM_CLOCK, Clock
from bridge.db.inbox import InboxStore

from fake_timeline import TimelineServer, page_backwards
from helpers import FakeClock, wait_until

OWN = "eimis.example"
ROOM = "!portal:eimis.example"
VOICE = "@eimis_bot:eimis.example"
REMOTE = "@claire:hs2.example"
LOCAL = "@alice:eimis.example"
HS_TOKEN = "hs-token-for-tests-0123456789abcdef"


class Graph:
    """A room graph, oldest first: each event follows the one before it unless told."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def add(self, name: str, sender: str = REMOTE, follows: list[str] | None = None) -> str:
        if follows is None:
            follows = [self.events[-1]["event_id"]] if self.events else []
        prevs = follows
        depth = 1 + max((self.by_id(p)["depth"] for p in prevs), default=0)
        self.events.append(
            {
                "event_id": f"${name}",
                "room_id": ROOM,
                "type": "m.room.message",
                "sender": sender,
                "origin_server_ts": 1_700_000_000_000 + len(self.events),
                "content": {"msgtype": "m.text", "body": f"clinical note {name}"},
                "depth": depth,
                "prev_events": prevs,
                "auth_events": [],
                "hashes": {"sha256": "x"},
                "signatures": {},
            }
        )
        return f"${name}"

    def by_id(self, event_id: str) -> dict[str, Any]:
        return next(e for e in self.events if e["event_id"] == event_id)

    def client(self, name: str) -> dict[str, Any]:
        """The event as a transaction brings it (the client format)."""
        event = self.by_id(f"${name}")
        return {k: v for k, v in event.items() if k not in FEDERATION_ONLY}


class GraphHomeserver(TimelineServer):
    """Serves what the homeserver holds of the room (``holds``: a gap is an event of the graph
    it does not hold yet) in graph order (depth, then arrival), newest first, paged like
    /messages, in the federation format."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.holds: set[str] = set()
        self.federation_format = True
        self.reads = 0

    def hold(self, *names: str) -> None:
        self.holds |= {f"${n}" for n in names}

    async def messages(self, viewer: str, path: str, query: dict[str, str]) -> dict[str, Any]:
        self.reads += 1
        assert unquote(path.split("/rooms/")[1].split("/")[0]) == ROOM
        assert json.loads(query["filter"]) == {"event_format": "federation"}
        held = [e for e in self.graph.events if e["event_id"] in self.holds]
        page = page_backwards(sorted(held, key=lambda e: e["depth"]), query)  # stable sort
        if not self.federation_format:
            page["chunk"] = [
                {k: v for k, v in e.items() if k not in ("depth", "prev_events")}
                for e in page["chunk"]
            ]
        return page


class Bridge:
    """The appservice endpoint with its causal order, over a real SQLite inbox."""

    def __init__(
        self,
        inbox: InboxStore,
        homeserver: GraphHomeserver,
        clock: Clock = SYSTEM_CLOCK,
        **config: Any,
    ) -> None:
        self.inbox = inbox
        self.hs = homeserver
        self.notified = 0
        self.order = CausalOrder(
            inbox,
            homeserver,  # type: ignore[arg-type]
            self.viewers,
            OWN,
            self.notify,
            ReconcileConfig(**{"page_size": 10, "interval_s": 0, "gap_wait_s": 5, **config}),
            asyncio.Lock(),
            clock,
        )
        self.server = AppserviceServer(
            hs_token=HS_TOKEN,
            inbox=inbox,
            on_stored=self.notify,
            query_user=lambda _: asyncio.sleep(0, False),
            ready=lambda: asyncio.sleep(0, {}),
            max_body_bytes=1 << 20,
            order=self.order,
        )
        self.client = TestClient(TestServer(self.server.app))
        self._txn = 0

    async def viewers(self, room_id: str) -> list[str]:
        return [VOICE] if room_id == ROOM else []

    def notify(self) -> None:
        self.notified += 1

    async def push(self, *events: dict[str, Any]) -> None:
        """A transaction from the homeserver, answered 200 (stored, maybe waiting)."""
        self._txn += 1
        response = await self.client.put(
            f"/_matrix/app/v1/transactions/{self._txn}",
            data=json.dumps({"events": list(events)}),
            headers={"Authorization": f"Bearer {HS_TOKEN}"},
        )
        assert response.status == 200, await response.text()

    async def pending(self) -> list[str]:
        """The room's events the lanes may process, in the order they will."""
        return [i.payload["event_id"][1:] for i in await self.inbox.pending(0, 1000)]

    async def waiting(self) -> int:
        return await self.inbox.count("waiting")

    async def released(self) -> None:
        """Wait until no row of the room waits any more."""

        async def none_waiting() -> bool:
            return await self.waiting() == 0

        await self.until(none_waiting)

    async def __aenter__(self) -> Bridge:
        await self.client.start_server()
        await self.order.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.order.stop()
        await self.client.close()

    async def until(self, condition: Any, timeout: float = 10.0) -> None:
        await wait_until(condition, timeout)


@pytest.fixture
def inbox(db: Database) -> InboxStore:
    """On SQLite and on PostgreSQL (waiting rows are moved in one database transaction)."""
    return InboxStore(db)


@pytest.fixture
def graph() -> Graph:
    g = Graph()
    g.add("join", sender=VOICE)
    return g


@pytest.fixture
async def bridge(inbox: InboxStore, graph: Graph) -> AsyncIterator[Bridge]:
    homeserver = GraphHomeserver(graph)
    homeserver.hold("join")
    async with Bridge(inbox, homeserver) as b:
        await b.push(graph.client("join"))
        yield b


async def test_an_event_the_homeserver_holds_but_pushes_later_goes_before_what_follows_it(
    bridge: Bridge, graph: Graph
) -> None:
    graph.add("question")
    graph.add("answer")
    bridge.hs.hold("question", "answer")
    await bridge.push(graph.client("answer"))  # the question's push comes after
    assert await bridge.pending() == ["join", "question", "answer"]
    await bridge.push(graph.client("question"))
    assert await bridge.pending() == ["join", "question", "answer"], "stored once"
    assert await bridge.waiting() == 0


async def test_a_room_waits_for_an_event_the_homeserver_does_not_have_yet(
    bridge: Bridge, graph: Graph
) -> None:
    graph.add("question")
    graph.add("answer")
    graph.add("thanks", sender=LOCAL)
    bridge.hs.hold("answer")  # a gap: the question is not on the homeserver yet
    await bridge.push(graph.client("answer"))
    assert await bridge.pending() == ["join"]
    assert await bridge.waiting() == 1, "acknowledged and stored, not processed"
    bridge.hs.hold("thanks")
    await bridge.push(graph.client("thanks"))  # the room's later events wait behind it
    assert await bridge.waiting() == 2
    bridge.hs.hold("question")  # the homeserver fetched it, and pushes it late
    await bridge.push(graph.client("question"))
    await bridge.released()
    assert await bridge.pending() == ["join", "question", "answer", "thanks"]
    assert bridge.order.gaps == 1 and bridge.order.released_at_deadline == 0


async def test_a_gap_filled_without_a_push_is_found_by_reading_the_room_again(
    bridge: Bridge, graph: Graph
) -> None:
    graph.add("question")
    graph.add("answer")
    bridge.hs.hold("answer")
    await bridge.push(graph.client("answer"))
    assert await bridge.waiting() == 1
    bridge.hs.hold("question")  # backfilled: on the homeserver, never pushed
    await bridge.released()
    assert await bridge.pending() == ["join", "question", "answer"]


async def test_a_gap_never_filled_is_released_at_the_deadline_and_the_late_event_comes_once(
    inbox: InboxStore, graph: Graph
) -> None:
    homeserver = GraphHomeserver(graph)
    homeserver.hold("join")
    clock = FakeClock()
    async with Bridge(inbox, homeserver, clock, gap_wait_s=0.5) as bridge:
        await bridge.push(graph.client("join"))
        graph.add("question")
        graph.add("answer")
        homeserver.hold("answer")
        await bridge.push(graph.client("answer"))
        clock.advance(0.5)  # the gap's time is up
        await bridge.released()
        assert await bridge.pending() == ["join", "answer"], "not lost for want of the other"
        assert bridge.order.released_at_deadline == 1
        homeserver.hold("question")
        await bridge.push(graph.client("question"))
        assert await bridge.pending() == ["join", "answer", "question"]


async def test_waiting_rows_survive_a_restart_and_are_released_by_the_next_run(
    inbox: InboxStore, graph: Graph
) -> None:
    homeserver = GraphHomeserver(graph)
    homeserver.hold("join")
    async with Bridge(inbox, homeserver) as first:
        await first.push(graph.client("join"))
        graph.add("question")
        graph.add("answer")
        homeserver.hold("answer")
        await first.push(graph.client("answer"))
        assert await first.waiting() == 1
    # The bridge stopped (or died) while the room waited.
    homeserver.hold("question")
    async with Bridge(inbox, homeserver) as second:
        await second.released()
        assert await second.pending() == ["join", "question", "answer"]


async def test_a_room_of_local_senders_only_is_never_read(bridge: Bridge, graph: Graph) -> None:
    reads = bridge.hs.reads
    for name in ("one", "two", "three"):
        graph.add(name, sender=LOCAL)
        bridge.hs.hold(name)
        await bridge.push(graph.client(name))
    assert bridge.hs.reads == reads
    assert await bridge.pending() == ["join", "one", "two", "three"]


async def test_history_from_before_the_portal_is_never_stored(
    inbox: InboxStore,
) -> None:
    graph = Graph()
    for name in ("create", "old1", "old2"):
        graph.add(name)
    graph.add("join", sender=VOICE)
    homeserver = GraphHomeserver(graph)
    homeserver.hold("create", "old1", "old2", "join")
    async with Bridge(inbox, homeserver) as bridge:
        await bridge.push(graph.client("join"))
        graph.add("hello")
        homeserver.hold("hello")
        await bridge.push(graph.client("hello"))
        assert await bridge.pending() == ["join", "hello"]


async def test_an_event_joining_two_branches_waits_for_both(bridge: Bridge, graph: Graph) -> None:
    fork = graph.add("left")
    right = graph.add("right", follows=["$join"])
    graph.add("merge", follows=[fork, right])
    bridge.hs.hold("left")
    await bridge.push(graph.client("left"))
    bridge.hs.hold("merge")  # "right" is not on the homeserver yet
    await bridge.push(graph.client("merge"))
    assert await bridge.pending() == ["join", "left"]
    assert await bridge.waiting() == 1
    bridge.hs.hold("right")
    await bridge.push(graph.client("right"))
    await bridge.released()
    assert await bridge.pending() == ["join", "left", "right", "merge"]


async def test_a_homeserver_without_the_federation_format_gets_timeline_order_and_no_wait(
    bridge: Bridge, graph: Graph
) -> None:
    bridge.hs.federation_format = False
    graph.add("question")
    graph.add("answer")
    bridge.hs.hold("question", "answer")
    await bridge.push(graph.client("answer"))
    assert await bridge.pending() == ["join", "question", "answer"]
    assert await bridge.waiting() == 0


async def test_what_is_stored_in_order_has_the_client_format(bridge: Bridge, graph: Graph) -> None:
    graph.add("question")
    graph.add("answer")
    bridge.hs.hold("question", "answer")
    await bridge.push(graph.client("answer"))
    stored = {i.payload["event_id"]: i.payload for i in await bridge.inbox.pending(0, 100)}
    assert stored["$question"] == graph.client("question")
    assert stored["$answer"] == graph.client("answer")
