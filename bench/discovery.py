"""Professionals found from any Matrix client's user search: what publishing the directory costs.

A Synapse from ``bridge/devtools/synapse.py`` (its own temp dir; ``user_directory.search_all_users``
on, the bridge's registration with the ghosts NON-exclusive) and a bridge database (SQLite) holding
N directory entries, each reachable through one connector's ghost (rows inserted in bulk through
``DirectoryStore.record_listed_users``). Then:

1. the search latency (p50/p95 of 50 ``POST /user_directory/search`` by a native user) with no
   ghosts on the homeserver;
2. ``Discovery.publish`` timed (register + name every ghost, 16 in flight);
3. waited until a search finds the last published ghost (the user directory updates
   asynchronously);
4. the same 50 searches again, with N ghosts present.

Keys: ``discovery_publish_s``, ``discovery_entries``, ``discovery_ghosts_per_s``,
``discovery_searchable_s`` (publish + the user directory catching up),
``user_search_p50_ms_no_ghosts``, ``user_search_p95_ms_no_ghosts``,
``user_search_p50_ms_with_ghosts``, ``user_search_p95_ms_with_ghosts``,
``user_search_ratio_with_vs_without`` (p50 ratio).

Usage: ``python bench/discovery.py [--entries 100000]`` (or ``bench/run.py --only discovery
--discovery-entries N``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp import ClientSession, ClientTimeout

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import merge_results  # noqa: E402

DOMAIN = "eimis.localhost"
CONNECTOR = "pandalab"
SEARCHES = 50
FIRST_IDNPS = 810_000_000_000
GIVEN = ("Marie", "Paul", "Jeanne", "Luc", "Camille", "Hugo", "Léa", "Louis", "Chloé", "Jules")
FAMILY_ROOTS = ("Dupont", "Martin", "Bernard", "Durand", "Lefèvre", "Moreau", "Laurent", "Roux")


def family_of(i: int) -> str:
    """A family name unique to entry ``i`` (a search for it finds that one professional)."""
    letters = "".join(chr(ord("a") + int(d)) for d in f"{i:06d}")
    return f"{FAMILY_ROOTS[i % len(FAMILY_ROOTS)]}{letters}"


class Entry:
    __slots__ = ("family_name", "given_name", "idnps", "profession")

    def __init__(self, i: int) -> None:
        self.idnps = str(FIRST_IDNPS + i)
        self.given_name = GIVEN[i % len(GIVEN)]
        self.family_name = family_of(i)
        self.profession = "Médecin"


def config_dict(homeserver_url: str, as_token: str, hs_token: str, db_url: str) -> dict[str, Any]:
    return {
        "homeserver": {"url": homeserver_url, "domain": DOMAIN},
        "appservice": {
            "address": "http://127.0.0.1:9",  # nothing is pushed to it during the bench
            "as_token": as_token,
            "hs_token": hs_token,
            "ghosts_in_user_directory": True,
        },
        "database": {"url": db_url},
        "connectors": {CONNECTOR: {"type": CONNECTOR, "settings": {}}},
        "encryption": {"enabled": False},
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def search(http: ClientSession, url: str, token: str, term: str) -> list[dict[str, Any]]:
    async with http.post(
        f"{url}/_matrix/client/v3/user_directory/search",
        headers={"Authorization": f"Bearer {token}"},
        json={"search_term": term, "limit": 10},
    ) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"user directory search: HTTP {resp.status} {body}")
        return list(body.get("results", []))


async def latencies(http: ClientSession, url: str, token: str, terms: list[str]) -> list[float]:
    found = []
    for term in terms:
        started = time.perf_counter()
        await search(http, url, token, term)
        found.append((time.perf_counter() - started) * 1000)
    return found


BASELINE = 1000
"""Users the baseline registers and names straight through the client-server API."""


async def synapse_baseline(http: ClientSession, url: str, as_token: str) -> float:
    """Synapse's own rate for what publishing asks of it (an appservice registration, then a
    display name), ``IN_FLIGHT`` at once, with no bridge in the way: users/s."""
    from bridge.core.discovery import IN_FLIGHT

    headers = {"Authorization": f"Bearer {as_token}"}
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int) -> None:
        localpart = f"eimis_baseline_{i}"
        user_id = f"@{localpart}:{DOMAIN}"
        async with gate:
            async with http.post(
                f"{url}/_matrix/client/v3/register",
                json={
                    "type": "m.login.application_service",
                    "username": localpart,
                    "inhibit_login": True,
                },
                headers=headers,
            ) as r:
                assert r.status == 200, await r.text()
            async with http.put(
                f"{url}/_matrix/client/v3/profile/{user_id}/displayname",
                params={"user_id": user_id},
                json={"displayname": f"Baseline {i} - Médecin"},
                headers=headers,
            ) as r:
                assert r.status == 200, await r.text()

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(BASELINE)))
    return BASELINE / (time.monotonic() - started)


async def run(entries: int = 100_000, log: Any = print) -> dict[str, Any]:
    from bridge.config import parse_config
    from bridge.core.connectors import ConnectorSet
    from bridge.core.discovery import Discovery
    from bridge.db.database import open_database
    from bridge.db.stores import Stores
    from bridge.devtools.synapse import LocalSynapse
    from bridge.matrix.homeserver import Homeserver
    from bridge.registration import user_namespaces

    work = Path(tempfile.mkdtemp(prefix="eimis-bench-discovery-"))
    try:
        as_token, hs_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        raw = config_dict("http://127.0.0.1:1", as_token, hs_token, f"sqlite:{work / 'b.db'}")
        config = parse_config(raw)
        registration = work / "registration.yaml"
        registration.write_text(
            yaml.safe_dump(
                {
                    "id": "eimis-bridge",
                    "url": None,
                    "as_token": as_token,
                    "hs_token": hs_token,
                    "sender_localpart": config.appservice.bot_username,
                    "namespaces": {"users": user_namespaces(config), "aliases": [], "rooms": []},
                    "rate_limited": False,
                }
            )
        )
        async with LocalSynapse(work / "synapse", appservice_registrations=[registration]) as hs:
            raw["homeserver"]["url"] = hs.url
            config = parse_config(raw)
            db = await open_database(config.database)
            try:
                stores = Stores.of(db)
                log(f"discovery: {entries:,} directory entries into the bridge database")
                stamp = await stores.directory.next_stamp()
                for start in range(0, entries, 5000):
                    page = [Entry(i) for i in range(start, min(start + 5000, entries))]
                    await stores.directory.record_listed_users(
                        CONNECTOR, page, lambda i: f"@eimis_{CONNECTOR}_{i}:{DOMAIN}", stamp
                    )
                _, token = await hs.register_user("searcher", "searcher-password")
                rng = random.Random(14)
                terms = [family_of(rng.randrange(entries)) for _ in range(SEARCHES)]
                async with ClientSession(timeout=ClientTimeout(total=60)) as http:
                    await latencies(http, hs.url, token, terms[:5])  # warm-up
                    without = await latencies(http, hs.url, token, terms)
                    log(f"discovery: search p50 {statistics.median(without):.1f} ms, no ghosts")
                    baseline_per_s = await synapse_baseline(http, hs.url, as_token)
                    log(f"discovery: Synapse alone registers + names {baseline_per_s:.1f} users/s")
                    homeserver = Homeserver(config, as_token, db, http)
                    discovery = Discovery(stores, homeserver, ConnectorSet(), config)
                    step = max(entries // 10, 1)

                    def progress(done: int, total: int) -> None:
                        if done % step < 1000 or done == total:
                            log(f"discovery: published {done:,}/{total:,}")

                    started = time.monotonic()
                    report = await discovery.publish(progress=progress)
                    publish_s = time.monotonic() - started
                    log(f"discovery: {report.summary()}")
                    last = family_of(entries - 1)
                    while not await search(http, hs.url, token, last):
                        await asyncio.sleep(0.2)
                    searchable_s = time.monotonic() - started
                    with_ghosts = await latencies(http, hs.url, token, terms)
                    hits = await search(http, hs.url, token, terms[0])
                    await homeserver.close()
            finally:
                await db.stop()
        p50_without = statistics.median(without)
        p50_with = statistics.median(with_ghosts)
        return {
            "discovery_entries": entries,
            "discovery_publish_s": round(publish_s, 1),
            "discovery_searchable_s": round(searchable_s, 1),
            "discovery_ghosts_per_s": round(report.registered / publish_s, 1) if publish_s else 0,
            "discovery_failed": report.failed,
            "discovery_baseline_synapse_per_s": round(baseline_per_s, 1),
            "discovery_vs_synapse": round(report.registered / publish_s / baseline_per_s, 2)
            if publish_s and baseline_per_s
            else None,
            "discovery_search_hit_display_name": hits[0].get("display_name") if hits else None,
            "user_search_p50_ms_no_ghosts": round(p50_without, 2),
            "user_search_p95_ms_no_ghosts": round(pct(without, 0.95), 2),
            "user_search_p50_ms_with_ghosts": round(p50_with, 2),
            "user_search_p95_ms_with_ghosts": round(pct(with_ghosts, 0.95), 2),
            "user_search_ratio_with_vs_without": round(p50_with / p50_without, 2)
            if p50_without
            else None,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    args = parser.parse_args()
    figures = asyncio.run(run(args.entries))
    merge_results(figures)
    for key, value in figures.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
