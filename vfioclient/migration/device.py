"""One device's migration as its source half runs it (saving: discovery,
setup, precopy iterations, the stop-copy drain), as QEMU's
hw/vfio/migration.c does for one VFIODevice; its destination half is behind
`self.link` (link.py): in this process (local.py) or a destination agent
across hosts (remote.py)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
from collections.abc import AsyncIterator
from typing import Any

from .. import calls
from ..client import PrecopyInfo, ReadIntoCall, VfioClientError
from ..uapi import (
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    MigState,
)
from ..usermem import Slot, Slots
from .link import DestinationLink
from .memory import both, user_memory
from .multifd import Multifd
from .options import DevicePair, MigrationOptions, OutgoingDevice
from .progress import notify
from .report import DeviceReport, MigrationError
from .states import set_state
from .stream import Chunk, InitDataSent, Marker, StreamItem, stop_copy_batch
from .switchover import SwitchoverAck

log = logging.getLogger(__name__)

S = MigState


# vfio_state_pending_exact on a failed MIG_DATA_SIZE: QEMU never switches over on it.
UNKNOWN_SIZE = 100 << 30


class DeviceMigration:
    """One device's source half; `link` is its destination (an in-process
    half for a DevicePair, set by the remote Destinations for an
    OutgoingDevice)."""

    def __init__(
        self,
        pair: DevicePair | OutgoingDevice,
        index: int,
        ack: SwitchoverAck,
        options: MigrationOptions,
    ) -> None:
        self.pair = pair
        self.name = pair.name or f"dev{index}"
        self.src = pair.source
        self.ack = ack
        self.options = options
        self.report = DeviceReport(self.name)
        self.flags = 0
        self.v2 = False
        self.buffer_size = 0
        self.src_data_fd: int | None = None
        self.src_state = S.RUNNING
        self.in_precopy = False
        self.initial_bytes = 0  # cached
        self.dirty_bytes = 0  # cached
        self.initial_data_sent = False
        self._slots: Slots | None = None  # the local data path (user memory)
        # The stop-copy's ReadIntoStream, opened as the precopy begins: a new
        # call waits for the driver to take it up, behind every other client's
        # new calls (100-500 ms with 64 migrations at once), and the stop-copy
        # is downtime.  A message on a call already open does not wait so.
        self._stop_copy_reads: ReadIntoCall | None = None
        self.multifd: Multifd | None = None
        if options.multifd_channels > 0:
            self.multifd = Multifd(self.name, options, self.report)
        self._link: DestinationLink | None = None
        if isinstance(pair, DevicePair):
            from .local import LocalLink  # (local imports this module's type)

            self._link = LocalLink(self, pair)

    @property
    def link(self) -> DestinationLink:
        assert self._link is not None, "no destination yet"
        return self._link

    @link.setter
    def link(self, link: DestinationLink) -> None:
        self._link = link

    @property
    def destination_digest(self) -> str:
        """The destination's digest once loaded (across hosts: from the return path)."""
        return self.link.digest

    @property
    def pre_copy(self) -> bool:
        return bool(self.flags & VFIO_MIGRATION_PRE_COPY)

    @property
    def p2p(self) -> bool:
        return bool(self.flags & VFIO_MIGRATION_P2P)

    @property
    def pending_estimate(self) -> int:
        """QEMU vfio_state_pending_estimate: cached init + dirty, no ioctl."""
        return self.initial_bytes + self.dirty_bytes if self.in_precopy else 0

    # --- discovery ---------------------------------------------------------------------

    async def discover(self) -> None:
        self.flags = await self.src.migration_flags(self.pair.source_fd)
        if not self.flags & VFIO_MIGRATION_STOP_COPY:
            raise MigrationError(f"{self.name}: not migratable (no VFIO_MIGRATION_STOP_COPY)")
        if self.pre_copy:
            # v2 opt-in (REINIT); on failure keep v1 semantics: flags ignored.
            try:
                self.v2 = await self.src.enable_precopy_info_v2(self.pair.source_fd)
            except VfioClientError as e:
                log.warning("%s: MIG_PRECOPY_INFOv2 opt-in failed (%s): v1", self.name, e)
                self.v2 = False
        self.report.dma_logging = await self.src.dma_logging_supported(self.pair.source_fd)
        stop_copy_length = await self.src.data_size(self.pair.source_fd)
        self.buffer_size = max(1, min(self.options.buffer_cap, stop_copy_length))
        self.src_state = await self.src.get_state(self.pair.source_fd)
        r = self.report
        r.migration_flags, r.pre_copy, r.p2p = self.flags, self.pre_copy, self.p2p
        r.precopy_info_v2, r.buffer_size = self.v2, self.buffer_size

    # --- state changes -----------------------------------------------------------------

    async def set_source(self, state: MigState, recovery: MigState | None) -> int | None:
        fd = await set_state(
            self.src, self.pair.source_fd, state, recovery, f"{self.name} source",
            self._close_src_data_fd,
        )  # fmt: skip
        self.src_state = state
        return fd

    # --- setup -------------------------------------------------------------------------

    async def setup(self) -> PrecopyInfo | None:
        """The destination's load_setup (its link's), then save_setup:
        PRE_COPY and the first PRECOPY_INFO; that answer if it is a REINIT
        (the caller reports it), else None."""
        await self._setup_user_memory(self.link)
        await self.link.start()
        return await self._enter_precopy()

    async def setup_source(self) -> PrecopyInfo | None:
        """`setup` before the link exists (the destination's load_setup runs
        meanwhile, an agent's, mapping none of our memory); `linked` after."""
        await self._setup_user_memory(None)
        return await self._enter_precopy()

    def linked(self) -> None:
        """The link is there (after `setup_source`): the report's data path."""
        link = self.link
        here = "shm" if self._slots is not None else "grpc"
        self.report.data_path = both(here, link.data_path, per_side=link.per_side)

    async def _enter_precopy(self) -> PrecopyInfo | None:
        """save_setup's PRE_COPY and first PRECOPY_INFO (the first ack requested)."""
        if not (self.pre_copy and self.src_state == S.RUNNING):
            return None
        self.src_data_fd = await self.set_source(S.PRE_COPY, S.RUNNING)
        if self.src_data_fd is None:
            raise MigrationError(f"{self.name}: PRE_COPY gave no data fd")
        self.in_precopy = True
        if self._slots is not None:
            self._stop_copy_reads = self.src.read_into_stream(self.src_data_fd)
        info = await self.src.precopy_info(self.src_data_fd)
        self.ack.request(self.name)  # the first switchover-ack
        if self.v2 and info.reinit:
            # A REINIT in the first answer (the device was reconfigured since
            # PRE_COPY began): as anywhere else, initial_bytes is the new
            # absolute value and dirty starts again from 0; no INIT_DATA_SENT
            # was sent and no ack given yet, so the ack just requested is the
            # one that waits for these initial bytes.
            self.initial_bytes, self.dirty_bytes = info.initial_bytes, 0
            notify(self.options.progress, "reinit", self.name, info.initial_bytes)
            self._pending_progress()
            return info
        self.initial_bytes, self.dirty_bytes = info.initial_bytes, info.dirty_bytes
        self._pending_progress()
        return None

    async def _setup_user_memory(self, link: DestinationLink | None) -> None:
        """The local data path: one segment of stream_depth buffers, mapped
        by the source's driver (else no use: gRPC) and, in this process, if
        it can, the destination's (else writes copy out of it onto a Write
        call).  Without a link yet (`setup_source`), the source's only."""
        slots, mapped = await user_memory(
            self.name,
            self.options.data_path,
            self.buffer_size,
            max(2, self.options.stream_depth),
            [self.src, *(link.memory_clients if link is not None else ())],
        )
        self._slots = slots
        if link is not None:
            link.memory_mapped(slots is not None and all(mapped[1:]))
            self.linked()

    async def close_user_memory(self) -> None:
        if self._slots is not None:
            slots, self._slots = self._slots, None
            await slots.memory.close()

    async def _free_slot(self) -> Slot:
        """A free slot: waits for one, or for the destination to fail."""
        assert self._slots is not None
        slot = self._slots.try_acquire()
        if slot is not None:
            return slot
        get = asyncio.ensure_future(self._slots.acquire())
        waits: list[asyncio.Future[Any]] = [get, self.link.failed]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            self.check_loader()
            raise MigrationError(f"{self.name}: the destination stopped taking data")
        return get.result()

    async def _read_slot(self) -> Slot | None:
        """One read(2) of up to a buffer into a free slot (a precopy
        iteration's): the slot, None when it read nothing."""
        assert self.src_data_fd is not None
        slot = await self._free_slot()
        addr = slot.addr(self.src)
        assert addr is not None
        try:
            slot.length = await self.src.read_into(self.src_data_fd, addr, self.buffer_size)
        except BaseException:
            slot.release()
            raise
        if slot.length == 0:
            slot.release()
            return None
        return slot

    async def _read_chunks(self) -> AsyncIterator[Chunk]:
        """The stop-copy data to the end of the stream, in order."""
        assert self.src_data_fd is not None
        if self._slots is None:
            async for chunk in self.src.read_stream(self.src_data_fd, chunk_size=self.buffer_size):
                if chunk:
                    yield chunk
            return
        # read(2)s into free slots, ahead of their answers (the driver stops
        # after the read that returns 0), a batch to a request (one message
        # for several read(2)s): a quarter of the slots, so a short stop-copy
        # still overlaps its reads with its sends.  A slot is waited for
        # only when no read is ahead; otherwise reads go out a whole batch
        # at a time.
        call, self._stop_copy_reads = self._stop_copy_reads, None
        if call is None or call.fd != self.src_data_fd:
            if call is not None:
                await _end_unused(call)
            call = self.src.read_into_stream(self.src_data_fd)
        slots = self._slots
        ahead: collections.deque[Slot] = collections.deque()
        batch = stop_copy_batch(slots.count)
        ended = False
        try:
            while True:
                while not ahead or slots.count - slots.in_use >= batch:
                    spans: list[tuple[int, int]] = []
                    while len(spans) < batch:
                        slot = (
                            await self._free_slot()
                            if not ahead and not spans
                            else slots.try_acquire()
                        )
                        if slot is None:
                            break
                        ahead.append(slot)
                        addr = slot.addr(self.src)
                        assert addr is not None
                        spans.append((addr, self.buffer_size))
                    if not spans:
                        break
                    await call.submit_many(spans)
                n = await call.result()
                slot = ahead.popleft()
                if not n:  # 0: the end (None: the call ended after it)
                    slot.release()
                    if n == 0:
                        # End the call as the driver ends it: no more requests,
                        # the rest answered 0, status OK.  A cancelled
                        # ReadIntoStream leaks two small native blocks in the
                        # driver's grpc.aio per call (grpc/grpc#43360), ~200 B a
                        # migration; the reads ahead touch no memory after the end.
                        await call.finish()
                    ended = True
                    return
                slot.length = n
                yield slot
        finally:
            while ahead:
                ahead.popleft().release()
            if not ended:
                call.cancel()  # a failure, or a consumer that stopped early

    def _pending_progress(self) -> None:
        notify(self.options.progress, "pending", self.name, self.initial_bytes, self.dirty_bytes)

    # --- source: precopy ---------------------------------------------------------------

    async def _send(self, item: StreamItem) -> None:
        """Onto the migration stream (bounded: waits while the destination is behind)."""
        await self.link.send(item)

    async def iterate(self) -> int:
        """save_live_iterate: one read of up to the buffer size; the bytes read."""
        if not self.in_precopy or self.src_data_fd is None:
            return 0
        self.report.reads += 1
        data: Chunk | None
        try:
            if self._slots is not None:
                data = await self._read_slot()
            else:
                data = await self.src.read(self.src_data_fd, self.buffer_size)
        except VfioClientError as e:
            if e.errno != errno.ENOMSG:
                raise
            data = None
        if not data:  # empty for now
            self.report.empty_reads += 1
            self.initial_bytes = self.dirty_bytes = 0
        else:
            await self._send(data)
            n = len(data)
            self.report.precopy_bytes += n
            notify(self.options.progress, "bytes_moved", self.name, "precopy", n)
            taken = min(n, self.initial_bytes)
            self.initial_bytes -= taken
            self.dirty_bytes = max(0, self.dirty_bytes - (n - taken))
        if self.initial_bytes == 0 and not self.initial_data_sent:
            await self._send(InitDataSent(self.ack.generation(self.name)))
            self.initial_data_sent = True
            self.report.init_data_sent += 1
        return len(data) if data else 0

    async def query_precopy_info(self) -> PrecopyInfo | None:
        """PRECOPY_INFO: refresh the cached counters; the answer if it is a
        REINIT (the caller handles it), else None."""
        if not self.in_precopy or self.src_data_fd is None:
            return None
        return self.take_precopy_info(await self.src.precopy_info(self.src_data_fd))

    def take_precopy_info(self, info: PrecopyInfo) -> PrecopyInfo | None:
        """A PRECOPY_INFO answer: a REINIT is returned (the caller handles
        it); else the cached counters take its values."""
        if self.v2 and info.reinit:
            return info
        self.initial_bytes, self.dirty_bytes = info.initial_bytes, info.dirty_bytes
        self._pending_progress()
        return None

    async def pending_exact(self) -> tuple[int, PrecopyInfo | None]:
        """vfio_state_pending_exact: MIG_DATA_SIZE (`exact_pending`), then in
        precopy PRECOPY_INFO (`query_precopy_info`), whatever the first
        answered, as QEMU's thread makes them; both sent at once on one
        Ioctl lane (one round trip; the driver runs them in that order)."""
        if not self.in_precopy or self.src_data_fd is None:
            return await self.exact_pending(), None
        size, info = await self.src.ioctls(
            calls.data_size(self.pair.source_fd), calls.precopy_info(self.src_data_fd)
        )
        if isinstance(info, VfioClientError):
            raise info
        if isinstance(size, VfioClientError):
            size = UNKNOWN_SIZE
        return size, self.take_precopy_info(info)

    def rearm(self, info: PrecopyInfo) -> None:
        """REINIT: new initial bytes, dirty reset, a new switchover-ack needed."""
        self.initial_bytes = info.initial_bytes
        self.dirty_bytes = 0
        self.initial_data_sent = False
        self.ack.request(self.name)
        notify(self.options.progress, "reinit", self.name, info.initial_bytes)
        self._pending_progress()

    async def exact_pending(self) -> int:
        """vfio_state_pending_exact: stop_copy_length (includes unread precopy data)."""
        try:
            return await self.src.data_size(self.pair.source_fd)
        except VfioClientError:
            return UNKNOWN_SIZE

    # --- switchover --------------------------------------------------------------------

    async def to_p2p(self) -> None:
        if self.p2p:
            await self.set_source(S.PRE_COPY_P2P if self.in_precopy else S.RUNNING_P2P, S.RUNNING)

    async def to_stop_copy(self) -> None:
        fd = await self.set_source(S.STOP_COPY, S.STOP)
        self.in_precopy = False
        if fd is not None:  # came from STOP (no precopy): a new saving fd
            self.src_data_fd = fd
        if self.src_data_fd is None:
            raise MigrationError(f"{self.name}: STOP_COPY has no data fd")

    async def drain(self) -> None:
        """save_complete_precopy: read to EOF, in order, into the stream; then
        wait for the destination to have written all of it."""
        assert self.src_data_fd is not None
        self.initial_bytes = self.dirty_bytes = 0
        self._pending_progress()
        if self.multifd is not None:
            await self._drain_multifd(self.multifd)
            return
        async for chunk in self._read_chunks():
            await self._send(chunk)
            self._stop_copy_read(len(chunk))
        await self._send(Marker.END)
        await self.loaded()

    def _stop_copy_read(self, n: int) -> None:
        self.report.stop_copy_bytes += n
        notify(self.options.progress, "bytes_moved", self.name, "stop-copy", n)

    async def _drain_multifd(self, mf: Multifd) -> None:
        """The main stream ends here; the stop-copy data goes as indexed
        packets over the channels, the last one empty."""
        assert self.src_data_fd is not None
        await self._send(Marker.END)
        mf.start()
        try:
            async for chunk in self._read_chunks():
                await mf.send(chunk)
                self._stop_copy_read(len(chunk))
                self.check_loader()
            await mf.send(b"", last=True)
            await mf.finish()
            await self.loaded()
        finally:
            await mf.stop()

    # --- the destination, as the source sees it ---------------------------------------

    def check_loader(self) -> None:
        """Raise what the destination failed with, if it did."""
        self.link.check()

    async def loaded(self) -> None:
        await self.link.written()

    # --- cleanup -----------------------------------------------------------------------

    async def _close_src_data_fd(self) -> None:
        call, self._stop_copy_reads = self._stop_copy_reads, None
        if call is not None:
            await _end_unused(call)
        fd, self.src_data_fd = self.src_data_fd, None
        if fd is not None:
            with contextlib.suppress(VfioClientError):  # EBADF: the session ended
                await self.src.close(fd)

    async def close_data_fds(self) -> None:
        await self._close_src_data_fd()

    async def abort(self) -> None:
        """Migration failed: the data fd closed (nothing more moves on it),
        the source back to RUNNING."""
        await self._close_src_data_fd()
        self.in_precopy = False
        if self.src_state != S.RUNNING:
            try:
                await self.set_source(S.RUNNING, None)
            except (MigrationError, VfioClientError) as e:
                log.error("%s: source recovery failed: %s", self.name, e)


async def _end_unused(call: ReadIntoCall) -> None:
    """A ReadIntoStream that read nothing, ended as the driver ends one: no
    more requests, then its status OK (a cancelled one leaks two small
    native blocks in the driver's grpc.aio, grpc/grpc#43360); cancelled if
    it cannot end so within a second (the driver gone, the call broken)."""
    try:
        await asyncio.wait_for(call.finish(), 1.0)
    except Exception:  # any way it fails to end: cancelled
        call.cancel()
