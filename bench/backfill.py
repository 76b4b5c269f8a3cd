"""Backfill of 1,000 messages into a new portal through a real Synapse, against Synapse's own send
rate measured in the same run.

The deployment is ``LocalStack``'s (Synapse, the sandboxes; plain rooms) with the bridge in its
own process (``eimis-bridge run``) and ``portal.backfill`` raised to 1,000 messages. Two
PandaLab-style users write 1,000 messages in a conversation of their own (nothing crosses: it has
no external participant); then one of them adds a native Matrix user. The conversation crosses
for the first time: the bridge opens the portal and brings the history along (each message from
its sender's ghost, with its original time through the appservice ``ts`` parameter, in order).
``backfill_s`` runs from the add (the sandbox's user API call) until the native user reads the
1,000th message in the portal (``/messages``, polled every 50 ms); every message is then checked
once, in order.

The baseline: a plain appservice (its own registration, no transactions pushed to it) whose one
user sends 1,000 messages with ``ts`` into a room of its own, one after the other as a backfill
must (order), once before the backfill and once after (a new user and room each time):
``synapse_send_msgs_per_s`` is the mean of the two. ``backfill_vs_synapse`` is the bridge's rate
over it.

Usage: ``python bench/backfill.py [--messages 1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from aiohttp import ClientSession

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, merge_results, wait_http  # noqa: E402
from native_user import NativeUser  # noqa: E402

from bridge.devtools.stack import LocalStack  # noqa: E402

POLL_S = 0.05


def baseline_registration(as_token: str, domain: str) -> dict[str, Any]:
    return {
        "id": "bench-backfill-baseline",
        "url": None,  # Synapse pushes nothing to it
        "as_token": as_token,
        "hs_token": secrets.token_urlsafe(32),
        "sender_localpart": "benchbaseline",
        "namespaces": {
            "users": [{"exclusive": True, "regex": f"@benchsender_.*:{domain}"}],
            "aliases": [],
            "rooms": [],
        },
        "rate_limited": False,
    }


async def synapse_send_rate(
    http: ClientSession, url: str, as_token: str, count: int, name: str = "1"
) -> float:
    """Messages per second one appservice user (``@benchsender_<name>``, new) sends with ``ts``
    into a room of its own, one after the other."""
    headers = {"Authorization": f"Bearer {as_token}"}
    async with http.post(
        f"{url}/_matrix/client/v3/register",
        json={"type": "m.login.application_service", "username": f"benchsender_{name}"},
        headers=headers,
    ) as resp:
        user_id = (await resp.json())["user_id"]
    as_user = {"user_id": user_id}
    async with http.post(
        f"{url}/_matrix/client/v3/createRoom",
        json={"preset": "private_chat"},
        headers=headers,
        params=as_user,
    ) as resp:
        room_id = (await resp.json())["room_id"]
    start_ts = int(time.time() * 1000) - count * 1000
    started = time.monotonic()
    for n in range(count):
        async with http.put(
            f"{url}/_matrix/client/v3/rooms/{quote(room_id)}/send/m.room.message/b{n}",
            json={"msgtype": "m.text", "body": f"baseline #{n}"},
            headers=headers,
            params={**as_user, "ts": str(start_ts + n * 1000)},
        ) as resp:
            resp.raise_for_status()
            await resp.read()
    return count / (time.monotonic() - started)


async def user_call(http: ClientSession, method: str, url: str, **kwargs: Any) -> Any:
    async with http.request(method, url, **kwargs) as resp:
        resp.raise_for_status()
        return await resp.json(content_type=None) if resp.content_length != 0 else None


async def latest_body(native: NativeUser, room_id: str) -> str | None:
    page = await native.call(
        "GET",
        f"/_matrix/client/v3/rooms/{quote(room_id)}/messages",
        params={"dir": "b", "limit": "1", "filter": '{"types": ["m.room.message"]}'},
    )
    for event in page.get("chunk", []):
        return str((event.get("content") or {}).get("body"))
    return None


async def run(messages: int = 1000, log: Any = print) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="eimis-bench-backfill-"))
    overrides = {"portal": {"backfill": {"max_messages": messages, "max_age_days": 30}}}
    stack = LocalStack(work / "stack", config_overrides=overrides)
    as_token = secrets.token_urlsafe(32)
    registration = work / "baseline-registration.yaml"
    registration.write_text(
        yaml.safe_dump(baseline_registration(as_token, stack.synapse.server_name))
    )
    stack.synapse.appservice_registrations = (
        *stack.synapse.appservice_registrations,
        registration.resolve(),
    )
    log("backfill: starting Synapse ...")
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
            pandalab = stack.sandboxes["pandalab"]
            users = (await user_call(http, "GET", f"{pandalab.url}/_sandbox/users"))["users"]
            alice, dora = (f"{pandalab.url}/_sandbox/users/{u['idnps']}" for u in users[:2])
            conversation = (
                await user_call(
                    http,
                    "POST",
                    f"{alice}/conversations",
                    json={"with": [users[1]["idnps"]], "title": "backfill"},
                )
            )["conversation_id"]
            texts = [f"history #{n}" for n in range(messages)]
            log(f"backfill: {messages} messages written at PandaLab ...")
            for n, text in enumerate(texts):
                await user_call(
                    http,
                    "POST",
                    f"{alice if n % 2 == 0 else dora}/conversations/{conversation}/messages",
                    json={"text": text},
                )
            log(f"backfill: Synapse's own send rate before, {messages} messages ...")
            before = await synapse_send_rate(http, stack.synapse.url, as_token, messages, "before")
            native_id, token = await stack.synapse.register_user("bench.reader", "bench-pass-1")
            native = NativeUser(http, stack.synapse.url, native_id, token)

            log("backfill: the conversation's first external participant ...")
            started = time.monotonic()
            await user_call(
                http,
                "POST",
                f"{alice}/conversations/{conversation}/participants",
                json={"add": [native_id]},
            )
            rooms: list[str] = []
            while not rooms:
                rooms = await native.join_invites()
                if time.monotonic() - started > 120:
                    raise TimeoutError("the portal's invite never came")
            room_id = rooms[0]
            while await latest_body(native, room_id) != texts[-1]:
                if time.monotonic() - started > 600:
                    raise TimeoutError("the backfill never finished")
                await asyncio.sleep(POLL_S)
            backfill_s = time.monotonic() - started
            shown = [b for b in await native.bodies(room_id) if b in set(texts)]
            if shown != texts:
                raise RuntimeError(
                    f"backfill: {len(shown)} of {messages} shown, in order: {shown == texts}"
                )

            log(f"backfill: Synapse's own send rate after, {messages} messages ...")
            after = await synapse_send_rate(http, stack.synapse.url, as_token, messages, "after")
    finally:
        bridge.terminate()
        try:
            bridge.wait(30)
        except subprocess.TimeoutExpired:
            bridge.kill()
        await stack.stop()
    shutil.rmtree(work, ignore_errors=True)
    rate = messages / backfill_s
    synapse_rate = (before + after) / 2  # measured on both sides of the backfill: drift cancels
    return {
        "backfill_messages": messages,
        "backfill_s": round(backfill_s, 2),
        "backfill_msgs_per_s": round(rate, 1),
        "synapse_send_msgs_per_s": round(synapse_rate, 1),
        "synapse_send_msgs_per_s_before": round(before, 1),
        "synapse_send_msgs_per_s_after": round(after, 1),
        "backfill_vs_synapse": round(rate / synapse_rate, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    args = parser.parse_args()
    figures = asyncio.run(run(args.messages))
    merge_results(figures)
    for key, value in figures.items():
        print(f"{key:<40} {value}")


if __name__ == "__main__":
    main()
