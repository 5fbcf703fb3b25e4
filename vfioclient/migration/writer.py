"""The destination's write(2)s on its data fd."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from ..client import VfioClient, WriteFromCall
from ..usermem import Slot
from .stream import Chunk, put


class DataWriter:
    """The destination's write(2)s on one data fd, as one call while data
    flows (a call per chunk costs a round trip each):

    * bytes go on a Write call: `write` queues a chunk (bounded);
    * a user memory slot the driver maps goes on a WriteFromStream call, and
      is given back when the driver answers that write (a slot it cannot map
      is copied onto the Write call and given back at once); `write_many`
      puts several such slots in one request (a write(2) each, `then`).

    `flush` returns once the driver has taken every chunk so far.  It keeps a
    WriteFromStream open for the writes to come: a new call waits for the
    driver to take it up, behind every other client's new calls (100-500 ms
    with 64 migrations at once), and the stop-copy's writes after the
    precopy's flush are downtime.  A Write call it ends (its end is how the
    driver says it took the chunks).  `end` flushes and ends the calls.
    Switching between the two kinds ends the call of the other, so the
    writes stay in order."""

    def __init__(self, client: VfioClient, fd: int, depth: int) -> None:
        self.client, self.fd, self.depth = client, fd, max(1, depth)
        self._q: asyncio.Queue[bytes | None] = asyncio.Queue(self.depth)
        self._call: asyncio.Task[int] | None = None
        self._from: WriteFromCall | None = None
        self._answers: asyncio.Task[int] | None = None  # reads _from's answers
        self._in_flight: collections.deque[Slot] = collections.deque()
        self._idle = asyncio.Event()  # nothing in flight on _from
        self._idle.set()

    async def write(self, data: Chunk) -> int:
        if isinstance(data, Slot):
            addr = data.addr(self.client)
            if addr is not None:
                return await self._write_from([data], [addr])
            buf = bytes(data.view)
            data.release()
            data = buf
        if self._from is not None:
            await self._flush_from()
        if self._call is None:
            q = self._q = asyncio.Queue(self.depth)

            async def chunks() -> AsyncIterator[bytes]:
                while (c := await q.get()) is not None:
                    yield c

            self._call = asyncio.ensure_future(self.client.write(self.fd, chunks()))
        await put(self._q, data, self._call)
        return len(data)

    async def write_many(self, chunks: list[Chunk]) -> int:
        """`write` each, in order; slots the driver maps go in one message
        (a write(2) each, MAX_SPANS at most per message)."""
        addrs = [c.addr(self.client) if isinstance(c, Slot) else None for c in chunks]
        if len(chunks) == 1 or any(a is None for a in addrs):
            return sum([await self.write(c) for c in chunks])
        slots = [c for c in chunks if isinstance(c, Slot)]
        return await self._write_from(slots, [a for a in addrs if a is not None])

    async def _write_from(self, slots: list[Slot], addrs: list[int]) -> int:
        if self._call is not None:
            await self._flush_write()
        if self._answers is not None and self._answers.done():
            await self._flush_from()  # raises what a write failed with
        if self._from is None or self._answers is None:
            call = self._from = self.client.write_from_stream(self.fd)
            self._answers = asyncio.ensure_future(self._take_answers(call))
        self._in_flight.extend(slots)
        self._idle.clear()
        await self._from.submit_many([(a, len(s)) for a, s in zip(addrs, slots, strict=True)])
        if self._answers.done():  # it ended meanwhile: nobody else gives the slots back
            while self._in_flight:
                self._in_flight.popleft().release()
        return sum(len(s) for s in slots)

    async def _take_answers(self, call: WriteFromCall) -> int:
        """Each answer gives its slot back; the bytes taken in all."""
        total = 0
        try:
            while (n := await call.result()) is not None:
                total += n
                self._in_flight.popleft().release()
                if not self._in_flight:
                    self._idle.set()
        finally:
            while self._in_flight:
                self._in_flight.popleft().release()
            self._idle.set()
        return total

    async def flush(self) -> None:
        """Everything queued is written (a WriteFromStream stays open; a
        failed write raises its errno)."""
        if self._from is None or self._answers is None:
            await self._flush_write()
            return
        answers = self._answers
        idle = asyncio.ensure_future(self._idle.wait())
        try:
            await asyncio.wait([idle, answers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
        if answers.done():  # the call ended: it failed (raises), or took everything
            await self._flush_from()

    async def end(self) -> None:
        """Everything queued is written and the calls ended."""
        if self._from is not None:
            await self._flush_from()
        await self._flush_write()

    async def _flush_write(self) -> int:
        if self._call is None:
            return 0
        call = self._call
        await put(self._q, None, call)
        self._call = None
        return await call

    async def _flush_from(self) -> int:
        assert self._from is not None and self._answers is not None
        call, answers = self._from, self._answers
        self._from = self._answers = None
        if not answers.done():
            with contextlib.suppress(asyncio.InvalidStateError):  # it failed: answers says how
                await call.close_writing()
        return await answers

    async def cancel(self) -> None:
        if self._call is not None:
            call, self._call = self._call, None
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await call
        if self._from is not None and self._answers is not None:
            self._from.cancel()
            self._answers.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._answers
            self._from = self._answers = None
