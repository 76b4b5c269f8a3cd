"""The metrics registry on its own: one per bridge, and a failed state sample still serves the
counters. A real bridge's metrics and probes: tests/e2e/test_metrics.py."""

from __future__ import annotations

from bridge.metrics import Metrics, Sample

from prometheus_text import parse, value

# --- The registry on its own --------------------------------------------------------------------


async def test_each_bridge_has_its_own_registry_and_a_failed_sample_still_serves_counters() -> None:
    first, second = Metrics("1.0"), Metrics("1.0")
    first.carried("vendora", "to_vendor", "text", entered_ms=None)
    first.not_carried("vendora", "to_vendor", "dead_letter")
    first.retried("vendora", "to_vendor")
    samples = parse((await first.render()).decode())
    assert (
        value(
            samples, "eimis_events_total", connector="vendora", direction="to_vendor", kind="text"
        )
        == 1
    )
    assert value(samples, "eimis_dead_letters_total", connector="vendora") == 1
    assert (
        value(
            samples,
            "eimis_undelivered_total",
            connector="vendora",
            direction="to_vendor",
            outcome="dead_letter",
        )
        == 1
    )
    assert value(samples, "eimis_retries_total", connector="vendora", direction="to_vendor") == 1
    assert (
        value(
            parse((await second.render()).decode()),
            "eimis_events_total",
            connector="vendora",
            direction="to_vendor",
            kind="text",
        )
        == 0
    )

    async def sample() -> Sample:
        return Sample(
            outbox_pending={"vendora": 3}, connectors_up={"vendora": False}, inbox={"pending": 2}
        )

    first.watch(sample)
    samples = parse((await first.render()).decode())
    assert value(samples, "eimis_outbox_pending", connector="vendora") == 3
    assert value(samples, "eimis_connector_up", connector="vendora") == 0
    assert value(samples, "eimis_inbox_items", state="pending") == 2
    assert value(samples, "eimis_state_sampled") == 1

    async def broken() -> Sample:
        raise ConnectionError("the database is gone")

    first.watch(broken)
    samples = parse((await first.render()).decode())
    assert value(samples, "eimis_state_sampled") == 0
    assert ("eimis_outbox_pending", frozenset({("connector", "vendora")})) not in samples
    assert (
        value(
            samples, "eimis_events_total", connector="vendora", direction="to_vendor", kind="text"
        )
        == 1
    )
