"""struct mlx5_vf_migration_file: what the saving and the resuming data files
of an mlx5 VF share (drivers/vfio/pci/mlx5/main.c and cmd.c): the stream
position, the state, the wait queue, the data buffers, and release.  The two
kinds, as mlx5vf_save_fops and mlx5vf_resume_fops: driver/mlx5/save.py and
driver/mlx5/resume.py."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from fwemu.link.base import LinkError
from fwemu.link.ifc import PAGE_SIZE

from ..events import caller
from ..vfio.errors import VfioError
from .cmd import MAX_NUM_CHUNKS, SIZEOF_MIGRATION_HEADER, DataBuffer, MigfState, link_errno

if TYPE_CHECKING:
    from .main import Mlx5VfDevice


def pages(length: int) -> int:
    """`length` rounded up to whole firmware pages."""
    return -(-length // PAGE_SIZE) * PAGE_SIZE


class Mlx5VfMigrationFile:
    """The common part of a saving or resuming migration file."""

    def __init__(self, mvdev: Mlx5VfDevice) -> None:
        self.mvdev = mvdev
        self.stream_id = mvdev.new_stream_id()  # names the stream in events and the audit
        # The client whose call made the file (of its principal): its buffers
        # count on its BufferBudget.
        self.owner = caller()
        self.io_in_progress = 0  # reads and writes in the file now
        self.state = MigfState.NONE
        self.f_pos = 0
        self.max_pos = 0
        self.lock = asyncio.Lock()  # migf->lock
        self._waiters: list[asyncio.Future[None]] = []  # migf->poll_wait
        self.buf_list: deque[DataBuffer] = deque()
        self.avail_list: list[DataBuffer] = []
        self.buf: list[DataBuffer | None] = [None] * MAX_NUM_CHUNKS
        self.buf_header: list[DataBuffer | None] = [None] * MAX_NUM_CHUNKS
        self.released = False

    # --- wait queue ----------------------------------------------------------------

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def wait_event(self, condition: Callable[[], bool]) -> None:
        while not condition():
            w = asyncio.get_running_loop().create_future()
            self._waiters.append(w)
            await w

    def mark_err(self) -> None:
        """mlx5vf_mark_err()."""
        self.state = MigfState.ERROR
        self.wake()

    # --- buffers ---------------------------------------------------------------------

    async def get_data_buffer(self, length: int) -> DataBuffer:
        """mlx5vf_get_data_buffer(): reuse a free buffer that is large enough
        (smaller ones met on the way are freed), else allocate."""
        length = pages(length)
        found = None
        for b in list(self.avail_list):
            if b.is_header:
                continue
            self.avail_list.remove(b)
            if b.allocated_length >= length:
                found = b
                break
            await self.free_data_buffer(b)
        if found is not None:
            return found
        return await self.alloc_data_buffer(length)

    async def alloc_data_buffer(self, length: int) -> DataBuffer:
        """mlx5vf_alloc_data_buffer()."""
        if self.mvdev.mdev_detach:
            raise VfioError(errno.ENOTCONN, "the VF is detached")
        if length == 0:
            return DataBuffer(0)
        budget = self.mvdev.budget
        budget.charge(self.owner, length)  # ENOMEM past the client's budget
        try:
            host = await self.mvdev.link.alloc_buffer(length)
        except LinkError as e:
            budget.release(self.owner, length)
            raise link_errno(e) from None
        except (OSError, MemoryError) as e:
            budget.release(self.owner, length)
            # No length: on the resuming side the stream declared it (README, errno).
            raise VfioError(errno.ENOMEM, f"cannot allocate a data buffer: {e}") from None
        return DataBuffer(length, host=host, charged=True)

    def get_header_buffer(self, length: int = SIZEOF_MIGRATION_HEADER) -> DataBuffer:
        """A header buffer (dma_dir DMA_NONE): a free one that fits, else a new one."""
        for b in self.avail_list:
            if b.is_header and b.allocated_length >= length:
                self.avail_list.remove(b)
                return b
        return DataBuffer(length, is_header=True, local=bytearray(length))

    def put_data_buffer(self, buf: DataBuffer) -> None:
        """mlx5vf_put_data_buffer(): back to the free list."""
        buf.stop_copy_chunk_num = 0
        buf.pre_copy_init_bytes_chunk = False
        if buf in self.buf_list:
            self.buf_list.remove(buf)
        self.avail_list.append(buf)

    async def free_data_buffer(self, buf: DataBuffer) -> None:
        """mlx5vf_free_data_buffer()."""
        if buf.charged:
            buf.charged = False
            self.mvdev.budget.release(self.owner, buf.allocated_length)
        if buf.host is not None:
            # If the firmware went away, its side of the buffer is gone too.
            with contextlib.suppress(LinkError):
                await self.mvdev.link.free_buffer(buf.host)

    async def clean_resources(self) -> None:
        """mlx5fv_cmd_clean_migf_resources(): free every buffer."""
        bufs = [b for b in (*self.buf, *self.buf_header) if b is not None]
        bufs += list(self.buf_list) + self.avail_list
        self.buf = [None] * MAX_NUM_CHUNKS
        self.buf_header = [None] * MAX_NUM_CHUNKS
        self.buf_list.clear()
        self.avail_list = []
        for b in bufs:
            await self.free_data_buffer(b)

    # --- the end of the file ---------------------------------------------------------

    async def disable_fd(self) -> None:
        """mlx5vf_disable_fd(): the file ends in ERROR at position 0 and its
        buffers are freed (the driver already dropped it)."""
        self.state = MigfState.ERROR
        self.f_pos = 0
        self.wake()
        await self.clean_resources()

    async def release(self) -> None:
        """The user's fd was closed.  The driver holds its own reference while
        the file is its saving or resuming file (mlx5vf get_file()s it), so
        mlx5vf_release_file() runs only once disable_fds dropped that one."""
        if self.mvdev.saving_migf is self or self.mvdev.resuming_migf is self:
            return
        self.released = True
        self.state = MigfState.ERROR
        self.f_pos = 0
        self.wake()
