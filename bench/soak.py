"""Soak: N messages over M conversations through both vendors and a native Matrix user, with
optional faults, then a count of what every side received: delivered, lost, duplicated, out of
order. Not part of ``make test``.

    python bench/soak.py --messages 600 --conversations 10 --kill-bridge 3 --vendor-down
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import ClientSession

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from native_user import NativeUser, bridge_ready  # noqa: E402

from bridge.devtools.demo import SandboxUser, wait_for  # noqa: E402
from bridge.devtools.stack import LocalStack  # noqa: E402


class BridgeProcess:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def score(expected: list[str], received: list[str]) -> Counter[str]:
    """delivered / lost / duplicated / out_of_order of one stream at one receiver."""
    counts: Counter[str] = Counter()
    seen = Counter(received)
    wanted = set(expected)
    for text in expected:
        counts["delivered" if seen[text] else "lost"] += 1
        counts["duplicated"] += max(0, seen[text] - 1)
    order = [t for t in dict.fromkeys(received) if t in wanted]
    counts["out_of_order"] += sum(1 for a, b in zip(order, order[1:], strict=False) if a > b)
    return counts


async def soak(args: argparse.Namespace) -> Counter[str]:
    work = Path(tempfile.mkdtemp(prefix="eimis-soak-"))
    stack = LocalStack(work / "stack", database_url=args.database_url)
    await stack.start(with_bridge=False)
    bridge = BridgeProcess(stack.state_dir / "config.yaml")
    bridge.start()
    try:
        async with ClientSession() as http:
            await wait_for("the bridge", lambda: bridge_ready(http, stack.bridge_url), 60)
            user_id, token = await stack.synapse.register_user("soak", "soak-password-1")
            native = NativeUser(http, stack.synapse.url, user_id, token)
            people: dict[str, list[SandboxUser]] = {}
            for name, sandbox in stack.sandboxes.items():
                async with http.get(f"{sandbox.url}/_sandbox/users") as resp:
                    people[name] = [
                        SandboxUser(http, sandbox, u) for u in (await resp.json())["users"]
                    ]
            conversations = []
            for c in range(args.conversations):
                pl, mp = people["pandalab"][c % 5], people["medipeps"][c % 5]
                creator, other = (pl, mp) if c % 2 == 0 else (mp, pl)
                conv = await creator.start_conversation([other.idnps, user_id], f"soak {c}")
                conversations.append({"creator": creator, "creator_conv": conv, "other": other})
            rooms: list[str] = []
            await wait_for("every invite", lambda: _joined(native, rooms, args.conversations), 120)

            async def other_conv(conv: dict[str, Any]) -> str | None:
                for c in await conv["other"].conversations():
                    if c.get("title") == f"soak {conversations.index(conv)}":
                        return str(c["conversation_id"])
                return None

            for conv in conversations:
                conv["other_conv"] = await wait_for(
                    "both sides", lambda conv=conv: other_conv(conv), 120
                )
            # Map conversations to rooms through their names on Matrix.
            room_of: dict[int, str] = {}
            for room in rooms:
                name = await native.call(
                    "GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.name"
                )
                room_of[int(name["name"].split()[-1])] = room

            kills = sorted(
                {
                    int(args.messages * (k + 1) / (args.kill_bridge + 1))
                    for k in range(args.kill_bridge)
                }
            )
            down_from, down_to = (
                (args.messages // 3, 2 * args.messages // 3) if args.vendor_down else (-1, -1)
            )
            sent: dict[tuple[int, str], list[str]] = {}
            started = time.monotonic()
            for i in range(args.messages):
                if i in kills:
                    bridge.kill()
                    bridge.start()
                if i == down_from:
                    await stack.sandboxes["medipeps"].stop()
                if i == down_to:
                    await stack.sandboxes["medipeps"].start()
                c = i % args.conversations
                conv = conversations[c]
                who = ("creator", "other", "native")[(i // args.conversations) % 3]
                text = f"soak-{c:03d}-{who}-{i:06d}"
                vendor_down = down_from <= i < down_to
                if who != "native" and vendor_down and conv[who].sandbox.type_name == "medipeps":
                    continue  # the vendor's own app is down too: its users cannot write
                sent.setdefault((c, who), []).append(text)
                if who == "native":
                    await native.send(room_of[c], text)
                else:
                    await conv[who].send(conv[f"{who}_conv"], text)
            if down_to >= args.messages:
                await stack.sandboxes["medipeps"].start()
            await wait_for(
                "the bridge after the last fault", lambda: bridge_ready(http, stack.bridge_url), 60
            )

            async def receivers(c: int) -> dict[str, list[str]]:
                conv = conversations[c]
                return {
                    "creator": [m["text"] for m in await conv["creator"].inbox()],
                    "other": [m["text"] for m in await conv["other"].inbox()],
                    "native": await native.bodies(room_of[c]),
                }

            async def settled() -> Counter[str] | None:
                total: Counter[str] = Counter()
                for (c, who), texts in sent.items():
                    got = await receivers(c)
                    for receiver, received in got.items():
                        if receiver != who:
                            mine = [t for t in received if t.startswith(f"soak-{c:03d}-{who}-")]
                            total += score(texts, mine)
                return total if total["lost"] == 0 else None

            try:
                totals = await wait_for("everything to arrive", settled, args.settle_s)
            except TimeoutError:
                totals = Counter()
                for (c, who), texts in sent.items():
                    for receiver, received in (await receivers(c)).items():
                        if receiver != who:
                            mine = [t for t in received if t.startswith(f"soak-{c:03d}-{who}-")]
                            totals += score(texts, mine)
            totals["seconds"] = round(time.monotonic() - started)
            return totals
    finally:
        bridge.stop()
        await stack.stop()


async def _joined(native: NativeUser, rooms: list[str], wanted: int) -> bool:
    rooms += [r for r in await native.join_invites() if r not in rooms]
    return len(rooms) >= wanted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--conversations", type=int, default=10)
    parser.add_argument("--kill-bridge", type=int, default=0, help="SIGKILL the bridge K times")
    parser.add_argument(
        "--vendor-down",
        action="store_true",
        help="the Medipeps-style sandbox is down for the middle third",
    )
    parser.add_argument("--database-url", default=None, help="postgresql://... (default SQLite)")
    parser.add_argument("--settle-s", type=float, default=300)
    totals = asyncio.run(soak(parser.parse_args()))
    for key in ("delivered", "lost", "duplicated", "out_of_order", "seconds"):
        print(f"{key:<13} {totals[key]}")
    sys.exit(0 if totals["lost"] == totals["duplicated"] == totals["out_of_order"] == 0 else 1)


if __name__ == "__main__":
    main()
