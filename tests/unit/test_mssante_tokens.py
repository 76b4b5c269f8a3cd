"""Pro Santé Connect tokens: the issuer call, the memory-only cache, refresh and invalidation."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from connectors.mssante.tokens import CachedToken, PscTokenSource, Token, TokenError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingSource:
    def __init__(self, clock: Clock, lifetime: float = 300, delay: float = 0) -> None:
        self.clock, self.lifetime, self.delay, self.calls = clock, lifetime, delay, 0

    async def token(self) -> Token:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return Token(f"t{self.calls}", self.clock() + self.lifetime)


async def test_the_token_is_reused_until_30s_before_expiry() -> None:
    clock = Clock()
    source = CountingSource(clock)
    cache = CachedToken(source, clock=clock)
    first = await cache.token()
    clock.now += 269
    assert await cache.token() is first and source.calls == 1
    clock.now += 2  # 29 s left: refreshed ahead of expiry
    assert (await cache.token()).access_token == "t2"


async def test_concurrent_callers_share_one_refresh() -> None:
    clock = Clock()
    source = CountingSource(clock, delay=0.05)
    cache = CachedToken(source, clock=clock)
    tokens = await asyncio.gather(*(cache.token() for _ in range(10)))
    assert source.calls == 1 and {t.access_token for t in tokens} == {"t1"}


async def test_invalidate_forgets_the_refused_token_only() -> None:
    clock = Clock()
    source = CountingSource(clock)
    cache = CachedToken(source, clock=clock)
    old = await cache.token()
    cache.invalidate(old)
    new = await cache.token()
    assert new.access_token == "t2"
    cache.invalidate(old)  # a late report about the old token keeps the new one
    assert await cache.token() is new
    cache.invalidate()
    assert (await cache.token()).access_token == "t3"


def test_a_token_repr_hides_it() -> None:
    token = Token("secret-jwt", 1234.0)
    assert "secret-jwt" not in repr(token) and "secret-jwt" not in str(token)


@pytest.fixture
async def issuer():
    seen: list[dict] = []
    answers: list[web.Response] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return answers.pop(0)

    app = web.Application()
    app.router.add_post("/token", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as session:
        yield f"http://127.0.0.1:{port}/token", session, seen, answers
    await runner.cleanup()


async def test_psc_source_posts_the_idnps_and_reads_the_answer(issuer) -> None:
    url, session, seen, answers = issuer
    answers.append(web.json_response({"access_token": "jwt-1", "expires_in": 240}))
    clock = Clock()
    token = await PscTokenSource(url, "810000001916", session, clock=clock).token()
    assert seen == [{"idnps": "810000001916"}]
    assert token.access_token == "jwt-1" and token.expires_at == 1240


@pytest.mark.parametrize(
    "answer, reason",
    [
        (web.json_response({"error": "nope"}, status=401), "HTTP 401"),
        (web.json_response({"token": "x"}), "not {access_token"),
        (web.Response(text="not json"), "not {access_token"),
        (web.json_response({"access_token": ""}), "empty"),
    ],
)
async def test_psc_source_errors_are_token_errors(issuer, answer, reason) -> None:
    url, session, _, answers = issuer
    answers.append(answer)
    with pytest.raises(TokenError, match=reason):
        await PscTokenSource(url, "810000001916", session).token()


async def test_an_unreachable_issuer_is_a_token_error() -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TokenError, match="unreachable"):
            await PscTokenSource("http://127.0.0.1:9/token", "810000001916", session).token()
