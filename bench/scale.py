"""Scale: the bridge on a large database against the same bridge on an empty one, same run.

The large SQLite database holds 100,000 ghosts, 100,000 portals with their links and 1,000,000
message_map rows (schema by the bridge's own migrations, rows bulk-inserted with executemany).
Measured on both databases:

* start-up: from spawning ``python -m bridge run`` (against the stub homeserver and the
  Medipeps-style sandbox) until ``/ready`` answers 200 (median of 5 starts, alternating
  between the two databases);
* resident memory (VmRSS, and the peak VmHWM) two seconds after ready, and after a short core
  run (Matrix -> vendor, 50 of the portals linked to live sandbox conversations);
* lookups: the stores the bridge uses per message (``MessageMapStore.event_for`` /
  ``remote_for``, ``PortalStore.by_conversation`` / ``get`` / ``links``, ``GhostStore.get``),
  timed through the bridge's own database layer on random existing keys, with the stores'
  read-through caches off (each call is a miss, as for a message in a room not seen lately).

``scale_lookup_ratio`` is the per-message lookup set's time on the large database over the same
on the empty one. Usage: ``python bench/scale.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BOT,
    DOMAIN,
    bridge_config,
    free_port,
    merge_results,
    new_tokens,
    open_bridge_db,
    rss_mb,
    start_bridge,
    wait_http,
)
from throughput import (  # noqa: E402
    Environment,
    TransactionDriver,
    conversations_in,
    measure_transactions,
)

GHOSTS = 100_000
PORTALS = 100_000
MESSAGES = 1_000_000
LOOKUPS = 5_000
LOOKUP_ROUNDS = 25
CORE_EVENTS = 1_000
STARTS = 5
"""Start-ups timed per database (the median is reported)."""


def _room(i: int) -> str:
    return f"!scale{i:06d}:{DOMAIN}"


def _idnps(i: int) -> str:
    return f"81{i:010d}"


def bulk_fill(path: Path) -> float:
    from bridge.app import PORTAL_ACL_KEY
    from bridge.core.ghost_names import GHOSTS_LISTED_KEY, NAMING_RULE_KEY
    from bridge.db.connector_state import BRIDGE_STATE
    from bridge.values.trust import server_acl
    from connectors.names import RULE

    """Bulk rows into a migrated SQLite database; returns the seconds it took."""
    started = time.monotonic()
    db = sqlite3.connect(path)
    now = int(time.time() * 1000)
    with db:
        db.executemany(
            "INSERT INTO ghost (mxid, connector, idnps, display_name) VALUES (?, ?, ?, ?)",
            (
                (
                    f"@eimis_medipeps_{_idnps(i)}:{DOMAIN}",
                    "medipeps",
                    _idnps(i),
                    f"Given{i} FAMILY{i} - Infirmier",
                )
                for i in range(GHOSTS)
            ),
        )
        db.executemany(
            "INSERT INTO portal (room_id, title, is_direct, voice, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            ((_room(i), f"conversation {i}", i % 3 == 0, BOT, now) for i in range(PORTALS)),
        )
        db.executemany(
            "INSERT INTO portal_link (room_id, connector, conversation_id) VALUES (?, ?, ?)",
            ((_room(i), "medipeps", f"s{i}") for i in range(PORTALS)),
        )
        db.executemany(
            "INSERT INTO message_map (connector, remote_id, room_id, event_id) VALUES (?, ?, ?, ?)",
            (
                ("medipeps", str(i), _room(i % PORTALS), f"$scale{i:07d}event")
                for i in range(MESSAGES)
            ),
        )
        # As a bridge already running with this trust list left them: every portal's ACL in
        # line and every ghost listed in the directory and named by the current rule. The one-time
        # passes after an upgrade (all portals' ACL, all ghosts into the directory, all ghosts
        # renamed by a new naming rule) are not what this measures.
        acl = json.dumps(server_acl([DOMAIN]), sort_keys=True)
        db.executemany(
            "INSERT INTO connector_state (connector, key, value) VALUES (?, ?, ?)",
            [
                (BRIDGE_STATE, PORTAL_ACL_KEY, acl),
                (BRIDGE_STATE, GHOSTS_LISTED_KEY, "1"),
                (BRIDGE_STATE, NAMING_RULE_KEY, RULE),
            ],
        )
    db.execute("ANALYZE")
    db.close()
    return time.monotonic() - started


async def lookups(urls: dict[str, str], seed: int = 7) -> dict[str, dict[str, float]]:
    """Median microseconds per call of each lookup the bridge makes per message, per database.

    The databases are timed in alternating rounds (same keys, same order) so drift in the
    machine's load hits both alike.
    """
    from bridge.db.stores import Stores

    rng = random.Random(seed)
    keys = [rng.randrange(PORTALS) for _ in range(LOOKUPS)]
    msgs = [rng.randrange(MESSAGES) for _ in range(LOOKUPS)]

    def calls(stores: Stores) -> dict[str, Any]:
        return {
            "event_for": lambda i: stores.messages.event_for(
                "medipeps", str(msgs[i]), room_id=_room(msgs[i] % PORTALS)
            ),
            "remote_for": lambda i: stores.messages.remote_for(
                "medipeps", f"$scale{msgs[i]:07d}event", room_id=_room(msgs[i] % PORTALS)
            ),
            "by_conversation": lambda i: stores.portals.by_conversation("medipeps", f"s{keys[i]}"),
            "portal_get": lambda i: stores.portals.get(_room(keys[i])),
            "links": lambda i: stores.portals.links(_room(keys[i])),
            "ghost_get": lambda i: stores.ghosts.get(f"@eimis_medipeps_{_idnps(keys[i])}:{DOMAIN}"),
        }

    # One database open at a time: with two open (two aiosqlite threads), the thread hop that
    # dominates each call was measured at half its cost on one of them, whichever it was.
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in urls}
    per_round = LOOKUPS // LOOKUP_ROUNDS
    names = list(urls)
    for r in range(LOOKUP_ROUNDS):
        for name in names if r % 2 == 0 else reversed(names):
            db = await open_bridge_db(urls[name])
            try:
                # The database's cost, so no cache: every call misses, as in a cold room.
                table = calls(Stores.of(db, cache_size=0))
                for call in table.values():  # warm the page cache and statements
                    for i in range(20):
                        await call(i)
                for op, call in table.items():
                    started = time.perf_counter()
                    for i in range(r * per_round, (r + 1) * per_round):
                        await call(i)
                    elapsed = (time.perf_counter() - started) / per_round * 1e6
                    samples[name].setdefault(op, []).append(elapsed)
            finally:
                await db.stop()
    return {
        name: {op: statistics.median(values) for op, values in table.items()}
        for name, table in samples.items()
    }


def sql_lookups(paths: dict[str, Path], seed: int = 7) -> dict[str, float]:
    """The same lookups as bare SQL on stdlib sqlite3 (no thread hop, no pool): the index cost
    alone, mean microseconds per whole lookup set, per database (alternating rounds)."""
    rng = random.Random(seed)
    keys = [rng.randrange(PORTALS) for _ in range(LOOKUPS)]
    msgs = [rng.randrange(MESSAGES) for _ in range(LOOKUPS)]
    statements = [
        (
            "SELECT event_id FROM message_map "
            "WHERE connector = ? AND remote_id = ? AND room_id = ?",
            lambda i: ("medipeps", str(msgs[i]), _room(msgs[i] % PORTALS)),
        ),
        (
            "SELECT remote_id FROM message_map "
            "WHERE connector = ? AND event_id = ? AND room_id = ?",
            lambda i: ("medipeps", f"$scale{msgs[i]:07d}event", _room(msgs[i] % PORTALS)),
        ),
        (
            "SELECT room_id FROM portal_link WHERE connector = ? AND conversation_id = ?",
            lambda i: ("medipeps", f"s{keys[i]}"),
        ),
        (
            "SELECT room_id, title, is_direct, voice FROM portal WHERE room_id = ?",
            lambda i: (_room(keys[i]),),
        ),
        (
            "SELECT room_id, connector, conversation_id FROM portal_link WHERE room_id = ? "
            "ORDER BY connector",
            lambda i: (_room(keys[i]),),
        ),
        (
            "SELECT mxid, connector, idnps, display_name FROM ghost WHERE mxid = ?",
            lambda i: (f"@eimis_medipeps_{_idnps(keys[i])}:{DOMAIN}",),
        ),
    ]
    conns = {name: sqlite3.connect(path) for name, path in paths.items()}
    totals = dict.fromkeys(conns, 0.0)
    try:
        for conn in conns.values():
            for sql, args in statements:
                for i in range(100):
                    conn.execute(sql, args(i)).fetchall()
        per_round = LOOKUPS // LOOKUP_ROUNDS
        for r in range(LOOKUP_ROUNDS):
            for name, conn in conns.items():
                started = time.perf_counter()
                for i in range(r * per_round, (r + 1) * per_round):
                    for sql, args in statements:
                        conn.execute(sql, args(i)).fetchall()
                totals[name] += time.perf_counter() - started
    finally:
        for conn in conns.values():
            conn.close()
    return {name: total / LOOKUPS * 1e6 for name, total in totals.items()}


async def bridge_runs(http: ClientSession, work: Path, dbs: dict[str, Path]) -> dict[str, Any]:
    """Start the bridge on each database: time to /ready (alternating starts, median),
    memory when idle, and a short core run."""
    env = Environment(work, "scale")
    as_token, hs_token = new_tokens()
    try:
        setup = await conversations_in(http, env, as_token)
        stub, sandbox, rooms = setup.stub, setup.sandbox, setup.rooms
        configs = {}
        for name, path in dbs.items():
            await setup.prefill(f"sqlite:{path}")
            configs[name] = bridge_config(
                homeserver_url=stub.url,
                bridge_port=free_port(),
                database_url=f"sqlite:{path}",
                medipeps_url=sandbox.url,
                as_token=as_token,
                hs_token=hs_token,
            )
        startups: dict[str, list[float]] = {name: [] for name in dbs}
        for attempt in range(STARTS):
            for name, config in configs.items():
                bridge = start_bridge(config, env.dir, env.dir, name=f"bridge-{name}-{attempt}")
                ready_at = await wait_http(
                    http, f"{bridge.url}/ready", bridge, timeout=60, interval=0.005
                )
                startups[name].append(ready_at - bridge.started_at)
                await bridge.stop()
        out: dict[str, Any] = {}
        for name, config in configs.items():
            bridge = start_bridge(config, env.dir, env.dir, name=f"bridge-{name}")
            try:
                await wait_http(http, f"{bridge.url}/ready", bridge, timeout=60)
                await asyncio.sleep(2)
                idle_rss = rss_mb(bridge.pid)
                driver = TransactionDriver(http, bridge.url, hs_token, rooms, f"scale-{name}")
                core = await measure_transactions(
                    http, driver, sandbox.url, CORE_EVENTS, [bridge, stub, sandbox]
                )
                out[name] = {
                    "startup_s": statistics.median(startups[name]),
                    "rss_mb": idle_rss,
                    "rss_mb_after_core": rss_mb(bridge.pid),
                    "peak_rss_mb": rss_mb(bridge.pid, "VmHWM"),
                    "core_events_per_s": core["events_per_s"],
                    "core_order_violations": core["order_violations"] + core["repeats"],
                }
            finally:
                await bridge.stop()
        return out
    finally:
        await env.stop()


async def run(log: Any = print) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="eimis-bench-scale-"))
    empty, large = work / "empty.db", work / "large.db"
    for path in (empty, large):
        db = await open_bridge_db(f"sqlite:{path}")
        await db.stop()
    log(
        f"scale: filling {GHOSTS:,} ghosts, {PORTALS:,} portals+links, "
        f"{MESSAGES:,} message_map rows ..."
    )
    fill_s = bulk_fill(large)
    log(f"  {fill_s:.1f} s, {large.stat().st_size / 2**20:.0f} MiB")
    log("scale: lookups ...")
    timed = await lookups({"empty": f"sqlite:{empty}", "large": f"sqlite:{large}"})
    small_lookups, large_lookups = timed["empty"], timed["large"]
    raw = sql_lookups({"empty": empty, "large": large})
    async with ClientSession(timeout=ClientTimeout(total=60)) as http:
        log("scale: the bridge on each database ...")
        runs = await bridge_runs(http, work, {"empty": empty, "large": large})
    on_empty, on_large = runs["empty"], runs["large"]
    figures: dict[str, Any] = {
        "scale_startup_s": round(on_large["startup_s"], 3),
        "scale_startup_s_empty_db": round(on_empty["startup_s"], 3),
        "scale_rss_mb": round(on_large["rss_mb"], 1),
        "scale_rss_mb_empty_db": round(on_empty["rss_mb"], 1),
        "scale_rss_mb_after_core": round(on_large["rss_mb_after_core"], 1),
        "scale_peak_rss_mb": round(on_large["peak_rss_mb"], 1),
        "scale_lookup_ratio": round(sum(large_lookups.values()) / sum(small_lookups.values()), 3),
        "scale_core_events_per_s": round(on_large["core_events_per_s"], 1),
        "scale_core_events_per_s_empty_db": round(on_empty["core_events_per_s"], 1),
        "scale_core_order_violations": on_large["core_order_violations"],
        "scale_sql_lookup_set_us": round(raw["large"], 1),
        "scale_sql_lookup_set_us_empty_db": round(raw["empty"], 1),
        "scale_sql_lookup_ratio": round(raw["large"] / raw["empty"], 3),
        "scale_db_mb": round(large.stat().st_size / 2**20, 1),
        "scale_fill_s": round(fill_s, 1),
    }
    for name in large_lookups:
        figures[f"scale_lookup_us_{name}"] = round(large_lookups[name], 1)
        figures[f"scale_lookup_us_{name}_empty_db"] = round(small_lookups[name], 1)
    shutil.rmtree(work, ignore_errors=True)
    return figures


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    figures = asyncio.run(run())
    merge_results(figures)
    for key, value in figures.items():
        print(f"{key:<44} {value}")


if __name__ == "__main__":
    main()
