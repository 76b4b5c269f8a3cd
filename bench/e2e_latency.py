"""End-to-end latency through a real Synapse, against Synapse's own appservice latency.

The deployment is ``LocalStack``'s (Synapse, both sandboxes) with the bridge in its own process
(``eimis-bridge run``). A PandaLab-style user opens a conversation with a Medipeps-style user;
each sample is one message written in the PandaLab-style app (the sandbox's user API) until it
appears at the Medipeps-style vendor API (the sandbox's kernel, timestamped in this process).
Its path: webhook -> bridge inbox -> ghost send to Synapse -> outbox -> Medipeps-style API (the
bridge relays what a ghost sent to the room's other vendors itself, without waiting for Synapse
to push the event back in an appservice transaction; that push, when it comes, adds nothing).

The baseline, measured in the same run and interleaved sample by sample: Synapse's own
client-send -> appservice-delivery latency. A tiny appservice (registered beside the bridge,
non-exclusive namespace of one native user alone in a room) timestamps the transaction that
carries a message the native user sent through ``PUT /rooms/{room}/send``. It is what a bridge
that waits for the homeserver's push pays at least once on this path, so
``e2e_overhead_ratio`` compares the bridge's whole path with that one Synapse hop.

Usage: ``python bench/e2e_latency.py [--samples 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp import ClientSession, web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, merge_results, wait_http  # noqa: E402
from sandbox_server import instrument  # noqa: E402

from bridge.devtools.demo import SandboxUser  # noqa: E402
from bridge.devtools.ports import free_port  # noqa: E402
from bridge.devtools.stack import LocalStack  # noqa: E402


class ProbeAppservice:
    """The tiny appservice: records when each message event reaches it."""

    def __init__(self, hs_token: str) -> None:
        self.hs_token = hs_token
        self.arrivals: dict[str, float] = {}
        self.port = free_port()
        self.app = web.Application()
        self.app.add_routes(
            [
                web.put("/_matrix/app/v1/transactions/{txn}", self.transaction),
                web.put("/transactions/{txn}", self.transaction),
                web.post("/_matrix/app/v1/ping", self.ok),
                web.get("/_matrix/app/v1/users/{user}", self.not_found),
                web.get("/_matrix/app/v1/rooms/{alias}", self.not_found),
            ]
        )
        self.runner: web.AppRunner | None = None

    async def transaction(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        body = await request.json()
        for event in body.get("events", []):
            text = (event.get("content") or {}).get("body")
            if isinstance(text, str):
                self.arrivals.setdefault(text, now)
        return web.json_response({})

    async def ok(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def not_found(self, request: web.Request) -> web.Response:
        return web.json_response({"errcode": "M_NOT_FOUND"}, status=404)

    def registration(self, native_localpart: str, domain: str) -> dict[str, Any]:
        return {
            "id": "bench-latency-probe",
            "url": f"http://127.0.0.1:{self.port}",
            "as_token": secrets.token_urlsafe(32),
            "hs_token": self.hs_token,
            "sender_localpart": "benchprobe",
            "namespaces": {
                "users": [{"exclusive": False, "regex": f"@{native_localpart}:{domain}"}],
                "aliases": [],
                "rooms": [],
            },
            "rate_limited": False,
        }

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1))))
    return ordered[rank]


async def wait_key(store: dict[str, float], key: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while key not in store:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key!r} never arrived")
        await asyncio.sleep(0.001)
    return store[key]


async def run(samples: int = 100, log: Any = print) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="eimis-bench-e2e-"))
    stack = LocalStack(work / "stack")
    medipeps = stack.sandboxes["medipeps"]
    probe_holder: dict[str, Any] = {}

    def instrumented_medipeps() -> web.Application:
        from connectors.medipeps.sandbox import create_app

        app = create_app()
        probe_holder["probe"] = instrument(app)
        return app

    medipeps.app_factory = instrumented_medipeps
    native_localpart = "bench.native"
    tiny = ProbeAppservice(secrets.token_urlsafe(32))
    registration = work / "probe-registration.yaml"
    work.mkdir(parents=True, exist_ok=True)
    registration.write_text(
        yaml.safe_dump(tiny.registration(native_localpart, stack.synapse.server_name))
    )
    stack.synapse.appservice_registrations = (
        *stack.synapse.appservice_registrations,
        registration.resolve(),
    )
    await tiny.start()
    log("e2e: starting Synapse ...")
    await stack.start(with_bridge=False)
    bridge = subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "-c", str(stack.state_dir / "config.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(ROOT),
    )
    try:
        async with ClientSession() as http:
            await wait_http(http, f"{stack.bridge_url}/ready", timeout=90, interval=0.1)
            probe = probe_holder["probe"]
            probe.keep_arrivals = True
            # The native user, alone in a room (so the probe appservice sees only its events).
            user_id, token = await stack.synapse.register_user(native_localpart, "bench-pass-1")
            headers = {"Authorization": f"Bearer {token}"}
            async with http.post(
                f"{stack.synapse.url}/_matrix/client/v3/createRoom",
                json={"preset": "private_chat"},
                headers=headers,
            ) as resp:
                room_id = (await resp.json())["room_id"]

            async def native_send(text: str, n: int) -> float:
                started = time.monotonic()
                async with http.put(
                    f"{stack.synapse.url}/_matrix/client/v3/rooms/{room_id}/send/"
                    f"m.room.message/lat{n}",
                    json={"msgtype": "m.text", "body": text},
                    headers=headers,
                ) as resp:
                    resp.raise_for_status()
                    await resp.read()
                return started

            # The bridged conversation: PandaLab-style user -> Medipeps-style user.
            pandalab = stack.sandboxes["pandalab"]
            async with http.get(f"{pandalab.url}/_sandbox/users") as resp:
                alice = SandboxUser(http, pandalab, (await resp.json())["users"][0])
            async with http.get(f"{medipeps.url}/_sandbox/users") as resp:
                bob = SandboxUser(http, medipeps, (await resp.json())["users"][0])
            conversation = await alice.start_conversation([bob.idnps], "latency")
            await alice.send(conversation, "opening #0")
            await wait_key(probe.arrivals, "opening #0", 60)

            async def bridged_send(text: str) -> float:
                started = time.monotonic()
                await alice.send(conversation, text)
                return started

            # Warm-up of both paths (first-time joins, caches, connections).
            for n in range(5):
                t0 = await native_send(f"warm #{n}", n)
                await wait_key(tiny.arrivals, f"warm #{n}", 30)
                t0 = await bridged_send(f"warm #{n}")
                await wait_key(probe.arrivals, f"warm #{n}", 30)
            synapse_ms: list[float] = []
            bridge_ms: list[float] = []
            log(f"e2e: {samples} samples of each path, interleaved ...")
            for n in range(samples):
                text = f"latency #{n + 1}"
                t0 = await native_send(text, 1000 + n)
                synapse_ms.append((await wait_key(tiny.arrivals, text, 30) - t0) * 1000)
                t0 = await bridged_send(text)
                bridge_ms.append((await wait_key(probe.arrivals, text, 30) - t0) * 1000)
                await asyncio.sleep(0.01)
    finally:
        bridge.terminate()
        try:
            bridge.wait(30)
        except subprocess.TimeoutExpired:
            bridge.kill()
        await stack.stop()
        await tiny.stop()
    shutil.rmtree(work, ignore_errors=True)
    figures = {
        "e2e_samples": samples,
        "e2e_bridge_latency_ms_p50": round(percentile(bridge_ms, 50), 1),
        "e2e_bridge_latency_ms_p99": round(percentile(bridge_ms, 99), 1),
        "e2e_synapse_as_latency_ms_p50": round(percentile(synapse_ms, 50), 1),
        "e2e_synapse_as_latency_ms_p99": round(percentile(synapse_ms, 99), 1),
        "e2e_bridge_latency_ms_mean": round(statistics.fmean(bridge_ms), 1),
        "e2e_synapse_as_latency_ms_mean": round(statistics.fmean(synapse_ms), 1),
    }
    figures["e2e_overhead_ratio_p50"] = round(
        figures["e2e_bridge_latency_ms_p50"] / figures["e2e_synapse_as_latency_ms_p50"], 2
    )
    figures["e2e_overhead_ratio_p99"] = round(
        figures["e2e_bridge_latency_ms_p99"] / figures["e2e_synapse_as_latency_ms_p99"], 2
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    figures = asyncio.run(run(args.samples))
    merge_results(figures)
    for key, value in figures.items():
        print(f"{key:<40} {value}")


if __name__ == "__main__":
    main()
