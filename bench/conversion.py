"""Hostile formatted messages: conversion time against input size, and the bridge's liveness
while it converts them (issue 11, point 8).

1. In this process, ``render_text`` (what the bridge runs for each vendor) on hostile HTML of
   1, 10 and 40 KB, for a Markdown vendor (PandaLab-style) and a plain-text one (Medipeps-style),
   three families: a flat ordered list (``<ol><li>x</li>...``: 4,000 items in 40 KB), nested
   lists (``<ul><li>x`` repeated) and nested quotes. Best of ``REPEATS`` runs each, in CPU time
   of this process (other work on the machine does not count).
   ``conversion_ms_{1,10,40}kb``: the slowest family at that size; ``conversion_per_kb_ratio_40_
   vs_1``: its time per KB at 40 KB over its time per KB at 1 KB (1 or less: linear).
2. A running bridge (its own process, stub homeserver, Medipeps-style sandbox, as in
   ``throughput.py``): five 40 KB hostile messages in five rooms in one transaction, each
   followed in its room by a marker message; ``/live`` is requested back to back from the
   transaction until every marker has reached the vendor (so every hostile message before it).
   ``conversion_live_ms_max`` / ``_p50`` and ``conversion_hostile_delivered_s``.

Run alone: ``python bench/conversion.py`` (or ``bench/run.py --only conversion``).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    NATIVE,
    bridge_config,
    merge_results,
    new_tokens,
    start_bridge,
    wait_http,
)
from throughput import Environment, conversations_in, probe  # noqa: E402

from bridge.devtools.ports import free_port  # noqa: E402

SIZES_KB = (1, 10, 40)
REPEATS = 5
MESSAGES = 5


def hostile_html(family: str, size_kb: int) -> str:
    """Hostile HTML of about ``size_kb`` KB."""
    target = size_kb * 1000
    if family == "ordered_list":  # 10 bytes an item: 4,000 items in 40 KB
        return "<ol>" + "<li>x</li>" * (target // 10) + "</ol>"
    if family == "nested_list":
        return "<ul><li>x" * (target // 9)
    if family == "nested_quote":
        return "<blockquote>x" * (target // 13)
    raise ValueError(family)


FAMILIES = ("ordered_list", "nested_list", "nested_quote")


def content_of(html: str) -> dict[str, Any]:
    return {
        "msgtype": "m.text",
        "body": "liste",
        "format": "org.matrix.custom.html",
        "formatted_body": html,
    }


def conversion_times(log: Any = print) -> dict[str, Any]:
    from bridge.core.degradation import render_text
    from connectors.medipeps.connector import MedipepsConnector
    from connectors.pandalab.connector import PandaLabConnector

    vendors = {
        "markdown": PandaLabConnector.capabilities,
        "plain": MedipepsConnector.capabilities,
    }
    figures: dict[str, Any] = {}
    worst: dict[int, tuple[float, str]] = {}
    per_family: dict[str, dict[int, float]] = {}
    for family in FAMILIES:
        for size in SIZES_KB:
            content = content_of(hostile_html(family, size))
            for vendor, caps in vendors.items():
                best = float("inf")
                for _ in range(REPEATS):
                    started = time.process_time()
                    render_text(content, caps, "Bench", vendor)
                    best = min(best, time.process_time() - started)
                ms = best * 1000
                name = f"{family}_{vendor}"
                figures[f"conversion_ms_{name}_{size}kb"] = round(ms, 2)
                per_family.setdefault(name, {})[size] = ms
                if ms > worst.get(size, (0.0, ""))[0]:
                    worst[size] = (ms, name)
            log(f"conversion {family} {size} KB: " + ", ".join(
                f"{v} {figures[f'conversion_ms_{family}_{v}_{size}kb']:.1f} ms" for v in vendors
            ))  # fmt: skip
    for size in SIZES_KB:
        figures[f"conversion_ms_{size}kb"] = round(worst[size][0], 2)
        figures[f"conversion_worst_family_{size}kb"] = worst[size][1]
    ratios = {
        name: (times[SIZES_KB[-1]] / SIZES_KB[-1]) / (times[SIZES_KB[0]] / SIZES_KB[0])
        for name, times in per_family.items()
    }
    figures["conversion_per_kb_ratio_40_vs_1"] = round(max(ratios.values()), 3)
    figures["conversion_per_kb_ratio_40_vs_10"] = round(
        max((t[40] / 40) / (t[10] / 10) for t in per_family.values()), 3
    )
    return figures


async def live_while_converting(http: ClientSession, log: Any = print) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="eimis-bench-conversion-") as tmp:
        work = Path(tmp)
        env = Environment(work, "conversion")
        as_token, hs_token = new_tokens()
        try:
            setup = await conversations_in(http, env, as_token)
            database_url = f"sqlite:///{env.dir / 'bridge.db'}"
            await setup.prefill(database_url)
            config = bridge_config(
                homeserver_url=setup.stub.url,
                bridge_port=free_port(),
                database_url=database_url,
                medipeps_url=setup.sandbox.url,
                as_token=as_token,
                hs_token=hs_token,
            )
            bridge = env.add(start_bridge(config, env.dir, env.dir))
            await wait_http(http, f"{bridge.url}/ready", bridge, timeout=60)
            rooms = setup.rooms[:MESSAGES]
            events = []
            now = int(time.time() * 1000)
            for i, room in enumerate(rooms):
                family = FAMILIES[i % len(FAMILIES)]
                for n, content in enumerate(
                    (content_of(hostile_html(family, 40)), {"msgtype": "m.text", "body": "fin #1"})
                ):
                    events.append(
                        {
                            "type": "m.room.message",
                            "room_id": room,
                            "sender": NATIVE,
                            "event_id": f"$conversion-{i}-{n}",
                            "origin_server_ts": now,
                            "content": content,
                        }
                    )
            before = (await probe(http, setup.sandbox.url))["count"]
            latencies: list[float] = []
            started = time.monotonic()
            async with http.put(
                f"{bridge.url}/_matrix/app/v1/transactions/conversion-1",
                json={"events": events},
                headers={"Authorization": f"Bearer {hs_token}"},
            ) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"transaction refused: {resp.status}")
            markers = 0
            while True:
                sent = time.monotonic()
                async with http.get(f"{bridge.url}/live", timeout=ClientTimeout(total=60)) as r:
                    await r.read()
                latencies.append((time.monotonic() - sent) * 1000)
                state = await probe(http, setup.sandbox.url)
                markers = int(state["conversations_sequenced"])
                if markers >= MESSAGES:
                    break
                if not bridge.alive():
                    raise RuntimeError(f"bridge exited:\n{bridge.tail()}")
                if time.monotonic() - started > 300:
                    raise TimeoutError(f"only {markers} of {MESSAGES} markers after 300 s")
                await asyncio.sleep(0.02)
            delivered = time.monotonic() - started
            parts = state["count"] - before
            log(f"/live during five hostile messages: max {max(latencies):.1f} ms")
            return {
                "conversion_live_ms_max": round(max(latencies), 1),
                "conversion_live_ms_p50": round(statistics.median(latencies), 1),
                "conversion_live_samples": len(latencies),
                "conversion_hostile_delivered_s": round(delivered, 2),
                "conversion_hostile_vendor_messages": parts,
            }
        finally:
            await env.stop()


async def run(log: Any = print) -> dict[str, Any]:
    figures = conversion_times(log)
    async with ClientSession() as http:
        figures.update(await live_while_converting(http, log))
    return figures


def main() -> None:
    figures = asyncio.run(run())
    merge_results(figures)
    for key, value in figures.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
