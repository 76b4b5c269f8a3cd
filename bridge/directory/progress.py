"""A one-line progress bar on stderr, drawn only on a terminal (logs and pipes stay clean)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class Progress:
    def __init__(
        self,
        total: int | None,
        *,
        label: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        every_s: float = 0.1,
    ) -> None:
        """``total``: bytes to read (None: unknown, no bar). ``enabled``: default, on a TTY."""
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.label = label
        self.every_s = every_s
        self.started = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, lines: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        rate = lines / max(now - self.started, 1e-6)
        if self.total:
            share = min(done / self.total, 1.0)
            filled = int(share * WIDTH)
            bar = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {share * 100:3.0f}% "
        else:
            bar = ""
        self.stream.write(f"\r{self.label}{bar}{lines:,} lines, {rate:,.0f} lines/s ")
        self.stream.flush()
        self._drawn = True

    def close(self, done: int, lines: int) -> None:
        if not self.enabled:
            return
        self.update(done, lines, force=True)
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
