"""The Medipeps-style sandbox (``connectors/medipeps/sandbox.py``) served for the benchmarks,
with a probe that counts what the vendor API receives, in its own process.

The probe wraps the kernel's ``api_writes`` (every message the bridge, or a baseline, delivers
through ``POST /mp/conversations/{conv}/messages``): it counts new messages, timestamps them
(``time.monotonic()``, comparable across processes on Linux) and checks their order per
conversation. A benchmark writes ``... #<n>`` with ``n`` increasing per conversation; a message
arriving with an ``n`` lower than one already seen in its conversation is an order violation.

Benchmark routes (no API key): ``GET /_bench/probe`` (counters), ``POST /_bench/user_writes``
(``{"writes": [[idnps, conversation_id, text], ...]}``: vendor users write, in that order, so
the feed the bridge polls fills at once), ``POST /_bench/reset`` (zero the counters).

Run: ``python bench/sandbox_server.py --port 8101``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.sandbox.webtools import KERNEL_KEY  # noqa: E402

SEQ = re.compile(r"#(\d+)\s*$")


class DeliveryProbe:
    """What arrived through the vendor API: how many, when, and in which order per conversation."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.violations = 0
        self.repeats = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._last_seq: dict[str, int] = {}
        self.arrivals: dict[str, float] = {}
        """text -> arrival time, for latency measurements (kept only when ``keep_arrivals``)."""
        self.keep_arrivals = False

    def record(self, conversation_id: str, text: str) -> None:
        now = time.monotonic()
        self.count += 1
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        if self.keep_arrivals:
            self.arrivals[text] = now
        match = SEQ.search(text)
        if match is None:
            return
        seq = int(match.group(1))
        last = self._last_seq.get(conversation_id)
        if last is not None:
            if seq < last:
                self.violations += 1
            elif seq == last:
                self.repeats += 1
        self._last_seq[conversation_id] = max(seq, last or 0)

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "violations": self.violations,
            "repeats": self.repeats,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "conversations_sequenced": len(self._last_seq),  # with a "... #<n>" message
        }


def instrument(app: web.Application) -> DeliveryProbe:
    """Wrap the sandbox kernel of ``app`` so every new API-written message is recorded."""
    kernel = app[KERNEL_KEY]
    probe = DeliveryProbe()
    original = kernel.api_writes

    def api_writes(key: str, conversation_id: str, sender: Any, text: str, **kwargs: Any):
        message, new = original(key, conversation_id, sender, text, **kwargs)
        if new:
            probe.record(conversation_id, text)
        return message, new

    kernel.api_writes = api_writes  # type: ignore[method-assign]

    async def get_probe(request: web.Request) -> web.Response:
        return web.json_response(probe.summary())

    async def reset(request: web.Request) -> web.Response:
        probe.reset()
        return web.json_response({})

    async def user_writes(request: web.Request) -> web.Response:
        body = await request.json()
        written = 0
        for idnps, conversation_id, text in body["writes"]:
            kernel.user_writes(kernel.user(idnps), str(conversation_id), text)
            written += 1
        return web.json_response({"written": written, "at": time.monotonic()})

    app.router.add_get("/_bench/probe", get_probe)
    app.router.add_post("/_bench/reset", reset)
    app.router.add_post("/_bench/user_writes", user_writes)
    return probe


def medipeps_app() -> tuple[web.Application, DeliveryProbe]:
    from connectors.medipeps.sandbox import create_app

    app = create_app()
    return app, instrument(app)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app, _ = medipeps_app()
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
