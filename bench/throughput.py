"""Throughput benchmarks of the bridge, each against baselines measured in the same run.

Every party runs in its own process: the bridge (``python -m bridge run``), the stub homeserver
(``bench/stub_homeserver.py``), the Medipeps-style sandbox with a delivery probe
(``bench/sandbox_server.py``), the naive forwarder (``bench/naive_forwarder.py``); this process
only drives them.

* **Core (Matrix -> vendor)**: 50 portal rooms, each linked to its own Medipeps-style
  conversation (rows written into the bridge's tables before it starts). Appservice transactions
  of 100 ``m.room.message`` events spread over the 50 rooms are PUT one at a time, as Synapse
  does (the next only after the 200). Events/s is counted from the first PUT until the sandbox
  has received every message; the probe checks the order per conversation. On SQLite and on a
  fresh PostgreSQL database.
* **Baseline (a)**: the naive forwarder, fed the same transactions.
* **Baseline (b)**: the client ceiling: a bare aiohttp client posting the same deliveries to the
  same sandbox endpoint, 32 in flight.
* **Vendor -> Matrix**: Medipeps-style users write into the 50 conversations (the sandbox's feed
  fills at once); the bridge polls the feed and its ghosts send into the rooms on the stub.
  Events/s until the stub has received every message; order per room.
* **Profile**: the core and vendor -> Matrix runs once more on SQLite with the bridge under
  cProfile (``bench/profile_bridge.py``) for the measured window only; the top functions by
  cumulative time and the database round trips per event go to
  ``bench/results/profile_core.txt`` and ``profile_vendor_to_matrix.txt``. (``core_bridge(...,
  profile="py-spy")`` samples with py-spy instead, when it is installed.)

Usage: ``python bench/throughput.py [--events 10000] [--no-postgres] [--no-profile]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BOT,
    DOMAIN,
    NATIVE,
    ROOT,
    Child,
    bridge_config,
    free_port,
    merge_results,
    new_tokens,
    open_bridge_db,
    postgres_database,
    python_child,
    start_bridge,
    start_sandbox,
    start_stub,
    wait_http,
)

ROOMS = 50
PER_TXN = 100
CEILING_IN_FLIGHT = 32
PROFILE_TXT = ROOT / "bench" / "results" / "profile_core.txt"
PROFILE_V2M_TXT = ROOT / "bench" / "results" / "profile_vendor_to_matrix.txt"
SEQ = re.compile(r"#(\d+)\s*$")


# Set-up -----------------------------------------------------------------------------------------


async def medipeps_users(http: ClientSession, sandbox_url: str) -> list[dict[str, Any]]:
    async with http.get(f"{sandbox_url}/_sandbox/users") as resp:
        return list((await resp.json())["users"])


async def create_conversations(
    http: ClientSession, sandbox_url: str, users: list[dict[str, Any]], count: int
) -> list[str]:
    """``count`` conversations, each with one sandbox user and the native Matrix user."""
    from connectors.medipeps.sandbox import API_KEY

    ids = []
    for i in range(count):
        body = {
            "subject": f"bench {i}",
            "participants": [users[i % len(users)]["idnps"]],
            "guests": [{"ref": NATIVE, "label": "Nurse Bench"}],
            "request_ref": f"bench-conv-{i}",
        }
        async with http.post(
            f"{sandbox_url}/mp/conversations", json=body, headers={"X-Api-Key": API_KEY}
        ) as resp:
            resp.raise_for_status()
            ids.append(str((await resp.json())["conv"]))
    return ids


def room_ids(count: int) -> list[str]:
    return [f"!benchroom{i:03d}:{DOMAIN}" for i in range(count)]


async def prefill_portals(
    database_url: str, rooms: list[str], conversations: list[str], users: list[dict[str, Any]]
) -> None:
    """Portals linked to the Medipeps conversations, and the ghosts of the sandbox's users."""
    from bridge.db.portal import Portal
    from bridge.db.stores import Stores

    db = await open_bridge_db(database_url)
    try:
        stores = Stores.of(db)
        for room, conversation in zip(rooms, conversations, strict=True):
            await stores.portals.create(Portal(room, f"bench {room}", False, BOT))
            await stores.portals.add_link(room, "medipeps", conversation)
        for user in users:
            name = f"{user['given_name']} {user['family_name']} - {user['profession']}"
            await stores.ghosts.upsert(
                f"@eimis_medipeps_{user['idnps']}:{DOMAIN}", "medipeps", user["idnps"], name
            )
    finally:
        await db.stop()


