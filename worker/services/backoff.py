"""Reconnect delays: exponential with jitter, capped (pure, no sleeping of its own)."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Successive delays initial, ×2, ×2 … up to `maximum`, each jittered by ±`jitter`."""

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 10.0,
        jitter: float = 0.2,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.rand = rand
        self._current = initial

    def next(self) -> float:
        delay = self._current * (1 - self.jitter + 2 * self.jitter * self.rand())
        self._current = min(self._current * 2, self.maximum)
        return min(delay, self.maximum)

    def reset(self) -> None:
        self._current = self.initial
