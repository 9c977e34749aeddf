"""A sleep that others can cut short: the main loop's only way of waiting."""

from __future__ import annotations

import asyncio
import math


class Alarm:
    """Sleeps until the earliest time anyone asked to be woken at.

    `ring_at` only ever moves the wake-up earlier, so a flood of NOTIFYs for
    jobs due later costs nothing but a comparison.  A wake-up asked for with
    `recheck=True` (the poll cap: nothing is known to be due) says so when it fires.
    """

    def __init__(self) -> None:
        self._changed = asyncio.Event()
        self._deadline = math.inf
        self._recheck = False

    @property
    def deadline(self) -> float:
        return self._deadline

    def ring_at(self, when: float, *, recheck: bool = False) -> None:
        """Wake up at loop time `when` (or earlier, if already asked)."""
        if when < self._deadline:
            self._deadline = when
            self._recheck = recheck
            self._changed.set()

    def ring_in(self, seconds: float, *, recheck: bool = False) -> None:
        self.ring_at(asyncio.get_running_loop().time() + max(seconds, 0.0), recheck=recheck)

    def ring_now(self) -> None:
        self.ring_at(-math.inf)

    async def sleep(self) -> bool:
        """Return at the deadline, which is then cleared: True if it was a recheck."""
        loop = asyncio.get_running_loop()
        while (delay := self._deadline - loop.time()) > 0:
            self._changed.clear()
            try:
                async with asyncio.timeout(None if math.isinf(delay) else delay):
                    await self._changed.wait()
            except TimeoutError:
                break
        self._deadline = math.inf
        recheck, self._recheck = self._recheck, False
        return recheck
