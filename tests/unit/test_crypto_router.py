"""The router and crypto items: a failing one is retried, then given up, never held for ever
(it would hold every later room key of its device)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from bridge.core.router import CRYPTO_ATTEMPTS, Router
from bridge.db.inbox import CRYPTO_ORIGIN, InboxItem


class Broken:
    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, item: dict[str, Any]) -> None:
        self.calls += 1
        raise RuntimeError("cannot")


class Inbox:
    def __init__(self) -> None:
        self.failed: list[tuple[int, str]] = []

    async def mark_failed(self, seq: int, reason: str) -> None:
        self.failed.append((seq, reason))


def router_with(crypto: Any) -> tuple[Router, Inbox]:
    inbox = Inbox()
    stores = SimpleNamespace(inbox=inbox, audit=None)
    router = Router(stores, None, None, None, lambda: None, trail=SimpleNamespace())  # type: ignore[arg-type]
    router.crypto = crypto
    return router, inbox


async def test_a_crypto_item_that_keeps_failing_is_given_up_after_its_tries() -> None:
    crypto = Broken()
    router, inbox = router_with(crypto)
    item = InboxItem(7, CRYPTO_ORIGIN, "@g:x\x1fDEV", {"kind": "to_device"}, attempts=0)
    for _ in range(CRYPTO_ATTEMPTS - 1):
        with pytest.raises(RuntimeError):
            await router.handle(item)  # the lane retries it
    await router.handle(item)
    assert inbox.failed == [(7, "crypto: RuntimeError")]
    assert crypto.calls == CRYPTO_ATTEMPTS


async def test_tries_of_an_earlier_run_count() -> None:
    crypto = Broken()
    router, inbox = router_with(crypto)
    item = InboxItem(8, CRYPTO_ORIGIN, "device-lists", {"kind": "device_lists"}, CRYPTO_ATTEMPTS)
    await router.handle(item)
    assert inbox.failed == [(8, "crypto: RuntimeError")]
