"""Ordered work lanes: one conversation's items in order, one at a time; conversations in parallel.

The scheduler reads from an in-memory stand-in for the durable inbox/outbox (``pending(after,
limit)`` in seq order). Handlers mark items done, as the real ones do; an item not marked done is
still pending and is read again after a restart.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from bridge.core.lanes import Backoff, LaneScheduler

from helpers import wait_until

FAST = Backoff(initial_s=0.001, max_s=0.005, factor=2.0)
_names = itertools.count()


@dataclass(frozen=True)
class Item:
    seq: int
    lane: str
    name: str


@dataclass
class Store:
    """Pending items by seq, as the database would return them; ``hidden`` are not yet visible."""

    items: dict[int, Item] = field(default_factory=dict)
    hidden: set[int] = field(default_factory=set)
    fetches: list[tuple[int, int]] = field(default_factory=list)
    fetched: int = 0
    _seq: itertools.count = field(default_factory=lambda: itertools.count(1))

    def add(self, lane: str, name: str | None = None) -> Item:
        seq = next(self._seq)
        item = Item(seq, lane, name or f"{lane}{seq}")
        self.items[seq] = item
        return item

    def done(self, item: Item) -> None:
        self.items.pop(item.seq, None)

    async def fetch_lane(self, lane: str, after: int, limit: int) -> list[Item]:
        await asyncio.sleep(0)
        found = [
            self.items[s]
            for s in sorted(self.items)
            if s > after and s not in self.hidden and self.items[s].lane == lane
        ][:limit]
        self.fetched += len(found)
        return found

    async def fetch(self, after: int, limit: int) -> list[Item]:
        self.fetches.append((after, limit))
        await asyncio.sleep(0)
        found = [self.items[s] for s in sorted(self.items) if s > after and s not in self.hidden][
            :limit
        ]
        self.fetched += len(found)
        return found


async def settle(rounds: int = 100) -> None:
    """Let every ready task run for a while (no wall-clock wait)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@dataclass
class Recorder:
    """A handler that records what it handles, per lane, and how many run at once."""

    store: Store
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    handled: list[Item] = field(default_factory=list)
    started: list[Item] = field(default_factory=list)
    running: Counter[str] = field(default_factory=Counter)
    max_running: Counter[str] = field(default_factory=Counter)
    max_total_running: int = 0
    cancelled: list[Item] = field(default_factory=list)
    mark_done: bool = True

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def __call__(self, item: Item) -> None:
        self.started.append(item)
        self.running[item.lane] += 1
        self.max_running[item.lane] = max(self.max_running[item.lane], self.running[item.lane])
        self.max_total_running = max(self.max_total_running, sum(self.running.values()))
        try:
            await asyncio.sleep(0)  # give any other task of this lane a chance to overlap
            if item.name in self.gates:
                await self.gates[item.name].wait()
            await asyncio.sleep(0)
            self.handled.append(item)
            if self.mark_done:
                self.store.done(item)
        except asyncio.CancelledError:
            self.cancelled.append(item)
            raise
        finally:
            self.running[item.lane] -= 1

    def names(self, lane: str | None = None) -> list[str]:
        return [i.name for i in self.handled if lane is None or i.lane == lane]


async def no_errors(item: Item, error: Exception) -> None:
    raise AssertionError(f"unexpected failure of {item}: {error!r}")


@pytest.fixture
async def schedulers() -> AsyncIterator[list[LaneScheduler[Item]]]:
    made: list[LaneScheduler[Item]] = []
    yield made
    for scheduler in made:
        await scheduler.stop()


Make = Callable[..., LaneScheduler[Item]]


@pytest.fixture
def make(schedulers: list[LaneScheduler[Item]]) -> Make:
    def make_(
        store: Store,
        handle: Callable[[Item], Awaitable[None]],
        on_error: Callable[[Item, Exception], Awaitable[None]] = no_errors,
        **kwargs: object,
    ) -> LaneScheduler[Item]:
        kwargs.setdefault("poll_interval_s", 60.0)
        kwargs.setdefault("backoff", FAST)
        kwargs.setdefault("fetch_lane", store.fetch_lane)
        scheduler = LaneScheduler[Item](
            f"test{next(_names)}",
            store.fetch,
            handle,
            on_error,
            **kwargs,  # type: ignore[arg-type]
        )
        schedulers.append(scheduler)
        return scheduler

    return make_


def live_tasks(scheduler: LaneScheduler[Item]) -> list[asyncio.Task[object]]:
    return [
        t
        for t in asyncio.all_tasks()
        if t.get_name().startswith(f"{scheduler.name}-") and not t.done()
    ]


# --- Order and concurrency -----------------------------------------------------------------------


