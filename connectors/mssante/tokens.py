"""Pro Santé Connect access tokens: where they come from, and a memory-only cache.

A token is short-lived (minutes). ``CachedToken`` keeps the current one in memory (never
written anywhere), fetches a new one ``refresh_before_s`` seconds before it expires, one fetch at
a time however many tasks ask together, and forgets it on ``invalidate()`` (after a server
refused it) so that the next ``token()`` fetches a fresh one. A token's ``repr`` never shows it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from connectors.http import ResponseRefused, read_capped


class TokenError(Exception):
    """No token could be obtained. The message names the cause, never a token."""


@dataclass(frozen=True)
class Token:
    access_token: str = field(repr=False)
    expires_at: float
    """``time.time()`` seconds at which the token stops being valid."""

    def __repr__(self) -> str:
        return f"Token(access_token=<hidden>, expires_at={self.expires_at:.0f})"


class TokenSource(Protocol):
    async def token(self) -> Token: ...


MAX_TOKEN_ANSWER = 64 * 1024
DEFAULT_LIFETIME_S = 240.0
"""Used when the issuer says nothing of ``expires_in`` (PSC tokens live 4-5 minutes)."""


class PscTokenSource:
    """Asks a Pro Santé Connect proxy (or the local stand-in) for a token for one identity:
    ``POST token_url {"idnps": ...}`` -> ``{"access_token": ..., "expires_in": seconds}``.

    ``http`` is an ``aiohttp.ClientSession`` or a callable returning one (a ``LazySession``)."""

    def __init__(
        self,
        token_url: str,
        idnps: str,
        http: aiohttp.ClientSession | Callable[[], aiohttp.ClientSession],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token_url = token_url
        self.idnps = idnps
        self._http = http
        self._clock = clock

    def _session(self) -> aiohttp.ClientSession:
        return self._http if isinstance(self._http, aiohttp.ClientSession) else self._http()

    async def token(self) -> Token:
        try:
            async with self._session().post(
                self.token_url, json={"idnps": self.idnps}, allow_redirects=False
            ) as resp:
                body = await read_capped(resp, MAX_TOKEN_ANSWER)
                status = resp.status
        except ResponseRefused as exc:
            raise TokenError(f"token issuer answer refused: {exc}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TokenError(f"token issuer unreachable ({type(exc).__name__})") from None
        if status != 200:
            raise TokenError(f"token issuer answered HTTP {status}")
        try:
            data = json.loads(body)
            access_token = data["access_token"]
            expires_in = float(data.get("expires_in", DEFAULT_LIFETIME_S))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TokenError("token issuer answer is not {access_token, expires_in}") from None
        if not isinstance(access_token, str) or not access_token:
            raise TokenError("token issuer gave an empty access_token")
        return Token(access_token, self._clock() + expires_in)


class CachedToken:
    """A ``TokenSource`` that reuses its source's token until ``refresh_before_s`` before it
    expires. Memory only. Concurrency-safe: one refresh at a time, waiters share its result."""

    def __init__(
        self,
        source: TokenSource,
        refresh_before_s: float = 30.0,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self._refresh_before_s = refresh_before_s
        self._clock = clock
        self._current: Token | None = None
        self._lock = asyncio.Lock()

    def _fresh(self, token: Token | None) -> bool:
        return token is not None and token.expires_at - self._refresh_before_s > self._clock()

    async def token(self) -> Token:
        current = self._current
        if self._fresh(current):
            assert current is not None
            return current
        async with self._lock:
            # Whoever refreshed while we waited for the lock did the work for us.
            if self._fresh(self._current):
                assert self._current is not None
                return self._current
            self._current = await self._source.token()
            return self._current

    def invalidate(self, token: Token | None = None) -> None:
        """Forget the cached token (a server refused it). Given the refused ``token``, forget it
        only if it is still the cached one: a refresh made meanwhile is kept."""
        if token is None or self._current == token:
            self._current = None
