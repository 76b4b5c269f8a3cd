"""Prometheus metrics: what flows through the bridge, how fast, and what waits.

Counters and the latency histogram are in-memory increments on the hot path (no database
access: metrics must not cost throughput). Queue depths, dead letters and connector states are
read only when Prometheus scrapes, by a ``Sampler`` the running bridge supplies
(``bridge/core/metrics_sampler.py``). Each bridge has
a registry of its own (never the process-global one): tests run several bridges in one process.

The metrics are served on a listener of their own (``config.metrics``), not the appservice's:
the appservice port faces the homeserver and the vendors' webhooks, the metrics port faces the
operators' monitoring.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger("eimis.metrics")

TO_VENDOR = "to_vendor"
TO_MATRIX = "to_matrix"
Direction = str
"""``to_vendor`` (Matrix events delivered to a connector) or ``to_matrix`` (vendor events sent
into Matrix)."""

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
"""From 10 ms (an idle bridge) to an hour (a vendor down for a while)."""


@dataclass(frozen=True)
class Sample:
    """What the bridge holds at scrape time (read from storage and from memory)."""

    outbox_pending: Mapping[str, int] = field(default_factory=dict)
    """Deliveries waiting, per connector (the queue depth)."""
    dead_letters: Mapping[str, int] = field(default_factory=dict)
    """Dead letters held, per connector."""
    inbox: Mapping[str, int] = field(default_factory=dict)
    """Inbox items by state: ``pending`` (to process) and ``waiting`` (held behind a gap)."""
    connectors_up: Mapping[str, bool] = field(default_factory=dict)
    """Per connector: does its vendor answer?"""
    buffered: Mapping[str, int] = field(default_factory=dict)
    """Items read ahead in memory, per queue (``inbox``, ``outbox``)."""
    untrusted_dropped: int = 0
    """Events from servers outside the trust list, dropped since start."""
    crypto: Mapping[str, int] = field(default_factory=dict)
    """End-to-bridge encryption counts since start (``Crypto.counts``); empty when it is off."""


Sampler = Callable[[], Awaitable[Sample]]


class Metrics:
    def __init__(self, version: str) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "eimis_events",
            "Events carried, per connector, direction and kind (text, file, edit, reaction...)",
            ["connector", "direction", "kind"],
            registry=self.registry,
        )
        self.undelivered = Counter(
            "eimis_undelivered",
            "Events that did not cross: refused (the other side cannot show them), failed, or "
            "dead-lettered",
            ["connector", "direction", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "eimis_delivery_seconds",
            "From the moment an event was stored (inbox for vendor events, outbox for "
            "deliveries) to the moment the other side had it",
            ["connector", "direction"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "eimis_retries",
            "Attempts that failed and will be tried again",
            ["connector", "direction"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "eimis_dead_letters",
            "Deliveries that spent their retry budget",
            ["connector"],
            registry=self.registry,
        )
        Info("eimis_bridge", "The running bridge", registry=self.registry).info(
            {"version": version}
        )
        self._events: dict[tuple[str, str, str], Any] = {}
        self._latency: dict[tuple[str, str], Any] = {}
        """The labelled children of the hot-path metrics, looked up once per label set."""
        self._state = _StateCollector()
        self.registry.register(self._state)
        self._sampler: Sampler | None = None
        self._scrape = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        """The port the listener is bound to (``config.metrics.port`` 0 picks a free one)."""

    # The hot path: in-memory increments only -------------------------------------------------

    def carried(
        self, connector: str, direction: Direction, kind: str, entered_ms: int | None
    ) -> None:
        """One event reached the other side; ``entered_ms`` is when it was stored."""
        key = (connector, direction, kind)
        counter = self._events.get(key)
        if counter is None:  # prometheus_client's labels() takes a lock: once per label set
            counter = self._events[key] = self.events.labels(connector, direction, kind)
        counter.inc()
        if entered_ms:
            seconds = max(time.time() - entered_ms / 1000, 0.0)
            histogram = self._latency.get(key[:2])
            if histogram is None:
                histogram = self._latency[key[:2]] = self.latency.labels(connector, direction)
            histogram.observe(seconds)

    def not_carried(self, connector: str, direction: Direction, outcome: str) -> None:
        self.undelivered.labels(connector, direction, outcome).inc()
        if outcome == "dead_letter":
            self.dead_letters.labels(connector).inc()

    def retried(self, connector: str, direction: Direction) -> None:
        self.retries.labels(connector, direction).inc()

    # Scrapes -----------------------------------------------------------------------------------

    def watch(self, sampler: Sampler) -> None:
        """Read queue depths and connector states through ``sampler`` at every scrape."""
        self._sampler = sampler

    async def render(self) -> bytes:
        """The Prometheus text exposition of every metric, state sampled now."""
        async with self._scrape:  # one sample at a time: concurrent scrapes share the work
            sample = None
            if self._sampler is not None:
                try:
                    async with asyncio.timeout(10):
                        sample = await self._sampler()
                except Exception as error:
                    # Counters are still worth serving; the gauges say the sample failed.
                    log.warning("Sampling the bridge's state failed (%s)", type(error).__name__)
            self._state.sample = sample
            self._state.sampled = self._sampler is None or sample is not None
            return generate_latest(self.registry)

    async def start(self, hostname: str, port: int) -> None:
        """Serve ``/metrics`` on ``hostname:port`` (its own listener)."""
        app = web.Application()
        app.add_routes([web.get("/metrics", self._serve)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, hostname, port).start()
        self.port = int(self._runner.addresses[0][1])
        log.info("Metrics listening on %s:%d", hostname, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve(self, _: web.Request) -> web.Response:
        return web.Response(body=await self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


class _StateCollector(Collector):
    """The gauges, from the last sample (taken by ``Metrics.render`` just before)."""

    def __init__(self) -> None:
        self.sample: Sample | None = None
        self.sampled = True

    def collect(self) -> Iterator[Metric]:
        ok = GaugeMetricFamily(
            "eimis_state_sampled", "1 when the queues and connector states below could be read"
        )
        ok.add_metric([], 1.0 if self.sampled else 0.0)
        yield ok
        sample = self.sample
        if sample is None:
            return
        yield _per_label(
            "eimis_outbox_pending",
            "Deliveries waiting, per connector (queue depth)",
            "connector",
            sample.outbox_pending,
        )
        yield _per_label(
            "eimis_dead_letters_held",
            "Dead letters held (each holds the rest of its conversation)",
            "connector",
            sample.dead_letters,
        )
        yield _per_label(
            "eimis_inbox_items",
            "Inbox items to process (pending) or held behind a gap in a room (waiting)",
            "state",
            sample.inbox,
        )
        yield _per_label(
            "eimis_connector_up",
            "1 while the connector's vendor answers, 0 while it is down",
            "connector",
            {name: int(up) for name, up in sample.connectors_up.items()},
        )
        yield _per_label(
            "eimis_lanes_buffered",
            "Items read ahead in memory, per queue",
            "queue",
            sample.buffered,
        )
        dropped = CounterMetricFamily(
            "eimis_untrusted_dropped",
            "Events from servers outside the trust list, never delivered to a vendor",
        )
        dropped.add_metric([], float(sample.untrusted_dropped))
        yield dropped
        if sample.crypto:
            crypto = CounterMetricFamily(
                "eimis_encryption_events",
                "End-to-bridge encryption since start: events decrypted and encrypted, events "
                "that never decrypted, room keys received, to-device messages read from the "
                "devices' inboxes (keys the homeserver did not push)",
                labels=["outcome"],
            )
            for outcome, value in sorted(sample.crypto.items()):
                crypto.add_metric([outcome], float(value))
            yield crypto


def _per_label(name: str, documentation: str, label: str, values: Mapping[str, int]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], float(value))
    return family
