"""Multifd stop-copy (QEMU 10.0's device-state transfer,
`MigrationOptions.multifd_channels` > 0): precopy stays on the main stream,
which gets its end marker when the stop-copy starts; the stop-copy data is
read in buffer-size chunks, each a packet with a sequence index, sent over
that many concurrent channels (tasks forwarding with a jitter, so packets
arrive out of order); the destination keeps them in a reorder buffer and, once
the main stream is loaded, writes them strictly in index order.  The bytes
queued (sent and not yet written) are bounded by `multifd_max_queued_bytes`:
the source waits."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .options import MigrationOptions
from .report import DeviceReport, MigrationError
from .stream import Chunk


@dataclass(frozen=True)
class Packet:
    idx: int
    data: Chunk
    last: bool = False  # the end of the device's stop-copy data (empty)


class Multifd:
    """One device's multifd stop-copy: channels (source -> destination) and
    the destination's reorder buffer, bounded by the queued bytes."""

    def __init__(self, name: str, options: MigrationOptions, report: DeviceReport) -> None:
        self.name = name
        self.channels = options.multifd_channels
        self.max_queued = max(1, options.multifd_max_queued_bytes)
        self.jitter_s = options.multifd_jitter_s
        self.report = report
        self.cond = asyncio.Condition()
        self.reorder: dict[int, Packet] = {}
        self.next_idx = 0  # the next index to write
        self.queued = 0  # bytes sent and not yet written
        self.error: BaseException | None = None
        self._queues: list[asyncio.Queue[Packet | None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._sent = 0
        self._arrived = 0  # every index below has arrived
        self._ahead: set[int] = set()  # arrived, above a missing index: held back

    # source side

    def start(self) -> None:
        for i in range(self.channels):
            q: asyncio.Queue[Packet | None] = asyncio.Queue()
            rng = random.Random(f"{self.name}/{i}")
            self._queues.append(q)
            self._tasks.append(
                asyncio.create_task(self._channel(q, rng), name=f"multifd-{self.name}-{i}")
            )

    async def send(self, data: Chunk, *, last: bool = False) -> None:
        """Queue a packet on the next channel (round robin); waits while the
        queued bytes would go over the bound (one packet always fits)."""
        n = len(data)
        async with self.cond:
            await self.cond.wait_for(
                lambda: (
                    self.error is not None or self.queued == 0 or self.queued + n <= self.max_queued
                )
            )
            if self.error is not None:
                raise MigrationError(f"{self.name} destination: load failed: {self.error}")
            self.queued += n
            r = self.report
            r.multifd_max_queued_bytes = max(r.multifd_max_queued_bytes, self.queued)
        packet = Packet(self._sent, data, last)
        self._queues[self._sent % self.channels].put_nowait(packet)
        self._sent += 1
        self.report.multifd_packets += 1

    async def finish(self) -> None:
        """The last packet sent: close the channels, wait for them."""
        for q in self._queues:
            q.put_nowait(None)
        await asyncio.gather(*self._tasks)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _channel(self, q: asyncio.Queue[Packet | None], rng: random.Random) -> None:
        while (p := await q.get()) is not None:
            if self.jitter_s > 0:
                await asyncio.sleep(rng.uniform(0, self.jitter_s))
            async with self.cond:
                r = self.report
                self.reorder[p.idx] = p
                if p.idx != self._arrived:  # ahead of a lower index still on its way
                    r.multifd_out_of_order += 1
                    self._ahead.add(p.idx)
                else:
                    self._arrived += 1
                    while self._arrived in self._ahead:
                        self._ahead.discard(self._arrived)
                        self._arrived += 1
                r.multifd_max_reorder_depth = max(r.multifd_max_reorder_depth, len(self._ahead))
                self.cond.notify_all()

    # destination side

    async def write_in_order(self, write: Callable[[Chunk], Awaitable[int]]) -> None:
        """Write the packets strictly by index until the last one."""
        while True:
            async with self.cond:
                await self.cond.wait_for(lambda: self.next_idx in self.reorder)
                p = self.reorder.pop(self.next_idx)
            if p.data:
                await write(p.data)  # without the lock: channels keep delivering
            async with self.cond:
                self.next_idx += 1
                self.queued -= len(p.data)
                self.cond.notify_all()
            if p.last:
                return

    async def fail(self, exc: BaseException) -> None:
        async with self.cond:
            self.error = exc
            self.cond.notify_all()