class Environment:
    """The processes of one measurement, stopped together."""

    def __init__(self, work: Path, name: str) -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def add(self, child: Child) -> Child:
        self.children.append(child)
        return child

    async def stop(self) -> None:
        for child in reversed(self.children):
            await child.stop()


@dataclass
class Conversations:
    """A stub homeserver and a sandbox with ROOMS live conversations, and the rooms for them."""

    stub: Child
    sandbox: Child
    users: list[dict[str, Any]]
    conversations: list[Any]
    rooms: list[str]

    async def prefill(self, database_url: str) -> None:
        """Portals linking each room to its conversation, as the bridge would have made them."""
        await prefill_portals(database_url, self.rooms, self.conversations, self.users)


async def conversations_in(http: ClientSession, env: Environment, as_token: str) -> Conversations:
    stub = env.add(await start_stub(http, env.dir, as_token))
    sandbox = env.add(await start_sandbox(http, env.dir))
    users = await medipeps_users(http, sandbox.url)
    conversations = await create_conversations(http, sandbox.url, users, ROOMS)
    return Conversations(stub, sandbox, users, conversations, room_ids(ROOMS))


# Driving transactions and waiting for deliveries ---------------------------------------------


class TransactionDriver:
    """Builds and sends appservice transactions as a homeserver would, one at a time."""

    def __init__(
        self, http: ClientSession, target_url: str, hs_token: str, rooms: list[str], run: str
    ) -> None:
        self.http = http
        self.url = target_url
        self.headers = {"Authorization": f"Bearer {hs_token}"}
        self.rooms = rooms
        self.run = run
        self._txn = 0
        self._event = 0
        self._seq = Counter[str]()

    def _events(self, count: int) -> list[dict[str, Any]]:
        events = []
        now = int(time.time() * 1000)
        for _ in range(count):
            room = self.rooms[self._event % len(self.rooms)]
            self._event += 1
            self._seq[room] += 1
            events.append(
                {
                    "type": "m.room.message",
                    "room_id": room,
                    "sender": NATIVE,
                    "event_id": f"${self.run}-{self._event}",
                    "origin_server_ts": now,
                    "unsigned": {"age": 1},
                    "content": {
                        "msgtype": "m.text",
                        "body": f"hello {room[1:14]} #{self._seq[room]}",
                    },
                }
            )
        return events

    async def send(self, total: int, per_txn: int = PER_TXN) -> float:
        """Send ``total`` events; returns when the last transaction was acknowledged."""
        left = total
        while left > 0:
            batch = self._events(min(per_txn, left))
            left -= len(batch)
            self._txn += 1
            async with self.http.put(
                f"{self.url}/_matrix/app/v1/transactions/{self.run}-{self._txn}",
                json={"events": batch},
                headers=self.headers,
            ) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"transaction refused: {resp.status} {await resp.text()}")
                await resp.read()
        return time.monotonic()


async def probe(http: ClientSession, sandbox_url: str) -> dict[str, Any]:
    async with http.get(f"{sandbox_url}/_bench/probe") as resp:
        return dict(await resp.json())


