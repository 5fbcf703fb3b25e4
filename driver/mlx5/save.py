"""The saving data file of an mlx5 VF (mlx5vf_save_fops): the stop-copy
buffers and STOP_COPY_SIZE record (mlx5vf_prep_stop_copy), the SAVE completion
(mlx5vf_save_callback) with chunked stop-copy, read(2) (mlx5vf_save_read) and
VFIO_MIG_GET_PRECOPY_INFO (mlx5vf_precopy_ioctl)."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from fwemu.hostmem import release_pages
from fwemu.link.base import LinkError
from fwemu.link.ifc import PAGE_SIZE, CmdStatus, QueryVhcaMigState, SaveCompletion

from ..vfio.errors import VfioError
from ..vfio.precopy import vfio_check_precopy_ioctl
from ..vfio.uapi import VFIO_PRECOPY_INFO_REINIT
from ..vfio.uapi import MigState as VfioState
from .cmd import (
    MAX_NUM_CHUNKS,
    MAX_SAVE_SIZE,
    MIGRATION_HEADER,
    MLX5_MIGF_HEADER_FLAGS_TAG_OPTIONAL,
    MLX5_MIGF_HEADER_TAG_FW_DATA,
    MLX5_MIGF_HEADER_TAG_STOP_COPY_SIZE,
    MLX5VF_QUERY_INC,
    SIZEOF_MIGRATION_HEADER,
    STOP_COPY_DATA,
    DataBuffer,
    MigfState,
)
from .migf import Mlx5VfMigrationFile, pages

if TYPE_CHECKING:
    from ..vfio.ops import UserBuffer
    from .main import Mlx5VfDevice


class SaveFile(Mlx5VfMigrationFile):
    """A saving migration file (read-only)."""

    def __init__(self, mvdev: Mlx5VfDevice) -> None:
        super().__init__(mvdev)
        self.eof_returned = False  # a read returned 0: the end of a STOP_COPY stream
        self.save_comp = asyncio.Semaphore(1)  # the binary semaphore around SAVE
        self.inflight_save = False
        self.pre_copy_initial_bytes = 0
        self.pre_copy_initial_bytes_start = 0
        self.num_ready_chunks = 0
        self.next_required_umem_size = 0
        # When a QUERY first reported migration_state INIT (time.monotonic),
        # until the precopy answer that follows (vfio_reinit_detection_seconds).
        self.init_reported_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- preparation -----------------------------------------------------------------

    async def prep_stop_copy(self, state_size: int, full_size: int, track: bool) -> None:
        """mlx5vf_prep_stop_copy(): the stop-copy buffers, and the STOP_COPY_SIZE
        record that starts every saving stream."""
        mvdev = self.mvdev
        if mvdev.caps.chunk_mode:
            chunk = min(mvdev.max_chunk_size, full_size)
            inc_state_size = max(state_size, chunk)
        elif track:
            inc_state_size = state_size + state_size // 10  # stop-copy may grow 10%
        else:
            inc_state_size = state_size
        inc_state_size = min(inc_state_size, MAX_SAVE_SIZE)
        num_chunks = MAX_NUM_CHUNKS if mvdev.caps.chunk_mode else 1
        for i in range(num_chunks):
            self.buf[i] = await self.get_data_buffer(inc_state_size)
            self.buf_header[i] = self.get_header_buffer()
            if mvdev.caps.chunk_mode:
                self.buf[i].stop_copy_chunk_num = i + 1  # type: ignore[union-attr]
                self.buf_header[i].stop_copy_chunk_num = i + 1  # type: ignore[union-attr]
        # mlx5vf_add_stop_copy_header()
        size = SIZEOF_MIGRATION_HEADER + STOP_COPY_DATA.size
        header_buf = self.get_header_buffer(size)
        assert header_buf.local is not None and self.buf[0] is not None
        MIGRATION_HEADER.pack_into(
            header_buf.local,
            0,
            STOP_COPY_DATA.size,
            MLX5_MIGF_HEADER_FLAGS_TAG_OPTIONAL,
            MLX5_MIGF_HEADER_TAG_STOP_COPY_SIZE,
        )
        STOP_COPY_DATA.pack_into(
            header_buf.local, SIZEOF_MIGRATION_HEADER, self.buf[0].npages * PAGE_SIZE
        )
        header_buf.length = size
        header_buf.start_pos = self.max_pos
        self.max_pos += size
        self.buf_list.append(header_buf)
        if track:
            self.pre_copy_initial_bytes = size

    def get_stop_copy_buf(self, index: int, required_length: int) -> DataBuffer | None:
        """mlx5vf_mig_file_get_stop_copy_buf(), first half: the preallocated
        buffer if it fits (None means: allocate a larger one, keeping the
        chunk number)."""
        buf = self.buf[index]
        if buf is None:
            raise VfioError(errno.EINVAL, "stop-copy buffer missing (kernel WARN)")
        self.buf[index] = None
        if buf.npages * PAGE_SIZE >= pages(required_length):
            return buf
        self.put_data_buffer(buf)
        return None

    async def stop_copy_buf(self, index: int, required_length: int) -> DataBuffer:
        current = self.buf[index]
        chunk_num = current.stop_copy_chunk_num if current is not None else 0
        buf = self.get_stop_copy_buf(index, required_length)
        if buf is None:
            buf = await self.get_data_buffer(required_length)
            buf.stop_copy_chunk_num = chunk_num
        return buf

    # --- the SAVE completion ---------------------------------------------------------

    def save_callback(
        self,
        c: SaveCompletion,
        buf: DataBuffer,
        header_buf: DataBuffer,
        stop_copy_chunk: bool,
    ) -> None:
        """mlx5vf_save_callback(): the bookkeeping continues in a task because
        firmware-held memory must be fetched first."""
        self._spawn(self._save_done(c, buf, header_buf, stop_copy_chunk))

    async def _save_done(
        self, c: SaveCompletion, buf: DataBuffer, header_buf: DataBuffer, stop_copy_chunk: bool
    ) -> None:
        try:
            status = c.status
            if status == 0 and buf.host is not None and c.actual_image_size:
                try:
                    await self.mvdev.link.dma_sync_for_cpu(buf.host, 0, c.actual_image_size)
                except LinkError:
                    status = -errno.EIO
            if status == 0 and c.actual_image_size > buf.allocated_length:
                status = -errno.EINVAL  # the firmware wrote past the buffer
            if status == 0:
                self._save_succeeded(c, buf, header_buf, stop_copy_chunk)
            else:
                self._mig_file_cleanup_cb(c, buf, header_buf, stop_copy_chunk, status)
        finally:
            self.inflight_save = False
            self.wake()
            self.save_comp.release()

    def _mig_file_cleanup_cb(
        self,
        c: SaveCompletion,
        buf: DataBuffer,
        header_buf: DataBuffer,
        stop_copy_chunk: bool,
        status: int,
    ) -> None:
        """mlx5vf_mig_file_cleanup_cb(): a failed SAVE gives its buffers back;
        BAD_RES_STATE on a precopy SAVE means the firmware lost tracking:
        PRE_COPY_ERROR, any other failure ERROR."""
        self.put_data_buffer(buf)
        self.put_data_buffer(header_buf)
        if not stop_copy_chunk and status == CmdStatus.BAD_RES_STATE_ERR:
            self.state = MigfState.PRE_COPY_ERROR
        else:
            self.state = MigfState.ERROR
        self.mvdev.save_failed(self, c, status)

    def _save_succeeded(
        self, c: SaveCompletion, buf: DataBuffer, header_buf: DataBuffer, stop_copy_chunk: bool
    ) -> None:
        image_size = c.actual_image_size
        next_required = c.next_required_umem_size if buf.stop_copy_chunk_num else 0
        stop_copy_last_chunk = stop_copy_chunk and not next_required
        initial_pre_copy = self.state != MigfState.PRE_COPY and not stop_copy_chunk
        init_chunk = initial_pre_copy or buf.pre_copy_init_bytes_chunk
        # add_buf_header(): the FW_DATA record header goes first.
        assert header_buf.local is not None
        MIGRATION_HEADER.pack_into(header_buf.local, 0, image_size, 0, MLX5_MIGF_HEADER_TAG_FW_DATA)
        header_buf.length = SIZEOF_MIGRATION_HEADER
        header_buf.start_pos = self.max_pos
        self.max_pos += SIZEOF_MIGRATION_HEADER
        self.buf_list.append(header_buf)
        if init_chunk:
            self.pre_copy_initial_bytes += SIZEOF_MIGRATION_HEADER
        buf.length = image_size
        buf.start_pos = self.max_pos
        self.max_pos += image_size
        self.buf_list.append(buf)
        if buf.stop_copy_chunk_num:
            self.num_ready_chunks += 1
            if next_required and self.num_ready_chunks >= MAX_NUM_CHUNKS:
                # Delay the next SAVE until one chunk was read.
                self.next_required_umem_size = next_required
                next_required = 0
        if init_chunk:
            self.pre_copy_initial_bytes += image_size
            if initial_pre_copy:
                self.state = MigfState.PRE_COPY
            buf.pre_copy_init_bytes_chunk = False
        if stop_copy_last_chunk:
            self.state = MigfState.COMPLETE
        self.mvdev.save_completed(self, c, buf)
        self.wake()
        if next_required:
            self.set_save_work(buf.stop_copy_chunk_num % MAX_NUM_CHUNKS + 1, next_required)

    def set_save_work(self, chunk_num: int, next_required: int) -> None:
        """mlx5vf_mig_file_set_save_work(): the next stop-copy chunk's SAVE runs
        from a worker, under the state mutex."""
        self._spawn(self._save_work(chunk_num, next_required))

    async def _save_work(self, chunk_num: int, next_required: int) -> None:
        mvdev = self.mvdev
        async with mvdev.state_mutex:
            if self.state == MigfState.ERROR or self.released:
                return
            buf = None
            try:
                buf = await self.stop_copy_buf(chunk_num - 1, next_required)
                await mvdev.cmds.save_vhca_state(self, buf, True, False)
            except VfioError:
                if buf is not None:
                    self.put_data_buffer(buf)
                self.mark_err()

    # --- read(2) -----------------------------------------------------------------

    def _get_data_buff_from_pos(self) -> tuple[DataBuffer | None, bool]:
        """mlx5vf_get_data_buff_from_pos(): data comes only from the head buffer."""
        if not self.buf_list:
            return None, True
        buf = self.buf_list[0]
        if buf.start_pos <= self.f_pos < buf.start_pos + buf.length:
            return buf, False
        self.state = MigfState.ERROR  # a stream fd: the data is always in the first buffer
        return None, False

    def _buf_read_done(self, buf: DataBuffer) -> None:
        """mlx5vf_buf_read_done(): recycle a fully read buffer."""
        self.buf_list.remove(buf)
        if buf.stop_copy_chunk_num:
            idx = buf.stop_copy_chunk_num - 1
            if buf.is_header:
                self.buf_header[idx] = buf
                return
            self.buf[idx] = buf
            next_required, self.next_required_umem_size = self.next_required_umem_size, 0
            self.num_ready_chunks -= 1
            if next_required:
                self.set_save_work(buf.stop_copy_chunk_num, next_required)
            return
        self.avail_list.append(buf)

    async def read(self, count: int, *, nonblock: bool = False) -> bytes:
        """mlx5vf_save_read()."""
        data, _ = await self._read_locked(count, nonblock, None)
        return data

    async def readinto(self, dest: UserBuffer, *, nonblock: bool = False) -> int:
        """mlx5vf_save_read() into the caller's memory (its copy_to_user):
        one copy per buffer read, straight into `dest`.  A copy that faults
        (EFAULT) after earlier pieces of the same read went in ends the read
        short: those bytes count, and the position stops where they end.
        On purpose unlike mlx5vf_save_read, which returns -EFAULT with f_pos
        already past the pieces it copied, so the reader loses them (only user
        memory faults here, and losing stream bytes to it helps nobody)."""
        _, done = await self._read_locked(len(dest), nonblock, dest)
        return done

    async def _read_locked(
        self, count: int, nonblock: bool, dest: UserBuffer | None
    ) -> tuple[bytes, int]:
        if self.eof_returned:
            self.mvdev.read_after_eof(self)
        if not nonblock:  # O_NONBLOCK: the caller asked not to wait
            await self.mvdev.precopy_turn()
        self.io_in_progress += 1
        try:
            return await self._read(count, nonblock, dest)
        finally:
            self.io_in_progress -= 1

    async def _read(self, count: int, nonblock: bool, dest: UserBuffer | None) -> tuple[bytes, int]:
        """Up to `count` bytes from the stream head: into `dest` when given
        ((b"", bytes read)), else as bytes ((data, len(data)))."""
        if not nonblock:
            # "and no SAVE in flight" is the REINIT series' (patch 5/6): a reader
            # in PRE_COPY waits for the data of a SAVE already issued instead
            # of getting ENOMSG just before it lands.
            await self.wait_event(
                lambda: (
                    bool(self.buf_list)
                    or self.state in (MigfState.ERROR, MigfState.PRE_COPY_ERROR, MigfState.COMPLETE)
                    or (self.state == MigfState.PRE_COPY and not self.inflight_save)
                )
            )
        async with self.lock:
            if self.state == MigfState.ERROR:
                raise VfioError(errno.ENODEV, "the data stream is in error")
            pieces: list[memoryview] = []  # of what is read, joined in one copy
            spent: list[DataBuffer] = []  # read to their end
            done = 0
            first = True
            while count:
                buf, end_of_data = self._get_data_buff_from_pos()
                if first:
                    first = False
                    if end_of_data and self.state in (
                        MigfState.PRE_COPY,
                        MigfState.PRE_COPY_ERROR,
                    ):
                        self.mvdev.read_enomsg()
                        raise VfioError(errno.ENOMSG, "no precopy data for now")
                    if end_of_data and self.state != MigfState.COMPLETE and nonblock:
                        raise VfioError(errno.EAGAIN, "no data yet")
                if end_of_data:
                    break
                if buf is None:
                    raise VfioError(errno.EINVAL, "read position is not at the stream head")
                off = self.f_pos - buf.start_pos
                n = min(buf.length - off, count)
                if dest is not None:
                    try:
                        dest[done : done + n] = buf.view[off : off + n]
                    except VfioError:
                        if not done:
                            raise
                        break  # a short read: nothing copied is lost
                else:
                    pieces.append(buf.view[off : off + n])
                done += n
                self.f_pos += n
                count -= n
                if self.f_pos >= buf.start_pos + buf.length:
                    self._buf_read_done(buf)
                    spent.append(buf)
            data = b"".join(pieces)  # before a spent buffer's pages go
            for b in spent:
                # Its bytes are read: its pages leave our RSS until the next
                # SAVE into it is read (mapping them again costs little: a
                # read fault maps a run of pages).  The buffer stays, as mlx5vf's.
                if b.host is not None:
                    release_pages(b.host.view)
            if not done and count and self.state == MigfState.COMPLETE:
                self.eof_returned = True
            self.mvdev.bytes_read(done)
            return data, done

    # --- VFIO_MIG_GET_PRECOPY_INFO ------------------------------------------

    async def ioctl(self, cmd: int, arg: bytes) -> bytes:
        """mlx5vf_precopy_ioctl() as merged with the REINIT series."""
        mvdev = self.mvdev
        info = vfio_check_precopy_ioctl(mvdev.core, cmd, arg)
        await mvdev.precopy_turn()
        async with mvdev.state_mutex:
            if mvdev.mig_state not in (VfioState.PRE_COPY, VfioState.PRE_COPY_P2P):
                raise VfioError(errno.EINVAL, "precopy info outside PRE_COPY(_P2P)")
            inc_length = 0
            migration_state = 0
            # A suspended device cannot SAVE: in PRE_COPY_P2P only queued bytes count.
            if mvdev.mig_state == VfioState.PRE_COPY:
                inc_length, _, migration_state = await mvdev.cmds.query_vhca_migration_state(
                    MLX5VF_QUERY_INC
                )
            async with self.lock:
                if self.state == MigfState.ERROR:
                    raise VfioError(errno.ENODEV, "the data stream is in error")
                # The firmware's new initial data (v1 or not) ends at most here.
                fw_init_end = self.max_pos + inc_length + SIZEOF_MIGRATION_HEADER
                # The MIG_PRECOPY_INFOv2 opt-in is the opt-in for REINIT too.
                reinit = (
                    mvdev.core.precopy_info_v2
                    and migration_state == QueryVhcaMigState.OPER_MIGRATION_INIT
                )
                end_of_data = self.max_pos == self.f_pos
                if reinit:
                    # Bytes queued but unread must be read before the new
                    # initial data: they count as initial now.
                    self.pre_copy_initial_bytes_start = self.f_pos
                    self.pre_copy_initial_bytes = self.max_pos - self.f_pos
                    info.initial_bytes = self.pre_copy_initial_bytes + inc_length
                    info.flags |= VFIO_PRECOPY_INFO_REINIT
                elif self.pre_copy_initial_bytes_start + self.pre_copy_initial_bytes > self.f_pos:
                    info.initial_bytes = (
                        self.pre_copy_initial_bytes_start + self.pre_copy_initial_bytes - self.f_pos
                    )
                else:
                    info.dirty_bytes = (self.max_pos - self.f_pos) + inc_length
            if (reinit or end_of_data) and inc_length:
                # Done with what is queued and the device has more (or new
                # initial data): SAVE it now so it is ready to read.
                buf = None
                try:
                    buf = await self.get_data_buffer(inc_length)
                    buf.pre_copy_init_bytes_chunk = reinit
                    await mvdev.cmds.save_vhca_state(self, buf, True, True)
                except VfioError:
                    self.mark_err()
                    if buf is not None:
                        self.put_data_buffer(buf)
                    raise
                # The SAVE adds a record header: count it too.
                if reinit:
                    info.initial_bytes += SIZEOF_MIGRATION_HEADER
                else:
                    info.dirty_bytes += SIZEOF_MIGRATION_HEADER
            mvdev.precopy_answered(
                self,
                info,
                reinit,
                fw_init_end=fw_init_end
                if migration_state == QueryVhcaMigState.OPER_MIGRATION_INIT
                else 0,
            )
        return info.pack()

    # --- write(2) -------------------------------------------------------------------

    async def write(self, data: bytes | memoryview) -> int:
        raise VfioError(errno.EBADF, "the saving data fd is read-only")
