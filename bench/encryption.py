"""The cost of end-to-bridge encryption: latency and the bridge's CPU, encrypted vs plain rooms.

One deployment (``LocalStack``'s Synapse and PandaLab-style sandbox, in this process) with the
bridge in its own process (``python -m bridge run``, the stack's generated config with
``encryption: {enabled: true, default: false}`` and its secrets key; the PandaLab connector
alone, so no other connector's polling adds to the bridge's CPU). One native user, a matrix-nio
device with encryption on (its own store in a temporary directory, a /sync loop running in the
background), opens two DMs with PandaLab-style ghosts (two different sandbox users): an
ENCRYPTED one (``m.room.encryption`` in the initial state) and a PLAIN one. The bridge joins
each and opens the vendor conversation.

* **Latency**, measured interleaved sample by sample (the room that goes first alternates), so
  machine noise hits both rooms alike. Per sample and room, both directions: native -> vendor
  (nio encrypts and sends, until the sandbox's vendor API has the message: a hook on the
  sandbox's kernel, in this process, no polling) and vendor -> native (the PandaLab user posts
  through the sandbox's user API, until the nio client has the message, decrypted, from its
  /sync). p50/p99 per room and direction, and the ratios encrypted / plain per direction;
  ``e2ee_latency_ratio_p50`` (``_p99``) is the WORSE of the two directions' ratios.
* **The bridge's CPU per message**: the bridge process's user+system CPU time
  (``/proc/<pid>/stat``, every thread) before and after a burst of M messages each way in one
  room, bursts alternating plain, encrypted, plain, encrypted (drift cancels); each burst ends
  when every message has arrived and the bridge's CPU has stopped moving (its trailing work,
  e.g. the homeserver's echo of the ghost's sends, is counted). The bridge's idle CPU rate,
  measured before the bursts, is subtracted. Figures: ``e2ee_bridge_cpu_ms_per_message``,
  ``plain_bridge_cpu_ms_per_message`` and ``e2ee_cpu_ratio``.

The nio client's own encryption and decryption (in this process) are part of the end-to-end
latency, as they are for a user; the CPU figures are the bridge's alone.

``--profile``: the bridge runs under cProfile (event-loop thread, during the bursts only) and
the top functions go to ``bench/results/profile_e2ee_bursts.txt`` and
``profile_plain_bursts.txt`` (the raw stats beside them, ``.pstats``); the figures of such a run
are printed, not merged (the profiler inflates them).

Usage: ``python bench/encryption.py [--samples 60] [--burst 40] [--profile]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import ROOT, Child, merge_results, wait_http  # noqa: E402

if str(ROOT / "tests") not in sys.path:
    sys.path.append(str(ROOT / "tests"))  # after bench/ and the project: nothing shadowed

from e2e_latency import percentile  # noqa: E402

from bridge.config import parse_config  # noqa: E402
from bridge.devtools.demo import SandboxUser  # noqa: E402
from bridge.devtools.stack import LocalStack  # noqa: E402

from matrix_user import MatrixUser, connect  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOMS = ("e2ee", "plain")
DIRECTIONS = ("native_to_vendor", "vendor_to_native")
WAIT_S = 30.0
WARMUP = 5


class Arrivals:
    """When each text arrived (monotonic), and futures for the ones awaited: no polling."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.extra: dict[str, Any] = {}
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self.watched: asyncio.Task[None] | None = None
        """The task that records arrivals: waiting ends at once if it fails."""

    def record(self, text: str, extra: Any = None, now: float | None = None) -> None:
        if text in self.at:
            return
        self.at[text] = time.monotonic() if now is None else now
        self.extra[text] = extra
        waiter = self._waiters.pop(text, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(self.at[text])

    async def wait(self, text: str, timeout: float = WAIT_S) -> float:
        if text in self.at:
            return self.at[text]
        waiter = self._waiters.setdefault(text, asyncio.get_running_loop().create_future())
        watched = {self.watched} if self.watched is not None else set()
        done, _ = await asyncio.wait(
            {waiter, *watched}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter in done:
            return waiter.result()
        if self.watched in done:
            raise RuntimeError(f"stopped recording arrivals ({self.watched.exception()!r})")
        raise TimeoutError(f"{text!r} never arrived within {timeout:.0f} s")


def cpu_s(pid: int) -> float:
    """User + system CPU time of a process, all its threads (clock ticks, 10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def settle(pid: int, quiet_s: float = 0.3, timeout: float = 10.0) -> float:
    """Wait until the process has used at most one clock tick over ``quiet_s``; its CPU then."""
    deadline = time.monotonic() + timeout
    window: list[tuple[float, float]] = [(time.monotonic(), cpu_s(pid))]
    while True:
        await asyncio.sleep(0.05)
        now, cpu = time.monotonic(), cpu_s(pid)
        window.append((now, cpu))
        while len(window) > 2 and now - window[1][0] >= quiet_s:
            window.pop(0)
        if now - window[0][0] >= quiet_s and cpu - window[0][1] <= 1.0 / CLK_TCK:
            return cpu
        if now > deadline:
            return cpu


class Room:
    """One DM: the native user and a PandaLab-style user's ghost."""

    def __init__(self, kind: str, room_id: str, vendor_user: SandboxUser) -> None:
        self.kind = kind
        self.room_id = room_id
        self.vendor_user = vendor_user
        self.conversation_id = ""
        self.latency_ms: dict[str, list[float]] = {d: [] for d in DIRECTIONS}
        self.cpu_ms_per_message: list[float] = []


def _profiled_bridge(out_prefix: str, bridge_args: list[str]) -> int:
    """The bridge under cProfile: each SIGUSR1 starts a new profile, each SIGUSR2 writes it to
    ``<out_prefix>.<n>`` (n = 1, 2, ...)."""
    import cProfile

    current: list[cProfile.Profile] = []
    written = [0]

    def start(*_: object) -> None:
        current[:] = [cProfile.Profile()]
        current[0].enable()

    def stop(*_: object) -> None:
        if current:
            current[0].disable()
            written[0] += 1
            current[0].dump_stats(f"{out_prefix}.{written[0]}")
            current.clear()

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from bridge.cli import main as bridge_main

    return int(bridge_main(bridge_args) or 0)


async def run(
    samples: int = 100,
    burst: int = 50,
    log: Callable[[str], None] = print,
    pairs: int = 3,
    profile: bool = False,
) -> dict[str, Any]:
    logging.getLogger("nio").setLevel(logging.ERROR)  # "Missing session for device" etc.
    work = Path(tempfile.mkdtemp(prefix="eimis-bench-e2ee-"))
    stack = LocalStack(
        work / "stack", config_overrides={"encryption": {"enabled": True, "default": False}}
    )
    stack.raw_config["connectors"] = {"pandalab": stack.raw_config["connectors"]["pandalab"]}
    stack.config = parse_config(stack.raw_config)
    vendor = Arrivals()  # text -> conversation id, at the PandaLab-style vendor API
    matrix = Arrivals()  # text -> the nio event, at the native user

    def hooked_pandalab() -> web.Application:
        from connectors.pandalab.sandbox import create_app
        from connectors.sandbox.webtools import KERNEL_KEY

        app = create_app()
        kernel = app[KERNEL_KEY]
        original = kernel.api_writes

        def api_writes(key: str, conversation_id: str, sender: Any, text: str, **kwargs: Any):
            message, new = original(key, conversation_id, sender, text, **kwargs)
            if new:
                vendor.record(text, conversation_id)
            return message, new

        kernel.api_writes = api_writes  # type: ignore[method-assign]
        return app

    stack.sandboxes["pandalab"].app_factory = hooked_pandalab
    bridge: Child | None = None
    native: MatrixUser | None = None
    syncer: asyncio.Task[None] | None = None
    profile_prefix = work / "bridge.pstats"
    ok = False
    try:
        log("e2ee: starting Synapse ...")
        await stack.start(with_bridge=False)
        config = str(stack.state_dir / "config.yaml")
        launcher = [sys.executable, "-m", "bridge"]
        if profile:
            launcher = [sys.executable, __file__, "--profiled-bridge", str(profile_prefix)]
        bridge = Child("bridge", [*launcher, "run", "-c", config], work, stack.bridge_url)
        async with ClientSession() as http:
            await wait_http(http, f"{stack.bridge_url}/ready", bridge, timeout=90, interval=0.05)
            pandalab = stack.sandboxes["pandalab"]
            async with http.get(f"{pandalab.url}/_sandbox/users") as resp:
                listed = (await resp.json())["users"]
            user_id, token = await stack.synapse.register_user("bench.e2ee", "bench-pass-1")
            native = await connect(
                stack.synapse.url, user_id, token, encrypted=True, store_dir=work / "nio"
            )
            rooms: list[Room] = []
            for kind, listed_user in zip(ROOMS, listed[:2], strict=True):
                ghost = f"@eimis_pandalab_{listed_user['idnps']}:{stack.synapse.server_name}"
                room_id = await native.create_room(
                    invite=[ghost], is_direct=True, encrypted=kind == "e2ee"
                )
                rooms.append(Room(kind, room_id, SandboxUser(http, pandalab, listed_user)))
            for room in rooms:
                await native.wait_for_join(room.room_id, ghost_of(stack, room), timeout=WAIT_S)

            async def sync_loop() -> None:
                assert native is not None
                seen = dict.fromkeys((r.room_id for r in rooms), 0)
                while True:
                    await native.sync(timeout=10)
                    now = time.monotonic()
                    for room_id, count in seen.items():
                        messages = native.messages(room_id)
                        for event in messages[count:]:
                            matrix.record(str(getattr(event, "body", "")), event, now)
                        seen[room_id] = len(messages)

            syncer = matrix.watched = asyncio.create_task(sync_loop())
            log("e2ee: opening both DMs ...")
            for room in rooms:
                text = f"{room.kind} opening"
                await native.send_text(room.room_id, text)
                await vendor.wait(text)
                room.conversation_id = str(vendor.extra[text])
                await room.vendor_user.send(room.conversation_id, f"{room.kind} opening reply")
                await matrix.wait(f"{room.kind} opening reply")
                check_encryption(matrix, room, [text, f"{room.kind} opening reply"])

            async def leg(room: Room, direction: str, text: str) -> float:
                assert native is not None
                started = time.monotonic()
                if direction == "native_to_vendor":
                    await native.send_text(room.room_id, text)
                    arrived = await vendor.wait(text)
                else:
                    await room.vendor_user.send(room.conversation_id, text)
                    arrived = await matrix.wait(text)
                return (arrived - started) * 1000

            log(f"e2ee: {WARMUP} warm-up and {samples} measured samples, interleaved ...")
            for n in range(-WARMUP, samples):
                order = rooms if n % 2 == 0 else rooms[::-1]
                for direction in DIRECTIONS:
                    for room in order:
                        ms = await leg(room, direction, f"{room.kind} {direction} {n}")
                        if n >= 0:
                            room.latency_ms[direction].append(ms)
            for room in rooms:
                # Both ways: the native user's own messages come back in its /sync too.
                await matrix.wait(f"{room.kind} native_to_vendor {samples - 1}")
                texts = [f"{room.kind} {d} {n}" for d in DIRECTIONS for n in range(samples)]
                check_encryption(matrix, room, texts)

            pid = bridge.pid
            log("e2ee: the bridge's idle CPU ...")
            await settle(pid)
            t0, c0 = time.monotonic(), cpu_s(pid)
            await asyncio.sleep(3.0)
            idle_cpu_per_s = (cpu_s(pid) - c0) / (time.monotonic() - t0)
            log(f"e2ee: CPU bursts of {burst} messages each way, plain/e2ee alternating ...")
            by_kind = {r.kind: r for r in rooms}
            for b, kind in enumerate(("plain", "e2ee") * pairs):
                room = by_kind[kind]
                assert native is not None
                c0 = await settle(pid)
                t0 = time.monotonic()
                if profile:
                    os.kill(pid, signal.SIGUSR1)
                texts: list[tuple[Arrivals, str]] = []
                for i in range(burst):
                    to_vendor, to_native = f"{kind} burst{b} n2v {i}", f"{kind} burst{b} v2n {i}"
                    await native.send_text(room.room_id, to_vendor)
                    await room.vendor_user.send(room.conversation_id, to_native)
                    texts += [(vendor, to_vendor), (matrix, to_native)]
                for arrivals, text in texts:
                    await arrivals.wait(text)
                c1 = await settle(pid)
                t1 = time.monotonic()
                if profile:
                    os.kill(pid, signal.SIGUSR2)
                    await wait_file(Path(f"{profile_prefix}.{b + 1}"))
                used = (c1 - c0) - idle_cpu_per_s * (t1 - t0)
                room.cpu_ms_per_message.append(used * 1000 / (2 * burst))
                log(f"e2ee:   burst {b + 1} ({kind}): {used * 1000:.0f} ms CPU in {t1 - t0:.1f} s")
        ok = True
    finally:
        if syncer is not None:
            syncer.cancel()
            with contextlib.suppress(BaseException):
                await syncer
        if native is not None:
            with contextlib.suppress(Exception):
                await native.close()
        if bridge is not None:
            if not ok:
                log(f"e2ee: failed; kept {work}. Bridge log (tail):\n{bridge.tail()}")
            await bridge.stop()
        await stack.stop()
    figures = _figures(rooms, samples, burst, idle_cpu_per_s)
    if profile:
        _write_profiles(profile_prefix, burst, pairs)
    shutil.rmtree(work, ignore_errors=True)
    return figures


def check_encryption(matrix: Arrivals, room: Room, texts: list[str]) -> None:
    """The native user's copies of ``texts`` were encrypted in the encrypted room only."""
    for text in texts:
        decrypted = bool(getattr(matrix.extra[text], "decrypted", False))
        if decrypted != (room.kind == "e2ee"):
            raise RuntimeError(f"{text!r} {'was' if decrypted else 'was not'} encrypted")


def ghost_of(stack: LocalStack, room: Room) -> str:
    return f"@eimis_pandalab_{room.vendor_user.idnps}:{stack.synapse.server_name}"


async def wait_file(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or path.stat().st_size == 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not written")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # dump_stats may still be writing


def _figures(rooms: list[Room], samples: int, burst: int, idle_cpu_per_s: float) -> dict[str, Any]:
    figures: dict[str, Any] = {"e2ee_samples": samples, "e2ee_burst_messages_each_way": burst}
    by_kind = {r.kind: r for r in rooms}
    for room in rooms:
        for direction in DIRECTIONS:
            values = room.latency_ms[direction]
            for pct in (50, 99):
                figures[f"{room.kind}_{direction}_ms_p{pct}"] = round(percentile(values, pct), 1)
    for pct in (50, 99):
        ratios = {
            direction: figures[f"e2ee_{direction}_ms_p{pct}"]
            / figures[f"plain_{direction}_ms_p{pct}"]
            for direction in DIRECTIONS
        }
        for direction, ratio in ratios.items():
            figures[f"e2ee_{direction}_ratio_p{pct}"] = round(ratio, 2)
        figures[f"e2ee_latency_ratio_p{pct}"] = round(max(ratios.values()), 2)
    for kind in ROOMS:
        per_burst = by_kind[kind].cpu_ms_per_message
        figures[f"{kind}_bridge_cpu_ms_per_message"] = round(sum(per_burst) / len(per_burst), 2)
        figures[f"{kind}_bridge_cpu_ms_per_message_bursts"] = [round(v, 2) for v in per_burst]
    figures["e2ee_cpu_ratio"] = round(
        figures["e2ee_bridge_cpu_ms_per_message"] / figures["plain_bridge_cpu_ms_per_message"], 2
    )
    figures["e2ee_bridge_idle_cpu_ms_per_s"] = round(idle_cpu_per_s * 1000, 2)
    return figures


def _write_profiles(prefix: Path, burst: int, pairs: int) -> None:
    """Odd bursts were plain, even ones encrypted: one summary of each kind."""
    import pstats

    from throughput import summarise_pstats

    for kind, first in (("plain", 1), ("e2ee", 2)):
        numbers = tuple(range(first, 2 * pairs + 1, 2))
        stats = pstats.Stats(str(prefix.with_name(f"{prefix.name}.{numbers[0]}")))
        for n in numbers[1:]:
            stats.add(str(prefix.with_name(f"{prefix.name}.{n}")))
        merged = RESULTS_DIR / f"profile_{kind}_bursts.pstats"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stats.dump_stats(str(merged))
        text, _, _ = summarise_pstats(merged, 2 * burst * len(numbers), top=40)
        out = RESULTS_DIR / f"profile_{kind}_bursts.txt"
        out.write_text(f"{kind} room, bursts {numbers}, 'events' = messages (both ways)\n{text}\n")
        print(f"profile: {out.relative_to(ROOT)}")


ROWS = [
    ("e2ee_native_to_vendor_ms_p50", "native->vendor p50, encrypted (ms)"),
    ("plain_native_to_vendor_ms_p50", "native->vendor p50, plain (ms)"),
    ("e2ee_vendor_to_native_ms_p50", "vendor->native p50, encrypted (ms)"),
    ("plain_vendor_to_native_ms_p50", "vendor->native p50, plain (ms)"),
    ("e2ee_native_to_vendor_ms_p99", "native->vendor p99, encrypted (ms)"),
    ("plain_native_to_vendor_ms_p99", "native->vendor p99, plain (ms)"),
    ("e2ee_vendor_to_native_ms_p99", "vendor->native p99, encrypted (ms)"),
    ("plain_vendor_to_native_ms_p99", "vendor->native p99, plain (ms)"),
    ("e2ee_native_to_vendor_ratio_p50", "ratio native->vendor p50"),
    ("e2ee_vendor_to_native_ratio_p50", "ratio vendor->native p50"),
    ("e2ee_latency_ratio_p50", "e2ee latency ratio p50 (worse direction; <= 1.3)"),
    ("e2ee_latency_ratio_p99", "e2ee latency ratio p99 (worse direction)"),
    ("e2ee_bridge_cpu_ms_per_message", "bridge CPU per message, encrypted (ms)"),
    ("plain_bridge_cpu_ms_per_message", "bridge CPU per message, plain (ms)"),
    ("e2ee_cpu_ratio", "bridge CPU ratio encrypted / plain"),
    ("e2ee_bridge_idle_cpu_ms_per_s", "bridge idle CPU (ms/s, subtracted)"),
]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--profiled-bridge":
        sys.exit(_profiled_bridge(sys.argv[2], [a for a in sys.argv[3:] if a != "--"]))
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--burst", type=int, default=50, help="messages each way per CPU burst")
    parser.add_argument("--pairs", type=int, default=3, help="CPU bursts: plain+encrypted pairs")
    parser.add_argument("--profile", action="store_true", help="the bridge under cProfile")
    args = parser.parse_args()
    started = time.monotonic()
    figures = asyncio.run(run(args.samples, args.burst, pairs=args.pairs, profile=args.profile))
    if not args.profile:
        merge_results(figures)
    for key, label in ROWS:
        print(f"{label:<52} {figures.get(key, '-'):>10}")
    print(f"({time.monotonic() - started:.0f} s{'; profiled, not merged' if args.profile else ''})")


if __name__ == "__main__":
    main()