async def wait_probe(
    http: ClientSession, sandbox_url: str, count: int, timeout: float, watch: list[Child] = ()
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = await probe(http, sandbox_url)
        if state["count"] >= count:
            return state
        for child in watch:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
        if time.monotonic() > deadline:
            state["timed_out"] = True
            return state
        await asyncio.sleep(0.02)


async def reset_probe(http: ClientSession, sandbox_url: str) -> None:
    async with http.post(f"{sandbox_url}/_bench/reset") as resp:
        resp.raise_for_status()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_transactions(
    http: ClientSession,
    driver: TransactionDriver,
    sandbox_url: str,
    events: int,
    watch: list[Child],
    during: Any = None,
) -> dict[str, Any]:
    """Warm up (one event per room), then send ``events`` and wait for all of them."""
    await driver.send(len(driver.rooms))
    warm = await wait_probe(http, sandbox_url, len(driver.rooms), 60, watch)
    if warm.get("timed_out"):
        raise RuntimeError(f"warm-up not delivered: {warm}")
    await reset_probe(http, sandbox_url)
    handle = await during() if during is not None else None
    cpu_before = {c.name: cpu_seconds(c.pid) for c in watch}
    started = time.monotonic()
    acked = await driver.send(events)
    state = await wait_probe(http, sandbox_url, events, 60 + events / 100, watch)
    wall = time.monotonic() - started
    cpu = {
        name: round((cpu_seconds(c.pid) - cpu_before[name]) / wall, 2)
        for c in watch
        if (name := c.name) in cpu_before
    }
    if handle is not None:
        await handle()
    end = state["last_at"] or time.monotonic()
    elapsed = end - started
    return {
        "events": events,
        "delivered": state["count"],
        "seconds": elapsed,
        "events_per_s": state["count"] / elapsed if elapsed > 0 else 0.0,
        "ack_events_per_s": events / (acked - started),
        "order_violations": state["violations"],
        "repeats": state["repeats"],
        "timed_out": bool(state.get("timed_out")),
        "cpu_cores_used": cpu,
    }


# The bridge, Matrix -> vendor ------------------------------------------------------------------


async def core_bridge(
    http: ClientSession,
    work: Path,
    name: str,
    database_url: str,
    events: int,
    profile: str | None = None,
) -> dict[str, Any]:
    """``profile``: None, "py-spy" (sampling, attached for the measured window) or "cprofile"."""
    env = Environment(work, name)
    as_token, hs_token = new_tokens()
    try:
        setup = await conversations_in(http, env, as_token)
        await setup.prefill(database_url)
        stub, sandbox, rooms = setup.stub, setup.sandbox, setup.rooms
        config = bridge_config(
            homeserver_url=stub.url,
            bridge_port=free_port(),
            database_url=database_url,
            medipeps_url=sandbox.url,
            as_token=as_token,
            hs_token=hs_token,
        )
        launcher = None
        if profile == "cprofile":
            launcher = [
                sys.executable,
                str(ROOT / "bench" / "profile_bridge.py"),
                "--out",
                str(env.dir / "core.pstats"),
                "--",
            ]
        bridge = env.add(start_bridge(config, env.dir, env.dir, launcher=launcher))
        await wait_http(http, f"{bridge.url}/ready", bridge, timeout=60)
        driver = TransactionDriver(http, bridge.url, hs_token, rooms, name)
        during = None
        if profile == "py-spy":
            during = _py_spy_window(bridge.pid, env.dir / "py-spy.raw")
        elif profile == "cprofile":
            during = _cprofile_window(bridge.pid, env.dir / "core.pstats")
        figures = await measure_transactions(
            http, driver, sandbox.url, events, [bridge, stub, sandbox], during
        )
        async with http.get(f"{stub.url}/_stub/stats") as resp:
            stats = await resp.json()
            figures["stub_unknown_calls"] = stats["unknown"]
            figures["stub_calls"] = stats["calls"]
        if profile == "py-spy":
            figures["profile_raw"] = str(env.dir / "py-spy.raw")
        elif profile == "cprofile":
            figures["profile_pstats"] = str(env.dir / "core.pstats")
        return figures
    finally:
        await env.stop()


def _py_spy_window(pid: int, out: Path):
    """Start py-spy on ``pid`` now; the returned coroutine function stops it (output written)."""

    async def start():
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        proc = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                "250",
                *os.environ.get("BENCH_PYSPY_EXTRA", "").split(),
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(0.5)  # attached before the measured window

        async def stop():
            proc.send_signal(signal.SIGINT)
            for _ in range(200):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                proc.kill()

        return stop

    return start


def _cprofile_window(pid: int, out: Path):
    """Profile the bridge (run by bench/profile_bridge.py) from now until the returned stop."""

    async def start():
        os.kill(pid, signal.SIGUSR1)

        async def stop():
            os.kill(pid, signal.SIGUSR2)
            for _ in range(200):
                if out.exists():
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)

        return stop

    return start


