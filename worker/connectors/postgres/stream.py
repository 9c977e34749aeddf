"""Raw `COPY … TO STDOUT` data from the source, read in large blocks and cut at row boundaries."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

# Bytes of COPY data gathered per read from the source (rows arrive one message each).
READ_BLOCK = 1 << 18
READ_ROWS = 2048
# A block is handed on after at most this long, however few rows it holds: the rows of a
# sparse scan (the changed rows of a large table) reach the destination while it goes on.
BLOCK_SECONDS = 0.02
# Bytes read ahead of the destination's writes by a stream with prefetch (by default).
PREFETCH_BYTES = 4 * READ_BLOCK


def _gather(copy: Any, max_bytes: int) -> Any:
    """A psycopg generator reading COPY rows until `max_bytes` (or READ_ROWS rows) are in
    hand, or BLOCK_SECONDS have passed."""
    parts: list[Any] = []
    size = 0
    deadline = time.monotonic() + BLOCK_SECONDS
    while size < max_bytes and len(parts) < READ_ROWS:
        data = yield from copy._read_gen()
        if not data:
            break
        parts.append(data)
        size += len(data)
        if len(parts) % 16 == 0 and time.monotonic() >= deadline:
            break
    return parts


class _Later:
    """What `_read` returns when no block came in time."""


LATER = _Later()


class CopyStream:
    """Raw `COPY … TO STDOUT` text data, handed out in batches cut at row boundaries.

    With `prefetch`, a task reads ahead (at most `ahead` bytes) while the caller writes
    what it has: reading the source and writing the destination overlap.
    """

    def __init__(self, copy: Any, *, prefetch: bool = False, ahead: int = PREFETCH_BYTES) -> None:
        self._copy = copy
        self._active: Any = None
        self._iter: AsyncIterator[Any] | None = None
        self._carry = b""
        self.rows = 0
        self.done = False
        self._last_row = b""
        self._prefetch = prefetch
        self._queue: asyncio.Queue[bytes | BaseException | None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False
        self._ahead = ahead
        self._queued = 0  # bytes read ahead, not yet handed out
        self._room = asyncio.Event()  # set when the reader may read another block
        self._next: asyncio.Future[bytes | BaseException | None] | None = None  # a pending get

    async def __aenter__(self) -> CopyStream:
        self._copy_cm = self._copy
        copy = self._active = await self._copy_cm.__aenter__()
        self._iter = copy.__aiter__()
        if self._prefetch:
            self._queue = asyncio.Queue()  # bounded in bytes by the reader
            self._reader = asyncio.create_task(self._read_ahead())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None and not self._reader.done():
            # Let the reader finish the block it is reading (never cancel it inside psycopg).
            self._stopping = True
            self._room.set()
            assert self._queue is not None
            while not self._reader.done():
                while not self._queue.empty():
                    self._queue.get_nowait()
                await asyncio.wait([self._reader], timeout=0.05)
        if self._next is not None:
            self._next.cancel()
        await self._copy_cm.__aexit__(*exc)

    async def _read_ahead(self) -> None:
        assert self._queue is not None
        try:
            while not self._stopping:
                if self._queued >= self._ahead:
                    self._room.clear()
                    await self._room.wait()
                    continue
                data = await self._read_block()
                self._queued += len(data or b"")
                self._queue.put_nowait(data)
                if data is None:
                    return
        except Exception as exc:  # handed to the consumer
            self._queue.put_nowait(exc)

    async def _read(self, within: float | None = None) -> bytes | _Later | None:
        """The next block; LATER if a prefetched one has not come `within` seconds."""
        if self._queue is None:
            return await self._read_block()
        if self._next is None:
            self._next = asyncio.ensure_future(self._queue.get())
        if within is not None and not self._next.done():
            # the get stays pending, for the next call: nothing read ahead is lost
            await asyncio.wait([self._next], timeout=max(within, 0))
            if not self._next.done():
                return LATER
        got = await self._next
        self._next = None
        if isinstance(got, BaseException):
            raise got
        if got is not None:
            self._queued -= len(got)
            self._room.set()
        return got

    async def _read_block(self) -> bytes | None:
        """The next block of whole rows, None at the end.

        The server sends one message per row; reading them one await at a time costs more
        than the rows themselves, so blocks are gathered in one go where psycopg allows it.
        """
        copy = self._active
        if hasattr(copy, "_read_gen") and hasattr(copy, "connection"):
            parts = await copy.connection.wait(_gather(copy, READ_BLOCK))
            return b"".join(parts) if parts else None
        assert self._iter is not None
        try:
            return bytes(await self._iter.__anext__())
        except StopAsyncIteration:
            return None

    async def chunks(
        self, max_rows: int | None = None, max_seconds: float | None = None
    ) -> AsyncIterator[bytes]:
        """Data of up to `max_rows` rows (all that is left without a limit), in large pieces;
        with `max_seconds`, no more once that long has passed since the first of them."""
        rows = 0
        pending = self._carry
        self._carry = b""
        cut: float | None = None  # when the batch ends, from its first row
        try:
            while max_rows is None or rows < max_rows:
                if pending:
                    data, pending = pending, b""
                else:
                    wait = None if cut is None else cut - time.monotonic()
                    read = await self._read(wait)
                    if read is LATER:
                        break
                    if read is None:
                        self.done = True
                        break
                    assert isinstance(read, bytes)
                    data = read
                n = data.count(b"\n")
                if max_rows is not None and rows + n > max_rows:
                    at = _nth_newline(data, max_rows - rows) + 1
                    data, self._carry = data[:at], data[at:]
                    n = max_rows - rows
                rows += n
                if cut is None and max_seconds is not None and n:
                    cut = time.monotonic() + max_seconds
                self._remember_last(data)
                yield data
        finally:
            self.rows += rows

    def _remember_last(self, data: bytes | bytearray) -> None:
        end = len(data) - 1 if data.endswith(b"\n") else len(data)
        start = data.rfind(b"\n", 0, end) + 1
        if start == 0:
            self._last_row += bytes(data[:end])  # a row longer than one piece
        else:
            self._last_row = bytes(data[start:end])

    def last_key(self, n: int) -> list[str | None]:
        """The first `n` fields of the last row handed out (the key, in key order)."""
        return [unescape_copy_field(f) for f in self._last_row.split(b"\t")[:n]]


def _nth_newline(data: bytes, n: int) -> int:
    at = -1
    for _ in range(n):
        at = data.index(b"\n", at + 1)
    return at


_ESCAPES = {b"b": "\b", b"f": "\f", b"n": "\n", b"r": "\r", b"t": "\t", b"v": "\v", b"\\": "\\"}


def unescape_copy_field(raw: bytes) -> str | None:
    r"""One field of COPY text format as a string (`\N` is NULL)."""
    if raw == rb"\N":
        return None
    if b"\\" not in raw:
        return raw.decode()
    out = bytearray()
    i = 0
    while i < len(raw):
        ch = raw[i : i + 1]
        if ch != b"\\" or i + 1 >= len(raw):
            out += ch
            i += 1
            continue
        nxt = raw[i + 1 : i + 2]
        if nxt in _ESCAPES:
            out += _ESCAPES[nxt].encode()
            i += 2
        elif nxt.isdigit():
            digits = re.match(rb"[0-7]{1,3}", raw[i + 1 : i + 4])
            assert digits is not None
            out.append(int(digits.group(), 8))
            i += 1 + len(digits.group())
        elif nxt == b"x" and re.match(rb"[0-9a-fA-F]", raw[i + 2 : i + 3]):
            digits = re.match(rb"[0-9a-fA-F]{1,2}", raw[i + 2 : i + 4])
            assert digits is not None
            out.append(int(digits.group(), 16))
            i += 2 + len(digits.group())
        else:
            out += nxt
            i += 2
    return out.decode()
