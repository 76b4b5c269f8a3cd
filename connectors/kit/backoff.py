"""One retry policy: exponential backoff with a cap, and optional jitter.

The n-th consecutive failure (1-based) waits ``initial_s * factor ** (n - 1)`` seconds, at most
``max_s``; with jitter, a uniformly drawn value between half of that and all of it, so that
clients that failed together do not retry together.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    initial_s: float
    max_s: float
    factor: float = 2.0
    jitter: bool = True

    def ceiling(self, attempt: int) -> float:
        """The capped wait after the given (1-based) failure, before jitter."""
        try:
            grown = self.initial_s * self.factor ** max(0, attempt - 1)
        except OverflowError:  # thousands of failures: long past the cap
            grown = math.inf
        return min(self.max_s, grown)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after the given (1-based) failure: with jitter, half to all of the capped
        wait (drawn from ``rng``, else the module's generator)."""
        ceiling = self.ceiling(attempt)
        if not self.jitter:
            return ceiling
        return (rng or random).uniform(ceiling / 2, ceiling)