# Baselines -------------------------------------------------------------------------------------


async def core_naive(
    http: ClientSession, work: Path, events: int, *, uvloop: bool = False
) -> dict[str, Any]:
    env = Environment(work, "naive-uvloop" if uvloop else "naive")
    _, hs_token = new_tokens()
    try:
        sandbox = env.add(await start_sandbox(http, env.dir))
        users = await medipeps_users(http, sandbox.url)
        conversations = await create_conversations(http, sandbox.url, users, ROOMS)
        rooms = room_ids(ROOMS)
        mapping = env.dir / "rooms.json"
        mapping.write_text(json.dumps(dict(zip(rooms, conversations, strict=True))))
        port = free_port()
        forwarder = env.add(
            python_child(
                "naive-forwarder",
                "bench/naive_forwarder.py",
                [
                    "--port",
                    str(port),
                    f"--hs-token={hs_token}",  # a token may begin with "-"
                    "--sandbox-url",
                    sandbox.url,
                    "--rooms",
                    str(mapping),
                    *(["--uvloop"] if uvloop else []),
                ],
                env.dir,
                f"http://127.0.0.1:{port}",
            )
        )
        await wait_http(http, f"{forwarder.url}/_matrix/mau/ready", forwarder)
        driver = TransactionDriver(http, forwarder.url, hs_token, rooms, "naive")
        return await measure_transactions(http, driver, sandbox.url, events, [forwarder, sandbox])
    finally:
        await env.stop()


async def client_ceiling(http: ClientSession, work: Path, events: int) -> dict[str, Any]:
    """The same deliveries posted straight to the sandbox by a bare client, 32 in flight."""
    from connectors.medipeps.sandbox import API_KEY

    env = Environment(work, "ceiling")
    try:
        sandbox = env.add(await start_sandbox(http, env.dir))
        users = await medipeps_users(http, sandbox.url)
        conversations = await create_conversations(http, sandbox.url, users, ROOMS)
        headers = {"X-Api-Key": API_KEY}
        seq = Counter[str]()

        def body(n: int) -> tuple[str, dict[str, Any]]:
            conversation = conversations[n % len(conversations)]
            seq[conversation] += 1
            return conversation, {
                "author_ref": NATIVE,
                "author_label": "Nurse Bench",
                "body": f"hello {conversation} #{seq[conversation]}",
                "request_ref": f"ceiling-{n}",
            }

        async def post_all(client: ClientSession, first: int, total: int) -> float:
            queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
            for n in range(first, first + total):
                queue.put_nowait(body(n))

            async def worker() -> None:
                while not queue.empty():
                    conversation, payload = queue.get_nowait()
                    async with client.post(
                        f"{sandbox.url}/mp/conversations/{conversation}/messages",
                        json=payload,
                        headers=headers,
                    ) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"sandbox refused: {resp.status}")

            started = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(CEILING_IN_FLIGHT)))
            return time.monotonic() - started

        async with ClientSession(connector=TCPConnector(limit=CEILING_IN_FLIGHT)) as client:
            await post_all(client, 0, ROOMS)  # warm-up, as the other runs
            await reset_probe(http, sandbox.url)
            elapsed = await post_all(client, ROOMS, events)
        state = await probe(http, sandbox.url)
        return {
            "events": events,
            "delivered": state["count"],
            "seconds": elapsed,
            "events_per_s": state["count"] / elapsed,
            "order_violations": state["violations"],
        }
    finally:
        await env.stop()


# Vendor -> Matrix -------------------------------------------------------------------------------


