"""One device's destination half (resuming), as QEMU's load side of
hw/vfio/migration.c: load_setup (RESUMING, the data fd), load_state (a loader
writing the stream in order, approving the switchover at INIT_DATA_SENT once
everything before it is written), load_cleanup (the data fd closed while the
device is still RESUMING), then STOP (the driver loads and validates),
RUNNING_P2P, RUNNING; on failure, a reset (RESUMING aborted).

The same object serves the in-process migration (local.py: fed by the
source half in this process) and the destination agent (incoming.py: fed
from the socket)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..client import VfioClient, VfioClientError
from ..uapi import VFIO_MIGRATION_P2P, VFIO_MIGRATION_STOP_COPY, MigState
from ..usermem import Slot, Slots
from .multifd import Multifd
from .report import MigrationError
from .states import set_state
from .stream import Chunk, InitDataSent, Marker, StreamItem, put, stop_copy_batch
from .writer import DataWriter

log = logging.getLogger(__name__)

S = MigState

Approve = Callable[[int], Awaitable[None]]  # the generation INIT_DATA_SENT carried


class DestinationDevice:
    """The resuming half of one device: `feed` it the stream in order."""

    def __init__(
        self,
        client: VfioClient,
        fd: int,
        name: str,
        *,
        stream_depth: int,
        approve: Approve,
        multifd: Multifd | None = None,
    ) -> None:
        self.client, self.fd, self.name = client, fd, name
        self.approve = approve
        self.multifd = multifd
        self.stream_depth = max(1, stream_depth)
        self.flags = 0
        self.data_fd: int | None = None
        self.state = S.RUNNING
        self.slots: Slots | None = None  # this side's own user memory (an agent's), if any
        self.bytes_written = 0
        self.init_data_sent = 0
        self._stream: asyncio.Queue[StreamItem] = asyncio.Queue(self.stream_depth)
        self._batch = stop_copy_batch(self.stream_depth)
        self._loader: asyncio.Task[None] | None = None

    @property
    def p2p(self) -> bool:
        return bool(self.flags & VFIO_MIGRATION_P2P)

    @property
    def loader(self) -> asyncio.Future[None]:
        assert self._loader is not None
        return self._loader

    async def discover(self) -> None:
        self.flags = await self.client.migration_flags(self.fd)
        if not self.flags & VFIO_MIGRATION_STOP_COPY:
            raise MigrationError(f"{self.name}: not migratable (no VFIO_MIGRATION_STOP_COPY)")

    async def set_state(self, state: MigState, recovery: MigState | None) -> int | None:
        fd = await set_state(
            self.client, self.fd, state, recovery, f"{self.name} destination", self.close_data_fd
        )
        self.state = state
        return fd

    async def setup(self) -> None:
        """load_setup: RESUMING, and the loader on its data fd."""
        self.data_fd = await self.set_state(S.RESUMING, None)
        if self.data_fd is None:
            raise MigrationError(f"{self.name}: RESUMING gave no data fd")
        self._loader = asyncio.create_task(self._load(), name=f"load-{self.name}")

    async def feed(self, item: StreamItem) -> None:
        """The next item of the stream (bounded: waits while the writes are behind)."""
        try:
            await put(self._stream, item, self.loader)
        except VfioClientError as e:  # what the loader failed with
            raise MigrationError(f"{self.name} destination: load failed: {e}", errno=e.errno) from e

    async def free_slot(self) -> Slot:
        """A free buffer of this side's user memory: waits for one, or for the loader to fail."""
        assert self.slots is not None
        slot = self.slots.try_acquire()
        if slot is not None:
            return slot
        get = asyncio.ensure_future(self.slots.acquire())
        waits: list[asyncio.Future[Any]] = [get, self.loader]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            self.check()
            raise MigrationError(f"{self.name}: the destination stopped taking data")
        return get.result()

    async def _load(self) -> None:
        """load_state: write data in stream order; approve on INIT_DATA_SENT;
        with multifd, then the stop-copy packets in index order.  Then
        load_cleanup: the data fd is closed while the device is still
        RESUMING (RESUMING -> STOP ends the stream, and nothing must hold it
        after)."""
        assert self.data_fd is not None
        writer = DataWriter(self.client, self.data_fd, self.stream_depth)
        try:
            await self._load_main(writer)
            if self.multifd is not None:
                await self.multifd.write_in_order(writer.write)
            await writer.end()
        except BaseException as e:
            await writer.cancel()
            if self.multifd is not None:
                await self.multifd.fail(e)
            raise
        await self.close_data_fd()

    async def _load_main(self, writer: DataWriter) -> None:
        held: StreamItem | None = None
        while True:
            item = held if held is not None else await self._stream.get()
            held = None
            if isinstance(item, Slot):
                # Slots already queued behind it go in the same message, as
                # many as the source puts in one (see stop_copy_batch).
                batch: list[Chunk] = [item]
                while len(batch) < self._batch and not self._stream.empty():
                    nxt = self._stream.get_nowait()
                    if not isinstance(nxt, Slot):
                        held = nxt
                        break
                    batch.append(nxt)
                self.bytes_written += sum(len(c) for c in batch)
                await writer.write_many(batch)
                continue
            if item is Marker.END:
                return  # _load ends the writer's calls
            if isinstance(item, InitDataSent):
                # Approve only once everything before the marker is written.
                await writer.flush()
                self.init_data_sent += 1
                await self.approve(item.generation)
                continue
            assert isinstance(item, bytes | Slot)
            self.bytes_written += len(item)
            await writer.write(item)

    def check(self) -> None:
        """Raise what the loader failed with, if it did."""
        if self._loader is not None and self._loader.done() and not self._loader.cancelled():
            exc = self._loader.exception()
            if exc is not None:
                code = exc.errno if isinstance(exc, VfioClientError | MigrationError) else None
                raise MigrationError(
                    f"{self.name} destination: load failed: {exc}", errno=code
                ) from exc

    async def loaded(self) -> None:
        """Everything fed is written and the data fd closed."""
        try:
            await self.loader
        except VfioClientError as e:
            raise MigrationError(f"{self.name} destination: load failed: {e}", errno=e.errno) from e

    async def close_data_fd(self) -> None:
        fd, self.data_fd = self.data_fd, None
        if fd is not None:
            with contextlib.suppress(VfioClientError):  # EBADF: the session ended
                await self.client.close(fd)

    async def close_user_memory(self) -> None:
        if self.slots is not None:
            slots, self.slots = self.slots, None
            await slots.memory.close()

    async def abort(self) -> None:
        """The migration failed: the loader stopped, the data fd closed (the
        reset must not cut a stream under a holder), the device reset out of
        RESUMING."""
        if self._loader is not None:
            if not self._loader.done():
                self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loader  # (also retrieves what it failed with)
        await self.close_data_fd()
        if self.state != S.RUNNING:
            try:
                await self.client.reset(self.fd)  # aborts RESUMING
                self.state = S.RUNNING
            except VfioClientError as e:
                log.error("%s: destination reset failed: %s", self.name, e)