async def test_items_of_one_lane_are_handled_in_seq_order_one_at_a_time(make: Make) -> None:
    store = Store()
    for _ in range(30):
        store.add("room-a")
    recorder = Recorder(store)
    scheduler = make(store, recorder, batch_size=7)

    scheduler.start()
    await wait_until(lambda: len(recorder.handled) == 30)

    assert [i.seq for i in recorder.handled] == list(range(1, 31))
    assert recorder.max_running["room-a"] == 1


async def test_interleaved_lanes_each_keep_their_own_order(make: Make) -> None:
    store = Store()
    for n in range(60):
        store.add(f"room-{n % 4}")
    recorder = Recorder(store)
    scheduler = make(store, recorder, batch_size=5)

    scheduler.start()
    await wait_until(lambda: len(recorder.handled) == 60)

    for lane in ("room-0", "room-1", "room-2", "room-3"):
        seqs = [i.seq for i in recorder.handled if i.lane == lane]
        assert seqs == sorted(seqs) and len(seqs) == 15
        assert recorder.max_running[lane] == 1
    # Lanes did overlap: this is not one global queue.
    assert recorder.max_total_running > 1


async def test_different_lanes_run_at_the_same_time(make: Make) -> None:
    store = Store()
    a, b = store.add("room-a"), store.add("room-b")
    recorder = Recorder(store)
    gate_a, gate_b = recorder.gate(a.name), recorder.gate(b.name)
    scheduler = make(store, recorder)

    scheduler.start()
    # Both handlers are in flight together, each waiting for its own gate.
    await wait_until(lambda: recorder.running["room-a"] == 1 and recorder.running["room-b"] == 1)
    gate_b.set()
    gate_a.set()
    await wait_until(lambda: len(recorder.handled) == 2)


async def test_a_blocked_lane_does_not_block_another(make: Make) -> None:
    store = Store()
    a1 = store.add("room-a")
    store.add("room-a")
    store.add("room-b")
    store.add("room-b")
    recorder = Recorder(store)
    gate = recorder.gate(a1.name)
    scheduler = make(store, recorder)

    scheduler.start()
    await wait_until(lambda: len(recorder.names("room-b")) == 2)

    assert recorder.names("room-a") == []
    assert [i.name for i in recorder.started if i.lane == "room-a"] == [a1.name]
    gate.set()
    await wait_until(lambda: len(recorder.names("room-a")) == 2)
    assert [i.seq for i in recorder.handled if i.lane == "room-a"] == [1, 2]


# --- Failures ------------------------------------------------------------------------------------


async def test_failing_item_is_retried_and_blocks_only_its_own_lane(make: Make) -> None:
    store = Store()
    a1, a2, a3 = store.add("room-a"), store.add("room-a"), store.add("room-a")
    recorder = Recorder(store)
    vendor_back = asyncio.Event()
    attempts: Counter[str] = Counter()
    errors: list[tuple[str, str]] = []

    async def handle(item: Item) -> None:
        attempts[item.name] += 1
        if item.name == a1.name and not vendor_back.is_set():
            raise ConnectionError("vendor unreachable")
        await recorder(item)

    async def on_error(item: Item, error: Exception) -> None:
        errors.append((item.name, str(error)))

    scheduler = make(store, handle, on_error)
    scheduler.start()

    # a1 fails again and again; meanwhile another conversation is served.
    await wait_until(lambda: attempts[a1.name] >= 3)
    b1 = store.add("room-b")
    scheduler.notify()
    await wait_until(lambda: recorder.names("room-b") == [b1.name])
    assert recorder.names("room-a") == []
    assert attempts[a2.name] == 0 and attempts[a3.name] == 0  # nothing overtakes a1
    assert set(errors) == {(a1.name, "vendor unreachable")}
    assert len(errors) == attempts[a1.name]

    vendor_back.set()
    await wait_until(lambda: len(recorder.names("room-a")) == 3)

    assert recorder.names("room-a") == [a1.name, a2.name, a3.name]
    assert attempts[a2.name] == 1 and attempts[a3.name] == 1


async def test_an_error_in_the_error_hook_does_not_stop_retries(make: Make) -> None:
    store = Store()
    item = store.add("room-a")
    recorder = Recorder(store)
    failures = 0

    async def handle(it: Item) -> None:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise RuntimeError("transient")
        await recorder(it)

    async def broken_on_error(it: Item, error: Exception) -> None:
        raise RuntimeError("could not record the attempt either")

    make(store, handle, broken_on_error).start()
    await wait_until(lambda: recorder.names() == [item.name])