async def vendor_to_matrix(
    http: ClientSession, work: Path, database_url: str, events: int, profile: str | None = None
) -> dict[str, Any]:
    env = Environment(work, "vendor-to-matrix")
    as_token, hs_token = new_tokens()
    try:
        setup = await conversations_in(http, env, as_token)
        await setup.prefill(database_url)
        stub, sandbox, users, conversations = (
            setup.stub,
            setup.sandbox,
            setup.users,
            setup.conversations,
        )
        # The feed is polled every poll_interval_s when idle (at once while pages are full): a
        # short interval so the run measures the bridge, not the idle wait before the first poll.
        config = bridge_config(
            homeserver_url=stub.url,
            bridge_port=free_port(),
            database_url=database_url,
            medipeps_url=sandbox.url,
            as_token=as_token,
            hs_token=hs_token,
            poll_interval_s=0.05,
        )
        launcher = None
        if profile == "cprofile":
            launcher = [
                sys.executable,
                str(ROOT / "bench" / "profile_bridge.py"),
                "--out",
                str(env.dir / "v2m.pstats"),
                "--",
            ]
        bridge = env.add(start_bridge(config, env.dir, env.dir, launcher=launcher))
        await wait_http(http, f"{bridge.url}/ready", bridge, timeout=60)
        author = {c: users[i % len(users)]["idnps"] for i, c in enumerate(conversations)}
        seq = Counter[str]()

        def writes(total: int) -> list[list[str]]:
            out = []
            for n in range(total):
                conversation = conversations[n % len(conversations)]
                seq[conversation] += 1
                out.append(
                    [
                        author[conversation],
                        conversation,
                        f"vendor {conversation} #{seq[conversation]}",
                    ]
                )
            return out

        async def stub_count() -> dict[str, Any]:
            async with http.get(f"{stub.url}/_stub/stats") as resp:
                return dict(await resp.json())

        async def write(total: int) -> float:
            async with http.post(
                f"{sandbox.url}/_bench/user_writes", json={"writes": writes(total)}
            ) as resp:
                resp.raise_for_status()
                return float((await resp.json())["at"])

        async def wait_stub(count: int, timeout: float) -> dict[str, Any]:
            deadline = time.monotonic() + timeout
            while True:
                stats = await stub_count()
                if stats["message_count"] >= count or time.monotonic() > deadline:
                    return stats
                for child in (bridge, stub, sandbox):
                    if not child.alive():
                        raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
                await asyncio.sleep(0.02)

        await write(ROOMS)  # warm-up: every ghost joins its room once
        warm = await wait_stub(ROOMS, 60)
        base = warm["message_count"]
        stop_profile = None
        if profile == "cprofile":
            stop_profile = await _cprofile_window(bridge.pid, env.dir / "v2m.pstats")()
        started = await write(events)
        stats = await wait_stub(base + events, 60 + events / 100)
        if stop_profile is not None:
            await stop_profile()
        delivered = stats["message_count"] - base
        elapsed = (stats["last_message_at"] or time.monotonic()) - started
        async with http.get(
            f"{stub.url}/_stub/messages", params={"sender_prefix": "@eimis_medipeps_"}
        ) as resp:
            per_room = await resp.json()
        violations = repeats = 0
        for bodies in per_room.values():
            last = 0
            for body in bodies:
                match = SEQ.search(body)
                if match is None:
                    continue
                n = int(match.group(1))
                violations += n < last
                repeats += n == last
                last = max(last, n)
        return {
            "profile_pstats": str(env.dir / "v2m.pstats") if profile else None,
            "events": events,
            "delivered": delivered,
            "seconds": elapsed,
            "events_per_s": delivered / elapsed if elapsed > 0 else 0.0,
            "order_violations": violations,
            "repeats": repeats,
            "stub_unknown_calls": stats["unknown"],
        }
    finally:
        await env.stop()


# Profile ----------------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_PLUMBING = ("/asyncio/", "selectors.py", "<frozen", "runpy", "threading.py", "contextlib.py")


def _short(path: str) -> str:
    path = path.split("site-packages/")[-1].split("/work/main/")[-1]
    return re.sub(r"^.*/lib/python3\.\d+/", "", path)


