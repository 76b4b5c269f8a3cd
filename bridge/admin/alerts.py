"""What the bot tells the admin rooms on its own: connectors going down, coming back, having
their credentials rejected or stalling, and new dead letters.

A watch compares the bridge's state every few seconds with what it saw last, so alerts come
from one place whatever caused them. Liveness is messages flowing, not a keepalive: a connector
that answers but has delivered nothing for ``admin.stalled_after_s`` while messages wait for it
is reported as stalled. Alerts are grouped: what happens within ``admin.notify_debounce_s`` of
the first alert goes out as one message, and a connector that went down and came back within
that window is reported once as such.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bridge.core.periodic import Periodic

log = logging.getLogger("eimis.admin.alerts")

CHECK_INTERVAL_S = 2.0


@dataclass
class Snapshot:
    states: dict[str, str] = field(default_factory=dict)
    """Connector -> health state (CONNECTED, DOWN, REJECTED)."""
    dead: dict[int, str] = field(default_factory=dict)
    """Dead letter id -> connector."""
    heads: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Connector -> (deliveries waiting that nothing holds, id of the first of them)."""


class AlertWatch:
    def __init__(
        self,
        snapshot: Callable[[], Awaitable[Snapshot]],
        post: Callable[[str, str], Awaitable[None]],
        *,
        debounce_s: float,
        stalled_after_s: float,
        interval_s: float = CHECK_INTERVAL_S,
    ) -> None:
        self._snapshot = snapshot
        self._post = post
        self.debounce_s = debounce_s
        self.stalled_after_s = stalled_after_s
        self._last: Snapshot | None = None
        self._head_since: dict[str, tuple[int, float]] = {}
        self._stalled: set[str] = set()
        self._queued: list[tuple[str, str]] = []
        """(kind key, sentence) waiting for the debounce window to close."""
        self._first_queued_at: float | None = None
        self._loop = Periodic("admin alerts", self.check, interval_s, log)
        self.sent: list[str] = []

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def check(self) -> None:
        now = time.monotonic()
        current = await self._snapshot()
        if self._last is not None:
            self._compare(self._last, current, now)
        self._last = current
        self._watch_stalls(current, now)
        await self._flush(time.monotonic())

    def _compare(self, before: Snapshot, now_: Snapshot, now: float) -> None:
        for connector, state in now_.states.items():
            was = before.states.get(connector, "CONNECTED")
            if state == was:
                continue
            if state == "DOWN":
                self._queue(
                    f"down:{connector}",
                    f"Connector {connector} is down: its vendor "
                    "does not answer. Its deliveries wait and resume in order.",
                )
            elif state == "REJECTED":
                self._queue(
                    f"rejected:{connector}",
                    f"Connector {connector}: its vendor "
                    "rejected the bridge's credentials. Deliveries wait; check them "
                    "(connector test, connector rotate-secret).",
                )
            elif state == "CONNECTED":
                self._queue(
                    f"back:{connector}",
                    f"Connector {connector} is back; its deliveries resume in order.",
                )
        new_dead: dict[str, int] = {}
        for seq, connector in now_.dead.items():
            if seq not in before.dead:
                new_dead[connector] = new_dead.get(connector, 0) + 1
        for connector, count in sorted(new_dead.items()):
            self._queue(
                f"dead:{connector}",
                f"{count} delivery(ies) to {connector} became dead letters; their "
                "conversations wait. See dead-letters, then retry or discard.",
            )

    def _watch_stalls(self, current: Snapshot, now: float) -> None:
        for connector, (waiting, head) in current.heads.items():
            seen = self._head_since.get(connector)
            if seen is None or seen[0] != head:
                self._head_since[connector] = (head, now)
                self._stalled.discard(connector)
                continue
            state = current.states.get(connector, "CONNECTED")
            if (
                waiting
                and state == "CONNECTED"
                and connector not in self._stalled
                and now - seen[1] >= self.stalled_after_s
            ):
                self._stalled.add(connector)
                self._queue(
                    f"stalled:{connector}",
                    f"Connector {connector} answers but has delivered nothing for "
                    f"{now - seen[1]:.0f} s while {waiting} message(s) wait for it.",
                )
        for connector in set(self._head_since) - set(current.heads):
            self._head_since.pop(connector, None)
            self._stalled.discard(connector)

    def _queue(self, key: str, text: str) -> None:
        if self._first_queued_at is None:
            self._first_queued_at = time.monotonic()
        self._queued.append((key, text))

    async def _flush(self, now: float) -> None:
        if not self._queued or self._first_queued_at is None:
            return
        if now - self._first_queued_at < self.debounce_s:
            return
        queued, self._queued, self._first_queued_at = self._queued, [], None
        text = _group(queued)
        self.sent.append(text)
        key = f"{int(time.time())}:{len(self.sent)}"
        try:
            await self._post(text, key)
        except Exception as error:  # an alert that cannot be posted is logged, not retried
            log.warning("Could not post an alert (%s)", type(error).__name__)


def _group(queued: list[tuple[str, str]]) -> str:
    """One message; a connector that went down and came back in the window, said once."""
    keys = [key for key, _ in queued]
    lines: list[str] = []
    for key, text in queued:
        kind, _, connector = key.partition(":")
        if kind in ("down", "rejected") and f"back:{connector}" in keys[keys.index(key) :]:
            lines.append(f"Connector {connector} was {kind} for a moment and is back.")
            continue
        if kind == "back" and any(
            k in keys for k in (f"down:{connector}", f"rejected:{connector}")
        ):
            continue
        if text not in lines:
            lines.append(text)
    return "\n".join(f"• {line}" for line in lines)
