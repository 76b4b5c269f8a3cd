"""The budget of a file that cannot be fetched, as delivery applies it: the homeserver down never
spends it (everything waits for the homeserver); one file's trouble spends that message's
``media.fetch_attempts``, then that message alone fails with a French reason; a refusal (404)
fails it at once."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from bridge.config import MediaConfig
from bridge.core import operations as op
from bridge.core.delivery import Delivery
from bridge.db.outbox import OutboxItem
from bridge.matrix.media import MediaError

ATTEMPTS = 3


class Harness:
    def __init__(self, error: MediaError) -> None:
        outbox = SimpleNamespace(pending=None, pending_in_lane=None)  # its lanes never run here
        stores: Any = SimpleNamespace(db=None, audit=None, outbox=outbox)
        self.delivery = Delivery(
            stores,
            homeserver=None,  # type: ignore[arg-type]
            connectors=None,  # type: ignore[arg-type]
            media=None,  # type: ignore[arg-type]
            media_config=MediaConfig(fetch_attempts=ATTEMPTS),
            status=None,  # type: ignore[arg-type]
        )
        self.tries = 0
        self.failed: list[tuple[str, str]] = []

        async def deliver(*_: Any) -> list[str]:
            self.tries += 1
            raise error

        async def give_up(item: OutboxItem, reason: str, *, unsupported: bool, why: str) -> None:
            self.failed.append((reason, why))

        self.delivery._deliver = deliver  # type: ignore[method-assign]
        self.delivery._give_up = give_up  # type: ignore[method-assign]
        self.item = OutboxItem(7, "pandalab", "!room:hs", op.SEND_MESSAGE, "$e", {}, 0)

    async def run(self) -> bool:
        """One try; True when it asked to be retried (raised)."""
        try:
            await self.delivery.handle(self.item)
        except MediaError:
            return True
        return False


async def test_the_homeserver_down_spends_no_budget() -> None:
    harness = Harness(MediaError("down", retriable=True, homeserver_down=True))
    for _ in range(ATTEMPTS * 4):
        assert await harness.run()
    assert harness.failed == []


async def test_one_file_s_trouble_spends_its_budget_then_that_message_fails() -> None:
    harness = Harness(MediaError("502", retriable=True, status=502))
    for _ in range(ATTEMPTS - 1):
        assert await harness.run()
    assert not await harness.run()
    assert harness.tries == ATTEMPTS
    [(reason, why)] = harness.failed
    assert why == "media"
    assert f"après {ATTEMPTS} essais" in reason and "réponse 502" in reason
    assert "la conversation continue" in reason


@pytest.mark.parametrize(
    ("status", "words"), [(404, "introuvable"), (403, "réponse 403"), (None, "adresse")]
)
async def test_a_refused_file_fails_at_once(status: int | None, words: str) -> None:
    harness = Harness(MediaError("refused", retriable=False, status=status))
    assert not await harness.run()
    [(reason, why)] = harness.failed
    assert harness.tries == 1 and why == "media" and words in reason