async def test_a_failing_read_of_pending_work_is_retried(make: Make) -> None:
    store = Store()
    store.add("room-a")
    recorder = Recorder(store)
    reads = 0

    async def flaky_fetch(after: int, limit: int) -> list[Item]:
        nonlocal reads
        reads += 1
        if reads <= 2:
            raise OSError("database restarting")
        return await store.fetch(after, limit)

    scheduler = LaneScheduler[Item]("flaky", flaky_fetch, recorder, no_errors, backoff=FAST)
    scheduler.start()
    try:
        await wait_until(lambda: len(recorder.handled) == 1)
    finally:
        await scheduler.stop()


# --- Picking up new work -------------------------------------------------------------------------


async def test_notify_makes_new_work_picked_up_promptly(make: Make) -> None:
    store = Store()
    recorder = Recorder(store)
    # The poll would come only after a minute: only notify() can make this test pass in time.
    scheduler = make(store, recorder, poll_interval_s=60.0)
    scheduler.start()
    await wait_until(lambda: len(store.fetches) >= 1)

    for expected in range(1, 4):
        item = store.add("room-a")
        scheduler.notify()
        await wait_until(lambda n=expected: len(recorder.handled) == n, timeout=2.0)
        assert recorder.handled[-1] == item


async def test_work_stored_without_notify_is_found_by_the_next_poll(make: Make) -> None:
    store = Store()
    recorder = Recorder(store)
    scheduler = make(store, recorder, poll_interval_s=0.01)
    scheduler.start()
    await wait_until(lambda: len(store.fetches) >= 1)

    store.add("room-a")

    await wait_until(lambda: len(recorder.handled) == 1)


# --- Bounded memory ------------------------------------------------------------------------------


def tracking_fetch(
    store: Store, handled: list[Item]
) -> tuple[Callable[[int, int], Awaitable[list[Item]]], Callable[[], int]]:
    """A fetch that records the most items ever held in memory (read but not yet handled)."""
    peak = 0

    async def fetch(after: int, limit: int) -> list[Item]:
        nonlocal peak
        found = await store.fetch(after, limit)
        peak = max(peak, store.fetched - len(handled))
        return found

    return fetch, lambda: peak


async def test_buffering_stops_reading_at_the_limit_and_resumes_as_lanes_drain(
    schedulers: list[LaneScheduler[Item]],
) -> None:
    store = Store()
    items = [store.add(f"room-{n % 2}") for n in range(20)]
    recorder = Recorder(store)
    # Both conversations are stuck on their first item.
    gates = [recorder.gate(items[0].name), recorder.gate(items[1].name)]
    fetch, peak = tracking_fetch(store, recorder.handled)
    scheduler = LaneScheduler[Item](
        "bounded",
        fetch,
        recorder,
        no_errors,
        batch_size=2,
        max_buffered=4,
        poll_interval_s=60.0,
        backoff=FAST,
    )
    schedulers.append(scheduler)

    scheduler.start()
    await wait_until(lambda: scheduler.buffered >= 4)
    reads = len(store.fetches)
    await settle()

    # Full: no more reading while the lanes hold the limit.
    assert len(store.fetches) == reads
    assert store.fetched - len(recorder.handled) <= 4
    for gate in gates:
        gate.set()
    await wait_until(lambda: len(recorder.handled) == 20)
    assert peak() <= 4
    for lane in ("room-0", "room-1"):
        seqs = [i.seq for i in recorder.handled if i.lane == lane]
        assert seqs == sorted(seqs)


async def test_buffering_never_holds_more_than_the_limit(
    schedulers: list[LaneScheduler[Item]],
) -> None:
    store = Store()
    first = store.add("room-a")
    for n in range(29):
        store.add(f"room-{n % 3}")
    recorder = Recorder(store)
    gate = recorder.gate(first.name)
    fetch, peak = tracking_fetch(store, recorder.handled)
    scheduler = LaneScheduler[Item](
        "limit",
        fetch,
        recorder,
        no_errors,
        batch_size=3,
        max_buffered=5,
        poll_interval_s=60.0,
        backoff=FAST,
    )
    schedulers.append(scheduler)

    scheduler.start()
    await wait_until(lambda: len(store.fetches) >= 1)
    await settle()
    gate.set()
    await wait_until(lambda: len(recorder.handled) == 30)

    assert peak() <= 5


async def test_a_buffer_of_one_item_still_handles_everything(make: Make) -> None:
    store = Store()
    for _ in range(3):
        store.add("room-a")
    recorder = Recorder(store)
    make(store, recorder, batch_size=1, max_buffered=1).start()

    await wait_until(lambda: len(recorder.handled) == 3, timeout=1.0)


