"""Baseline (a) of the core benchmark: a naive forwarder, in its own process.

A bare ``mautrix.appservice.AppService`` receives the homeserver's transactions and forwards
every ``m.room.message`` to the Medipeps-style sandbox over HTTP. Nothing is durable: mautrix
acknowledges the transaction first and runs each event's handler as its own background task, so
a crash loses messages and nothing keeps them in order. It is the cheapest thing that "works",
the floor the bridge's guarantees are priced against.

Run: ``python bench/naive_forwarder.py --port P --hs-token T --sandbox-url URL --rooms rooms.json``
where ``rooms.json`` maps room ids to Medipeps conversation ids.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from pathlib import Path

import aiohttp
from mautrix.appservice import AppService
from mautrix.appservice.state_store.memory import ASStateStore
from mautrix.client.state_store.memory import MemoryStateStore
from mautrix.types import Event, EventType


class MemoryASStateStore(MemoryStateStore, ASStateStore):
    def __init__(self) -> None:
        MemoryStateStore.__init__(self)
        ASStateStore.__init__(self)


async def serve(args: argparse.Namespace) -> None:
    rooms: dict[str, str] = json.loads(Path(args.rooms).read_text())
    appservice = AppService(
        server=args.homeserver,
        domain=args.domain,
        as_token="unused",
        hs_token=args.hs_token,
        bot_localpart="naive_bot",
        id="naive-forwarder",
        state_store=MemoryASStateStore(),
        log=logging.getLogger("naive"),
    )
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    headers = {"X-Api-Key": args.api_key}

    @appservice.matrix_event_handler
    async def forward(event: Event) -> None:
        if event.type != EventType.ROOM_MESSAGE:
            return
        conversation = rooms.get(str(event.room_id))
        if conversation is None:
            return
        body = {
            "author_ref": str(event.sender),
            "author_label": str(event.sender),
            "body": event.content.body,
            "request_ref": str(event.event_id),
        }
        async with http.post(
            f"{args.sandbox_url}/mp/conversations/{conversation}/messages",
            json=body,
            headers=headers,
        ) as resp:
            await resp.read()

    await appservice.start(host="127.0.0.1", port=args.port)
    appservice.ready = True
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await appservice.stop()
        await http.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hs-token", required=True)
    parser.add_argument("--sandbox-url", required=True)
    parser.add_argument("--api-key", default="medipeps-sandbox-key")
    parser.add_argument("--rooms", required=True)
    parser.add_argument("--homeserver", default="http://127.0.0.1:9")
    parser.add_argument("--domain", default="eimis.localhost")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as the bridge does")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args))
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
