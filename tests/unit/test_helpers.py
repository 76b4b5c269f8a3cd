"""The shared test helpers (tests/helpers.py) keep their word: ``wait_until`` returns what came
true or fails naming what it waited for; ``FakeClock`` sleepers wake only when time is moved."""

from __future__ import annotations

import asyncio

import pytest

from helpers import FakeClock, MemoryStore, WaitTimeout, wait_until


async def test_wait_until_returns_what_came_true_from_a_plain_or_async_condition() -> None:
    polls: list[int] = []

    def third_time() -> str | None:
        polls.append(1)
        return "ready" if len(polls) == 3 else None

    assert await wait_until(third_time, 1) == "ready"

    async def at_once() -> int:
        return 7

    assert await wait_until(at_once) == 7


async def test_wait_until_fails_naming_what_never_came_true() -> None:
    with pytest.raises(AssertionError, match="waiting for the marker"):
        await wait_until(lambda: False, 0.05, "the marker")
    with pytest.raises(TimeoutError):  # what code catching a timeout expects
        await wait_until(lambda: False, 0.05)
    assert issubclass(WaitTimeout, AssertionError) and issubclass(WaitTimeout, TimeoutError)


async def test_a_fake_clock_sleeper_wakes_only_when_the_test_moves_time() -> None:
    clock = FakeClock(100.0)
    sleeper = asyncio.create_task(clock.sleep(5))
    await wait_until(lambda: clock.sleeping == 1)
    clock.advance(4.9)
    await asyncio.sleep(0)
    assert not sleeper.done() and clock.now() == pytest.approx(104.9)
    clock.advance(0.1)
    await wait_until(sleeper.done)
    assert clock.sleeping == 0 and clock() == clock.monotonic() == pytest.approx(105.0)


def test_a_fake_clock_with_a_step_moves_on_every_reading() -> None:
    clock = FakeClock(0.0, step=10.0)
    assert (clock(), clock(), clock.now()) == (10.0, 20.0, 30.0)


async def test_the_memory_store_keeps_what_is_set() -> None:
    store = MemoryStore()
    assert await store.get("cursor") is None
    await store.set("cursor", "4")
    assert await store.get("cursor") == "4" and store.data == {"cursor": "4"}
