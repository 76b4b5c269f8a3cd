"""The real-Synapse harness: users, a room, a message both ways, appservice ping, restart."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import yaml
from aiohttp import web

from bridge.devtools.synapse import LocalSynapse

from matrix_user import login, text_is

if TYPE_CHECKING:
    from conftest import SynapseFactory


AS_ID = "harness-test"


def write_registration(path: Path, *, as_url: str, as_token: str, hs_token: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "id": AS_ID,
                "url": as_url,
                "as_token": as_token,
                "hs_token": hs_token,
                "sender_localpart": "harnessbot",
                "rate_limited": False,
                "receive_ephemeral": True,
                "namespaces": {
                    "users": [{"exclusive": True, "regex": r"@harness_.*:eimis\.localhost"}],
                    "aliases": [],
                    "rooms": [],
                },
            }
        )
    )
    return path


@asynccontextmanager
async def ping_server(port: int, hs_token: str) -> AsyncIterator[list[str]]:
    """A minimal appservice answering /_matrix/app/v1/ping; yields the transaction ids seen."""
    pings: list[str] = []

    async def ping(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {hs_token}":
            return web.json_response({"errcode": "M_FORBIDDEN"}, status=403)
        pings.append((await request.json()).get("transaction_id", ""))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/_matrix/app/v1/ping", ping)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield pings
    finally:
        await runner.cleanup()


async def test_users_message_ping_and_restart(
    synapse_factory: SynapseFactory, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    as_port = free_port()
    as_token, hs_token = secrets.token_hex(16), secrets.token_hex(16)
    registration = write_registration(
        tmp_path / "registration.yaml",
        as_url=f"http://127.0.0.1:{as_port}",
        as_token=as_token,
        hs_token=hs_token,
    )
    hs = await synapse_factory([registration])

    alice_id, _ = await hs.register_user("alice", "alice-pw", admin=True)
    bob_id, _ = await hs.register_user("bob", "bob-pw")
    assert (alice_id, bob_id) == ("@alice:eimis.localhost", "@bob:eimis.localhost")

    alice = await login(hs.url, alice_id, "alice-pw")
    bob = await login(hs.url, bob_id, "bob-pw")
    try:
        room_id = await alice.create_dm(bob_id)
        await alice.send_text(room_id, "hello bob")
        assert await bob.accept_invites(room_id) == [room_id]
        received = await bob.wait_for_message(room_id, text_is("hello bob"), timeout=15)
        assert received.sender == alice_id

        await bob.send_text(room_id, "hi alice")
        reply = await alice.wait_for_message(room_id, text_is("hi alice"), timeout=15)
        assert reply.sender == bob_id
    finally:
        await asyncio.gather(alice.close(), bob.close())

    # The appservice ping (stable since Matrix 1.7) works without any experimental flag.
    async with ping_server(as_port, hs_token) as pings, aiohttp.ClientSession() as http:
        async with http.post(
            f"{hs.url}/_matrix/client/v1/appservice/{AS_ID}/ping",
            headers={"Authorization": f"Bearer {as_token}"},
            json={"transaction_id": "txn-1"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert "duration_ms" in await resp.json()
        assert pings == ["txn-1"]

    # Restart: same URL, users and history kept; registering again logs in instead.
    url, secret = hs.url, hs.registration_shared_secret
    await hs.restart()
    assert hs.url == url
    assert (await hs.register_user("alice", "alice-pw"))[0] == alice_id
    bob = await login(hs.url, bob_id, "bob-pw")
    try:
        await bob.wait_for_message(room_id, text_is("hello bob"), timeout=15)
    finally:
        await bob.close()
    again = LocalSynapse(hs.state_dir)
    assert again.registration_shared_secret == secret
