"""Prometheus metrics and the probes of a real bridge, end to end through a real Synapse.

A PandaLab-style user writes to a Medipeps-style user: the counters and the latency histogram
move for the right labels; a Medipeps outage shows as a queue depth, retries and a connector
down, and its end as the opposite. ``/ready`` follows the homeserver and the database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp import ClientSession

from bridge import __version__
from bridge.devtools.stack import LocalStack

from e2e_helpers import app_users_of, inbox_message, unique
from helpers import wait_until
from prometheus_text import Samples, parse, value


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with LocalStack(Path(tmp_path_factory.mktemp("metrics"))) as local:
        yield local


async def scrape(stack: LocalStack, http: ClientSession) -> Samples:
    assert stack.bridge is not None and stack.bridge.metrics.port
    url = f"http://127.0.0.1:{stack.bridge.metrics.port}/metrics"
    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(await resp.text())


@pytest.mark.e2e
async def test_a_message_moves_the_counters_and_the_histogram_of_its_labels(
    stack: LocalStack, http: ClientSession
) -> None:
    before = await scrape(stack, http)
    assert value(before, "eimis_bridge_info", version=__version__) == 1
    assert value(before, "eimis_state_sampled") == 1

    alice = (await app_users_of(stack, http, "pandalab"))[0]
    bob = (await app_users_of(stack, http, "medipeps"))[0]
    conversation = await alice.start_conversation([bob.idnps], unique("Metrics"))
    text = unique("Un message compté")
    await alice.post(conversation, text=text)
    await wait_until(lambda: inbox_message(bob, lambda m: m["text"] == text), 30, "Bob's copy")

    async def counted() -> Samples | None:
        now = await scrape(stack, http)
        delivered = value(
            now, "eimis_events_total", connector="medipeps", direction="to_vendor", kind="text"
        )
        return (
            now
            if delivered
            > value(
                before,
                "eimis_events_total",
                connector="medipeps",
                direction="to_vendor",
                kind="text",
            )
            else None
        )

    after = await wait_until(counted, 10, "the delivery counted")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert (
        moved("eimis_events_total", connector="pandalab", direction="to_matrix", kind="text") == 1
    )
    assert (
        moved("eimis_events_total", connector="medipeps", direction="to_vendor", kind="text") == 1
    )
    assert (
        moved("eimis_events_total", connector="pandalab", direction="to_vendor", kind="text") == 0
    )
    # The conversation was opened on Matrix, then at Medipeps.
    assert (
        moved(
            "eimis_events_total", connector="pandalab", direction="to_matrix", kind="conversation"
        )
        == 1
    )
    assert (
        moved(
            "eimis_events_total", connector="medipeps", direction="to_vendor", kind="conversation"
        )
        == 1
    )
    for connector, direction in (("medipeps", "to_vendor"), ("pandalab", "to_matrix")):
        labels = {"connector": connector, "direction": direction}
        assert moved("eimis_delivery_seconds_count", **labels) >= 1
        assert 0 < moved("eimis_delivery_seconds_sum", **labels) < 30
        # An idle local bridge delivers within a few seconds: the 30 s bucket holds it all.
        assert moved("eimis_delivery_seconds_bucket", le="30.0", **labels) == moved(
            "eimis_delivery_seconds_count", **labels
        )
    assert value(after, "eimis_outbox_pending", connector="medipeps") == 0
    assert value(after, "eimis_connector_up", connector="medipeps") == 1
    assert value(after, "eimis_connector_up", connector="pandalab") == 1
    assert value(after, "eimis_dead_letters_held", connector="medipeps") == 0
    assert ("eimis_inbox_items", frozenset({("state", "pending")})) in after


@pytest.mark.e2e
async def test_a_vendor_outage_shows_as_queue_depth_retries_and_a_connector_down(
    stack: LocalStack, http: ClientSession
) -> None:
    alice = (await app_users_of(stack, http, "pandalab"))[1]
    bob = (await app_users_of(stack, http, "medipeps"))[1]
    conversation = await alice.start_conversation([bob.idnps], unique("Outage"))
    opener = unique("Avant la panne")
    await alice.post(conversation, text=opener)
    await wait_until(lambda: inbox_message(bob, lambda m: m["text"] == opener), 30, "the opener")
    before = await scrape(stack, http)

    medipeps = stack.sandboxes["medipeps"]
    await medipeps.stop()
    try:
        waiting = unique("Pendant la panne")
        await alice.post(conversation, text=waiting)

        async def down() -> Samples | None:
            now = await scrape(stack, http)
            held = value(now, "eimis_outbox_pending", connector="medipeps") >= 1
            is_down = value(now, "eimis_connector_up", connector="medipeps") == 0
            return now if held and is_down else None

        during = await wait_until(down, 30, "Medipeps seen down with a delivery waiting")
        assert value(
            during, "eimis_retries_total", connector="medipeps", direction="to_vendor"
        ) > value(before, "eimis_retries_total", connector="medipeps", direction="to_vendor")
        assert value(during, "eimis_connector_up", connector="pandalab") == 1
    finally:
        await medipeps.start()

    await wait_until(
        lambda: inbox_message(bob, lambda m: m["text"] == waiting), 90, "the waiting message"
    )

    async def back() -> Samples | None:
        now = await scrape(stack, http)
        up = value(now, "eimis_connector_up", connector="medipeps") == 1
        return now if up and value(now, "eimis_outbox_pending", connector="medipeps") == 0 else None

    after = await wait_until(back, 30, "Medipeps back with nothing waiting")
    # A vendor that does not answer is waited for: it spends no delivery's budget.
    assert value(after, "eimis_dead_letters_total", connector="medipeps") == value(
        before, "eimis_dead_letters_total", connector="medipeps"
    )


# --- Probes --------------------------------------------------------------------------------------


async def ready(stack: LocalStack, http: ClientSession) -> tuple[int, dict[str, bool]]:
    async with http.get(f"{stack.bridge_url}/ready") as resp:
        return resp.status, (await resp.json())["checks"]


@pytest.mark.e2e
async def test_ready_only_while_the_homeserver_and_the_database_answer(
    tmp_path: Path, postgres_url: str, http: ClientSession
) -> None:
    """On PostgreSQL, so the database can really stop answering (and come back)."""
    async with LocalStack(tmp_path / "stack", database_url=postgres_url) as local:
        assert await ready(local, http) == (200, {"database": True, "homeserver": True})
        async with http.get(f"{local.bridge_url}/live") as resp:
            assert resp.status == 200

        await local.synapse.stop()
        try:
            assert await ready(local, http) == (503, {"database": True, "homeserver": False})
            async with http.get(f"{local.bridge_url}/live") as resp:
                assert resp.status == 200  # alive: restarting it would not help
        finally:
            await local.synapse.start()

        async def answering() -> bool:
            return (await ready(local, http))[0] == 200

        await wait_until(answering, 30, "ready again")

        name = postgres_url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(postgres_url.rsplit("/", 1)[0] + "/postgres")
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
            assert await ready(local, http) == (503, {"database": False, "homeserver": True})
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()
        await wait_until(answering, 30, "ready again")
