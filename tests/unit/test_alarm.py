"""The main loop's sleep: earliest wake-up wins, and a ring cuts a sleep short."""

from __future__ import annotations

import asyncio

from worker.daemon.alarm import Alarm
from worker.services.backoff import Backoff


def test_earliest_ring_wins_and_later_rings_are_ignored() -> None:
    async def main() -> float:
        alarm = Alarm()
        loop = asyncio.get_running_loop()
        start = loop.time()
        alarm.ring_in(5)
        alarm.ring_in(0.05)
        alarm.ring_in(3)
        await alarm.sleep()
        return loop.time() - start

    assert asyncio.run(main()) < 1


def test_ring_now_wakes_a_sleeper() -> None:
    async def main() -> float:
        alarm = Alarm()
        loop = asyncio.get_running_loop()
        alarm.ring_in(60)
        start = loop.time()
        loop.call_later(0.05, alarm.ring_now)
        await alarm.sleep()
        return loop.time() - start

    assert asyncio.run(main()) < 1


def test_a_poll_cap_wake_up_says_it_is_a_recheck_unless_an_earlier_ring_replaced_it() -> None:
    async def main() -> tuple[bool, bool, bool]:
        alarm = Alarm()
        alarm.ring_in(0.01, recheck=True)
        capped = await alarm.sleep()
        alarm.ring_in(0.05, recheck=True)
        alarm.ring_in(0.01)  # a NOTIFY: something is due
        notified = await alarm.sleep()
        alarm.ring_in(0.01, recheck=True)
        alarm.ring_in(5)  # later than the cap: the cap still fires first
        still_capped = await alarm.sleep()
        return capped, notified, still_capped

    assert asyncio.run(main()) == (True, False, True)


def test_backoff_grows_caps_and_resets() -> None:
    backoff = Backoff(initial=1, maximum=4, jitter=0, rand=lambda: 0.5)
    assert [backoff.next() for _ in range(4)] == [1, 2, 4, 4]
    backoff.reset()
    assert backoff.next() == 1