async def test_a_blocked_lane_holding_the_whole_buffer_does_not_starve_other_lanes(
    make: Make,
) -> None:
    store = Store()
    first = store.add("room-a")
    for _ in range(3):
        store.add("room-a")
    recorder = Recorder(store)
    recorder.gate(first.name)  # never opened: room-a's vendor is down
    scheduler = make(store, recorder, batch_size=10, max_buffered=4)
    scheduler.start()
    # The stuck conversation keeps at most half the buffer; the rest waits in storage.
    await wait_until(lambda: scheduler.buffered == 2)

    other = store.add("room-b")
    scheduler.notify()

    await wait_until(lambda: recorder.names() == [other.name], timeout=1.0)


async def test_a_lane_that_overflowed_reads_its_own_backlog_in_order(make: Make) -> None:
    store = Store()
    items = [store.add("room-a") for _ in range(25)]
    recorder = Recorder(store)
    gate = recorder.gate(items[0].name)
    scheduler = make(store, recorder, batch_size=10, max_buffered=8, lane_cap=3)
    scheduler.start()
    await wait_until(lambda: scheduler.buffered == 3)
    late = [store.add("room-a") for _ in range(5)]
    scheduler.notify()
    await settle()
    assert scheduler.buffered <= 3

    gate.set()
    await wait_until(lambda: len(recorder.handled) == 30)
    assert [i.seq for i in recorder.handled] == [i.seq for i in items + late]


# --- Stop and restart ----------------------------------------------------------------------------


async def test_stop_cancels_running_handlers_and_leaves_no_task_behind(make: Make) -> None:
    store = Store()
    a, b = store.add("room-a"), store.add("room-b")
    recorder = Recorder(store)
    recorder.gate(a.name)
    recorder.gate(b.name)
    scheduler = make(store, recorder)
    scheduler.start()
    await wait_until(lambda: sum(recorder.running.values()) == 2)

    async with asyncio.timeout(2.0):
        await scheduler.stop()

    assert sorted(i.name for i in recorder.cancelled) == sorted([a.name, b.name])
    assert recorder.handled == []
    assert live_tasks(scheduler) == []
    assert scheduler.buffered == 0


async def test_stop_of_an_idle_or_never_started_scheduler_is_harmless(make: Make) -> None:
    store = Store()
    recorder = Recorder(store)
    never = make(store, recorder)
    await never.stop()
    idle = make(store, recorder)
    idle.start()
    await wait_until(lambda: len(store.fetches) >= 1)
    await idle.stop()
    await idle.stop()
    assert live_tasks(idle) == []


async def test_stop_right_after_a_wake_up_still_stops(make: Make) -> None:
    """A stop that lands as new work is notified (the end of every busy test, every shutdown
    under traffic) must end the scheduler. On Python 3.11, asyncio.wait_for() returned the
    wake-up and swallowed the cancellation, the dispatcher went on forever and stop() hung
    (CI: a 300 s timeout in the teardown of an e2e module)."""
    store = Store()
    recorder = Recorder(store)
    scheduler = make(store, recorder)
    scheduler.start()
    for _ in range(20):
        await wait_until(lambda: len(store.fetches) >= 1)
        await settle()  # the dispatcher now waits to be woken
        scheduler.notify()  # wakes it in the same tick as the cancellation below
        async with asyncio.timeout(5.0):
            await scheduler.stop()
        assert live_tasks(scheduler) == []
        store.fetches.clear()
        scheduler.start()


async def test_after_restart_items_still_pending_are_handled_again(make: Make) -> None:
    store = Store()
    a1, a2, a3 = store.add("room-a"), store.add("room-a"), store.add("room-a")
    b1 = store.add("room-b")
    recorder = Recorder(store)
    recorder.gate(a2.name)  # a2 is in flight when the bridge stops
    scheduler = make(store, recorder)
    scheduler.start()
    await wait_until(lambda: recorder.running["room-a"] == 1 and len(recorder.handled) == 2)
    assert sorted(recorder.names()) == sorted([a1.name, b1.name])
    await scheduler.stop()
    # Stored while the bridge was down.
    b2 = store.add("room-b")

    recorder.gate(a2.name).set()
    scheduler.start()
    await wait_until(lambda: len(recorder.handled) == 5)

    # Done items are not handled again; pending ones are, in order.
    assert recorder.names("room-a") == [a1.name, a2.name, a3.name]
    assert recorder.names("room-b") == [b1.name, b2.name]
    assert store.items == {}


async def test_items_handled_but_not_marked_done_are_handled_again_after_restart(
    make: Make,
) -> None:
    # Handlers are idempotent: a crash between the side effect and mark_done means a redo.
    store = Store()
    store.add("room-a")
    store.add("room-a")
    recorder = Recorder(store, mark_done=False)
    scheduler = make(store, recorder)
    scheduler.start()
    await wait_until(lambda: len(recorder.handled) == 2)
    await scheduler.stop()

    scheduler.start()
    await wait_until(lambda: len(recorder.handled) == 4)

    assert [i.seq for i in recorder.handled] == [1, 2, 1, 2]
