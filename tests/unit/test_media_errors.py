"""Files that cannot be fetched: the homeserver down (everything waits) is told apart from one
file's trouble (the homeserver answers, but not with that file), which spends that message's
budget only. A stand-in homeserver plays each case."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from aiohttp import ClientSession, web

from bridge.matrix.media import MediaError, MediaRepository


@dataclass
class Homeserver:
    url: str
    versions_status: int = 200
    release: asyncio.Event | None = None


@pytest.fixture
async def homeserver(free_port: Callable[[], int]) -> AsyncIterator[Homeserver]:
    port = free_port()
    hs = Homeserver(f"http://127.0.0.1:{port}", release=asyncio.Event())

    async def versions(_: web.Request) -> web.Response:
        return web.json_response({"versions": ["v1.11"]}, status=hs.versions_status)

    async def download(request: web.Request) -> web.StreamResponse:
        assert request.headers["Authorization"] == "Bearer as-token"
        media_id = request.match_info["media_id"]
        if media_id == "ok":
            return web.Response(body=b"%PDF-1.4 fine", content_type="application/pdf")
        if media_id == "slow":  # the homeserver still fetching a remote server that never answers
            assert hs.release is not None
            await hs.release.wait()
        status = {"missing": 404, "remote": 502, "busy": 429, "denied": 403}.get(media_id, 502)
        return web.json_response({"errcode": "M_UNKNOWN"}, status=status)

    app = web.Application()
    app.router.add_get("/_matrix/client/versions", versions)
    app.router.add_get("/_matrix/client/v1/media/download/{server}/{media_id}", download)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield hs
    finally:
        assert hs.release is not None
        hs.release.set()
        await runner.cleanup()


async def fetch(url: str, mxc: str) -> bytes:
    async with ClientSession() as session:
        media = MediaRepository(url, "as-token", session, fetch_timeout_s=0.2, probe_timeout_s=1)
        async with media.download(mxc) as chunks:
            return b"".join([chunk async for chunk in chunks])


async def failure(url: str, mxc: str) -> MediaError:
    with pytest.raises(MediaError) as raised:
        await fetch(url, mxc)
    return raised.value


async def test_a_file_the_homeserver_serves_streams(homeserver: Homeserver) -> None:
    assert await fetch(homeserver.url, "mxc://remote.example/ok") == b"%PDF-1.4 fine"


@pytest.mark.parametrize(("media_id", "status"), [("missing", 404), ("denied", 403)])
async def test_a_file_the_homeserver_says_is_missing_or_denied_fails_at_once(
    homeserver: Homeserver, media_id: str, status: int
) -> None:
    error = await failure(homeserver.url, f"mxc://remote.example/{media_id}")
    assert not error.retriable and not error.homeserver_down and error.status == status


@pytest.mark.parametrize(("media_id", "status"), [("remote", 502), ("busy", 429), ("slow", None)])
async def test_a_remote_file_the_homeserver_cannot_fetch_is_that_file_s_trouble(
    homeserver: Homeserver, media_id: str, status: int | None
) -> None:
    """The homeserver answers its own endpoints: a 502, a 429 or no answer in time for this
    file spends the file's budget, never counts as the homeserver down."""
    error = await failure(homeserver.url, f"mxc://unreachable.example/{media_id}")
    assert error.retriable and not error.homeserver_down and error.status == status


async def test_the_homeserver_failing_its_own_endpoints_is_the_homeserver_down(
    homeserver: Homeserver,
) -> None:
    homeserver.versions_status = 502
    error = await failure(homeserver.url, "mxc://remote.example/remote")
    assert error.retriable and error.homeserver_down


async def test_a_homeserver_that_cannot_be_reached_is_down(free_port: Callable[[], int]) -> None:
    error = await failure(f"http://127.0.0.1:{free_port()}", "mxc://hs.example/abc")
    assert error.retriable and error.homeserver_down


async def test_a_malformed_mxc_fails_at_once_without_asking(free_port: Callable[[], int]) -> None:
    error = await failure(f"http://127.0.0.1:{free_port()}", "https://evil.example/x.png")
    assert not error.retriable and not error.homeserver_down