def summarise_pspy(raw: Path, top: int = 30) -> str:
    """py-spy raw (collapsed) stacks -> the functions with the most inclusive samples."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame.strip())
            if match is not None:
                frames.append(f"{match.group('func')} ({_short(match.group('file'))})")
        for name in dict.fromkeys(frames):
            inclusive[name] += count
        if frames:
            own[frames[-1]] += count
    lines = [f"py-spy samples: {total}", f"{'incl %':>7} {'self %':>7}  function (file)"]
    lines += [
        f"{100 * n / total:>7.1f} {100 * own[name] / total:>7.1f}  {name}"
        for name, n in inclusive.most_common(top)
        if total
    ]
    return "\n".join(lines)


def summarise_pstats(
    path: Path, events: int, top: int = 30
) -> tuple[str, list[dict[str, Any]], dict[str, float]]:
    """cProfile stats of the bridge's event-loop thread over a measured window.

    Returns the report text, the top functions by cumulative time (asyncio plumbing left out)
    and per-event counters (database round trips to aiosqlite's thread, IntentAPI objects built).
    """
    import pstats

    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    rows = []
    idle = 0.0
    round_trips = intents = 0
    for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.items():
        if func == "<method 'poll' of 'select.epoll' objects>":
            idle += tt
        if func == "<method 'put_nowait' of '_queue.SimpleQueue' objects>":
            round_trips += nc
        if file.endswith("mautrix/appservice/api/intent.py") and func == "__init__":
            intents += nc
        builtin = file == "~"
        if not builtin and any(p in file for p in _PLUMBING):
            continue
        name = func if builtin else f"{func} ({_short(file)}:{line})"
        rows.append(
            {"function": name, "cumtime_s": ct, "tottime_s": tt, "calls": nc, "builtin": builtin}
        )
    total = max(sum(v[2] for v in stats.values()), 1e-9)  # the whole profiled window
    busy = total - idle
    idle_names = {"<method 'poll' of 'select.epoll' objects>"}
    by_cum = sorted(
        (r for r in rows if not r["builtin"]), key=lambda r: r["cumtime_s"], reverse=True
    )[:top]
    by_tot = sorted(
        (r for r in rows if r["function"] not in idle_names),
        key=lambda r: r["tottime_s"],
        reverse=True,
    )[:15]
    per_event = {
        "db_round_trips_per_event": round(round_trips / events, 1),
        "intent_objects_per_event": round(intents / events, 2),
        "busy_share_of_window": round(busy / total, 3),
        "cpu_ms_per_event_profiled": round(busy * 1000 / events, 2),
    }
    lines = [
        f"profiled window {total:.1f} s (cProfile, event-loop thread), {events} events; "
        f"idle in epoll {idle:.1f} s; busy {busy:.1f} s = "
        f"{per_event['cpu_ms_per_event_profiled']} ms per event under the profiler",
        f"database round trips to aiosqlite's thread per event: "
        f"{per_event['db_round_trips_per_event']}; "
        f"mautrix IntentAPI objects built per event: {per_event['intent_objects_per_event']}",
        "",
        "Top functions by cumulative time (coroutines: time on the stack, i.e. CPU in the "
        "function and below; asyncio/contextlib plumbing omitted):",
        f"{'cum s':>7} {'% busy':>7} {'own s':>7}  function",
    ]
    lines += [
        f"{r['cumtime_s']:>7.2f} {100 * r['cumtime_s'] / busy:>7.1f} "
        f"{r['tottime_s']:>7.2f}  {r['function']}"
        for r in by_cum
    ]
    lines += [
        "",
        "Top functions by own time (C built-ins included; put_nowait is the hand-over "
        "to aiosqlite's thread):",
        f"{'own s':>7} {'% busy':>7}  function",
    ]
    lines += [
        f"{r['tottime_s']:>7.2f} {100 * r['tottime_s'] / busy:>7.1f}  {r['function']}"
        for r in by_tot
    ]
    table = [
        {"function": r["function"], "cumulative_pct_of_busy": round(100 * r["cumtime_s"] / busy, 1)}
        for r in by_cum
    ]
    return "\n".join(lines), table, per_event


# Entry ------------------------------------------------------------------------------------------


async def _profiles(http: ClientSession, work: Path, events: int, log: Any) -> dict[str, Any]:
    """Core and vendor -> Matrix once more on SQLite, the bridge under cProfile for the measured
    window; the reports go to bench/results/profile_*.txt."""
    figures: dict[str, Any] = {}
    try:
        log(f"profile: core on SQLite under cProfile ({events} events) ...")
        prof = await core_bridge(
            http, work, "core-profile", f"sqlite:{work}/profile.db", events, profile="cprofile"
        )
        text, rows, per_event = summarise_pstats(Path(prof["profile_pstats"]), events)
        PROFILE_TXT.write_text(
            f"Core benchmark (Matrix -> Medipeps-style, SQLite): {events} events, "
            f"{prof['events_per_s']:.0f} events/s under the profiler\n{text}\n"
        )
        figures["profile_core_events_per_s_profiled"] = round(prof["events_per_s"], 1)
        figures.update({f"profile_core_{k}": v for k, v in per_event.items()})
        figures["profile_core_top"] = rows[:20]
        log(f"  written to {PROFILE_TXT.relative_to(ROOT)}")
        log(f"profile: vendor -> Matrix on SQLite under cProfile ({events} events) ...")
        prof = await vendor_to_matrix(
            http, work, f"sqlite:{work}/profile-v2m.db", events, profile="cprofile"
        )
        text, rows, per_event = summarise_pstats(Path(prof["profile_pstats"]), events)
        PROFILE_V2M_TXT.write_text(
            f"Vendor -> Matrix benchmark (Medipeps-style feed -> stub homeserver, SQLite): "
            f"{events} events, {prof['events_per_s']:.0f} events/s under the profiler\n{text}\n"
        )
        figures["profile_v2m_events_per_s_profiled"] = round(prof["events_per_s"], 1)
        figures.update({f"profile_v2m_{k}": v for k, v in per_event.items()})
        figures["profile_v2m_top"] = rows[:20]
        log(f"  written to {PROFILE_V2M_TXT.relative_to(ROOT)}")
    except Exception as error:  # the profile is extra: never lose the numbers for it
        log(f"  profile failed: {type(error).__name__}: {error}")
    return figures


async def run(
    events: int = 10_000,
    *,
    postgres: bool = True,
    profile: bool = True,
    profile_events: int = 2_000,
    log: Any = print,
) -> dict[str, Any]:
    """Every throughput measurement; one that fails leaves ``<name>_error`` and the others run."""
    work = Path(tempfile.mkdtemp(prefix="eimis-bench-throughput-"))
    figures: dict[str, Any] = {"core_events": events}
    measured: dict[str, dict[str, Any]] = {}

    async def attempt(name: str, label: str, make: Any) -> None:
        log(f"{label} ...")
        try:
            measured[name] = result = await make()
        except Exception as error:
            figures[f"{name}_error"] = f"{type(error).__name__}: {error}"[:500]
            log(f"  FAILED: {figures[f'{name}_error'][:300]}")
            return
        note = " (TIMED OUT: not everything arrived)" if result.get("timed_out") else ""
        log(f"  {result['events_per_s']:.0f} events/s{note}")

    async with ClientSession(timeout=ClientTimeout(total=120)) as http:
        await attempt(
            "core_sqlite",
            f"core: bridge on SQLite, {events} events",
            lambda: core_bridge(http, work, "core-sqlite", f"sqlite:{work}/core.db", events),
        )
        await attempt(
            "core_naive",
            "core: baseline (a) naive forwarder",
            lambda: core_naive(http, work, events),
        )
        await attempt(
            "core_naive_uvloop",
            "core: baseline (a') naive forwarder on uvloop, the bridge's event loop",
            lambda: core_naive(http, work, events, uvloop=True),
        )
        await attempt(
            "core_ceiling",
            "core: baseline (b) client ceiling",
            lambda: client_ceiling(http, work, events),
        )
        # The local PostgreSQL server is shared: a test elsewhere may restart it mid-run (the
        # bridge then exits). One more try on a fresh database once it answers again.
        for try_ in (1, 2):
            if not postgres:
                break
            figures.pop("core_postgres_error", None)
            async with postgres_database("eimis_bench_core") as pg_url:
                if pg_url is None:
                    figures["core_postgres_error"] = "PostgreSQL at 127.0.0.1:5432 unreachable"
                    log("core: PostgreSQL unreachable")
                else:
                    await attempt(
                        "core_postgres",
                        f"core: bridge on PostgreSQL (try {try_})",
                        lambda url=pg_url, n=try_: core_bridge(
                            http, work, f"core-postgres-{n}", url, events
                        ),
                    )
            if "core_postgres_error" not in figures:
                break
            figures["core_postgres_retried"] = 1
            await asyncio.sleep(10)
        await attempt(
            "vendor_to_matrix",
            "vendor -> Matrix: bridge on SQLite",
            lambda: vendor_to_matrix(http, work, f"sqlite:{work}/v2m.db", events),
        )
        if profile:
            figures.update(await _profiles(http, work, profile_events, log))

    sqlite, naive = measured.get("core_sqlite"), measured.get("core_naive")
    ceiling, pg = measured.get("core_ceiling"), measured.get("core_postgres")
    v2m = measured.get("vendor_to_matrix")
    for engine, run_ in (("sqlite", sqlite), ("postgres", pg)):
        if run_ is not None:
            figures[f"core_events_per_s_{engine}"] = round(run_["events_per_s"], 1)
            figures[f"core_ack_events_per_s_{engine}"] = round(run_["ack_events_per_s"], 1)
            figures[f"core_delivered_{engine}"] = run_["delivered"]
            figures[f"core_bridge_cpu_cores_{engine}"] = run_["cpu_cores_used"].get("bridge")
    if naive is not None:
        figures["core_baseline_naive_events_per_s"] = round(naive["events_per_s"], 1)
        figures["core_baseline_naive_order_violations"] = naive["order_violations"]
        figures["core_baseline_naive_delivered"] = naive["delivered"]
    naive_uvloop = measured.get("core_naive_uvloop")
    if naive_uvloop is not None:
        figures["core_baseline_naive_uvloop_events_per_s"] = round(naive_uvloop["events_per_s"], 1)
        if sqlite is not None:
            figures["core_ratio_vs_baseline_same_loop"] = round(
                sqlite["events_per_s"] / naive_uvloop["events_per_s"], 3
            )
    if ceiling is not None:
        figures["core_baseline_client_ceiling_events_per_s"] = round(ceiling["events_per_s"], 1)
    if sqlite is not None and naive is not None:
        figures["core_ratio_vs_baseline"] = round(sqlite["events_per_s"] / naive["events_per_s"], 3)
    if sqlite is not None and ceiling is not None:
        figures["core_ratio_vs_client_ceiling"] = round(
            sqlite["events_per_s"] / ceiling["events_per_s"], 3
        )
    runs = [r for r in (sqlite, pg) if r is not None]
    if runs:
        # A message arriving after a later one of its room, or a second time.
        figures["core_order_violations"] = sum(r["order_violations"] + r["repeats"] for r in runs)
        figures["core_undelivered"] = sum(r["events"] - r["delivered"] for r in runs)
    if v2m is not None:
        figures.update(
            {
                "vendor_to_matrix_events_per_s": round(v2m["events_per_s"], 1),
                "vendor_to_matrix_delivered": v2m["delivered"],
                "vendor_to_matrix_order_violations": v2m["order_violations"] + v2m["repeats"],
                "vendor_to_matrix_undelivered": v2m["events"] - v2m["delivered"],
            }
        )
    if not any(key.endswith("_error") for key in figures):
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"  logs of the failed runs kept in {work}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile-events", type=int, default=2_000)
    args = parser.parse_args()
    figures = asyncio.run(
        run(
            args.events,
            postgres=not args.no_postgres,
            profile=not args.no_profile,
            profile_events=args.profile_events,
        )
    )
    merge_results(figures)
    for key, value in figures.items():
        print(f"{key:<48} {value}")


if __name__ == "__main__":
    main()
