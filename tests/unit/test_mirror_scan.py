"""How a `postgres` mirror reads the changed rows of a large table: by ranges of pages, the end
of the table first, and handed to the destination in batches while the scan goes on."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from worker.connectors.postgres.stream import CopyStream
from worker.connectors.postgres.tracking import SCAN_PARTS, SPLIT_PAGES, page_ranges, pages_between


@pytest.mark.parametrize("pages", [SPLIT_PAGES, SPLIT_PAGES + 7, 87_069, 10_000_000])
def test_a_large_table_is_read_in_ranges_that_cover_every_page_once_the_end_first(pages: int) -> None:
    ranges = page_ranges(pages)
    assert len(ranges) == SCAN_PARTS
    # the first range is open at the top (pages added since are read too), the last at the bottom
    assert ranges[0][1] is None and ranges[-1][0] is None
    for (low, _), (_, high) in itertools.pairwise(ranges):
        assert low == high  # contiguous, no page twice, none left out
    firsts = [low for low, _ in ranges[:-1]]
    assert firsts == sorted(firsts, reverse=True)
    assert all(low is not None and 0 < low < pages for low in firsts)


def test_a_small_table_is_one_range() -> None:
    assert page_ranges(SPLIT_PAGES - 1) == [(None, None)]
    assert page_ranges(0) == [(None, None)]


def test_the_range_conditions_compare_ctids() -> None:
    assert pages_between(10, 20).as_string(None) == "ctid >= '(10,0)'::tid AND ctid < '(20,0)'::tid"
    assert pages_between(None, 20).as_string(None) == "ctid < '(20,0)'::tid"
    assert pages_between(10, None).as_string(None) == "ctid >= '(10,0)'::tid"
    assert pages_between(None, None).as_string(None) == "TRUE"


class _SlowCopy:
    """COPY data arriving as the blocks given, after the pauses given (a scan that finds a few
    changed rows, then scans on for a while)."""

    def __init__(self, arrivals: list[tuple[float, bytes]]) -> None:
        self.arrivals = arrivals

    async def __aenter__(self) -> _SlowCopy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._blocks()

    async def _blocks(self) -> AsyncIterator[bytes]:
        for pause, block in self.arrivals:
            await asyncio.sleep(pause)
            yield block


async def _batches(copy: Any, max_rows: int, max_seconds: float) -> list[tuple[float, bytes]]:
    """Each batch the stream hands out, with when it was complete (seconds from the start)."""
    started = time.monotonic()
    out: list[tuple[float, bytes]] = []
    async with CopyStream(copy, prefetch=True) as stream:
        while not stream.done:
            data = b"".join([chunk async for chunk in stream.chunks(max_rows, max_seconds)])
            out.append((time.monotonic() - started, data))
    return out


def test_rows_found_early_are_handed_out_while_the_scan_goes_on() -> None:
    copy = _SlowCopy([(0, b"1\ta\n2\tb\n"), (0.01, b"3\tc\n"), (2.0, b"4\td\n")])
    batches = asyncio.run(_batches(copy, max_rows=1000, max_seconds=0.1))
    # the first three rows did not wait for the fourth, two seconds later
    assert batches[0][1] == b"1\ta\n2\tb\n3\tc\n"
    assert batches[0][0] < 1.0
    # and nothing is lost or repeated
    assert b"".join(data for _, data in batches) == b"1\ta\n2\tb\n3\tc\n4\td\n"


def test_a_batch_is_still_cut_at_its_size() -> None:
    copy = _SlowCopy([(0, b"".join(b"%d\n" % i for i in range(25)))])
    batches = asyncio.run(_batches(copy, max_rows=10, max_seconds=5.0))
    assert [data.count(b"\n") for _, data in batches if data] == [10, 10, 5]
