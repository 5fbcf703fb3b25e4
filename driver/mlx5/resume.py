"""The resuming data file of an mlx5 VF (mlx5vf_resume_fops): write(2)
(mlx5vf_resume_write) parses the stream's records over any write
segmentation and loads each FW_DATA image as soon as it is complete."""

from __future__ import annotations

import enum
import errno
from typing import TYPE_CHECKING

from fwemu.link.ifc import PAGE_SIZE

from ..vfio.errors import VfioError
from .cmd import (
    MAX_LOAD_SIZE,
    MIGRATION_HEADER,
    MLX5_MIGF_HEADER_FLAGS_TAG_OPTIONAL,
    MLX5_MIGF_HEADER_TAG_FW_DATA,
    MLX5_MIGF_HEADER_TAG_STOP_COPY_SIZE,
    SIZEOF_MIGRATION_HEADER,
    STOP_COPY_DATA,
    DataBuffer,
    MigfState,
)
from .migf import Mlx5VfMigrationFile, pages

if TYPE_CHECKING:
    from ..vfio.ops import UserBuffer
    from .main import Mlx5VfDevice


class LoadState(enum.IntEnum):
    """enum mlx5_vf_load_state."""

    READ_HEADER = 0
    PREP_HEADER_DATA = 1
    READ_HEADER_DATA = 2
    PREP_IMAGE = 3
    READ_IMAGE = 4
    LOAD_IMAGE = 5


class ResumeFile(Mlx5VfMigrationFile):
    """A resuming migration file (write-only)."""

    def __init__(self, mvdev: Mlx5VfDevice) -> None:
        super().__init__(mvdev)
        self.load_state = LoadState.READ_HEADER
        self.record_size = 0
        self.record_tag = 0
        self.stop_copy_prep_size = 0
        self.image_alloc = 0  # the image buffer _prep_image sized but did not allocate yet

    async def read(self, count: int, *, nonblock: bool = False) -> bytes:
        raise VfioError(errno.EBADF, "the resuming data fd is write-only")

    async def readinto(self, dest: UserBuffer, *, nonblock: bool = False) -> int:
        raise VfioError(errno.EBADF, "the resuming data fd is write-only")

    async def ioctl(self, cmd: int, arg: bytes) -> bytes:
        raise VfioError(errno.ENOTTY, "the resuming data fd has no ioctls")

    async def write(self, data: bytes | memoryview) -> int:
        """mlx5vf_resume_write(): every byte is taken, or the file ends in ERROR."""
        mvdev = self.mvdev
        src = memoryview(data).cast("B")
        self.io_in_progress += 1
        try:
            async with mvdev.state_mutex, self.lock:
                if self.state == MigfState.ERROR:
                    raise VfioError(errno.ENODEV, "the data stream is in error")
                try:
                    await self._resume_write(src)
                except VfioError:
                    self.state = MigfState.ERROR
                    raise
                mvdev.bytes_written(len(src))
                return len(src)
        finally:
            self.io_in_progress -= 1

    async def _resume_write(self, src: memoryview) -> None:
        """mlx5vf_resume_write()'s loop over load_state."""
        pos = 0
        has_work = False
        while pos < len(src) or has_work:
            has_work = False
            match self.load_state:
                case LoadState.READ_HEADER:
                    taken, has_work = self.resume_read_header(src[pos:])
                    pos += taken
                case LoadState.PREP_HEADER_DATA:
                    self._prep_header_data()
                case LoadState.READ_HEADER_DATA:
                    pos += self.resume_read_header_data(src[pos:])
                case LoadState.PREP_IMAGE:
                    await self._prep_image()
                case LoadState.READ_IMAGE:
                    taken, has_work = await self.resume_read_image(src[pos:])
                    pos += taken
                case LoadState.LOAD_IMAGE:
                    await self._load_image()

    def _append(self, buf: DataBuffer, dest: memoryview, want: int, src: memoryview) -> int:
        """Copy what `src` has of the `want` bytes `buf` gathers (the record
        part being read); the bytes taken."""
        take = min(len(src), want - buf.length)
        if take:
            dest[buf.length : buf.length + take] = src[:take]
        buf.length += take
        self.f_pos += take
        return take

    def resume_read_header(self, src: memoryview) -> tuple[int, bool]:
        """mlx5vf_resume_read_header(): gather a record header; once whole,
        its tag picks what follows.  (bytes taken, has_work)"""
        hdr = self._header_buf()
        assert hdr.local is not None
        taken = self._append(hdr, memoryview(hdr.local), SIZEOF_MIGRATION_HEADER, src)
        if hdr.length < SIZEOF_MIGRATION_HEADER:
            return taken, False
        record_size, flags, tag = MIGRATION_HEADER.unpack_from(hdr.local, 0)
        # The messages name the rule a record broke, never its bytes: the
        # stream may be a file's the client cannot read itself (README).
        if record_size > MAX_LOAD_SIZE:
            raise VfioError(errno.ENOMEM, "a record larger than one LOAD takes (2^32 - 1 bytes)")
        self.record_size, self.record_tag = record_size, tag
        if tag == MLX5_MIGF_HEADER_TAG_FW_DATA:
            self.load_state = LoadState.PREP_IMAGE
        elif tag == MLX5_MIGF_HEADER_TAG_STOP_COPY_SIZE:
            self.load_state = LoadState.PREP_HEADER_DATA
        elif flags & MLX5_MIGF_HEADER_FLAGS_TAG_OPTIONAL:
            self.load_state = LoadState.PREP_HEADER_DATA  # skipped
        else:
            raise VfioError(errno.EOPNOTSUPP, "a mandatory record of an unknown tag")
        self.max_pos += SIZEOF_MIGRATION_HEADER
        hdr.length = 0
        return taken, True

    def _prep_header_data(self) -> None:
        """MLX5_VF_LOAD_STATE_PREP_HEADER_DATA.  mlx5vf grows the header
        buffer to record_size; here it stays one page, on purpose: only a
        STOP_COPY_SIZE record's first 8 bytes are ever read, so a record
        declaring gigabytes costs no memory (its payload is skipped)."""
        hdr = self._header_buf()
        hdr.start_pos = self.max_pos
        hdr.length = 0
        self.load_state = LoadState.READ_HEADER_DATA

    def resume_read_header_data(self, src: memoryview) -> int:
        """mlx5vf_resume_read_header_data(): gather a non-image record's
        payload; of the STOP_COPY_SIZE record keep the size.  The bytes taken."""
        hdr = self._header_buf()
        assert hdr.local is not None
        take = min(len(src), self.record_size - hdr.length)
        keep = max(0, min(take, len(hdr.local) - hdr.length))  # the first page is kept
        if keep:
            hdr.local[hdr.length : hdr.length + keep] = src[:keep]
        hdr.length += take
        self.f_pos += take
        if hdr.length == self.record_size:
            if self.record_tag == MLX5_MIGF_HEADER_TAG_STOP_COPY_SIZE:
                # As mlx5vf: the le64 is read from the buffer's page even if
                # the record is shorter; it only pre-sizes the image buffer.
                (size,) = STOP_COPY_DATA.unpack_from(hdr.local, 0)
                self.stop_copy_prep_size = min(size, MAX_LOAD_SIZE)
            self.load_state = LoadState.READ_HEADER
            self.max_pos += self.record_size
            hdr.length = 0
        return take

    async def _prep_image(self) -> None:
        """MLX5_VF_LOAD_STATE_PREP_IMAGE: a data buffer that holds the image
        (or the size STOP_COPY_SIZE announced, if larger).  Its size is
        checked against the client's buffer budget here (ENOMEM, as the
        kernel's allocation under pressure); the buffer itself is allocated
        when the image's first byte arrives, so a header alone costs nothing."""
        size = pages(max(self.record_size, self.stop_copy_prep_size))
        data = self.buf[0]
        if data is None or data.npages * PAGE_SIZE < size:
            freed = data.allocated_length if data is not None and data.charged else 0
            self.mvdev.budget.check(self.owner, size, freed=freed)
            if data is not None:
                self.buf[0] = None
                await self.free_data_buffer(data)
            self.image_alloc = size
            if size == 0:
                # Nothing to defer: the zero-length buffer LOAD refuses (EINVAL).
                self.buf[0] = await self.alloc_data_buffer(0)
        self.load_state = LoadState.READ_IMAGE
        if self.buf[0] is not None:
            self._start_image(self.buf[0])

    def _start_image(self, data: DataBuffer) -> None:
        data.start_pos = self.max_pos
        data.length = 0

    async def _image_buf(self) -> DataBuffer:
        """The image buffer, allocated now if _prep_image deferred it."""
        data = self.buf[0]
        if data is None:
            data = await self.alloc_data_buffer(self.image_alloc)
            self.buf[0] = data
            self._start_image(data)
        return data

    async def resume_read_image(self, src: memoryview) -> tuple[int, bool]:
        """mlx5vf_resume_read_image(): gather the image.  (bytes taken, has_work)"""
        if not src and self.record_size:
            return 0, False  # no image byte yet: nothing to allocate for
        data = await self._image_buf()
        taken = self._append(data, data.view, self.record_size, src)
        if data.length < self.record_size:
            return taken, False
        self.load_state = LoadState.LOAD_IMAGE
        self.max_pos += self.record_size
        return taken, True

    async def _load_image(self) -> None:
        """MLX5_VF_LOAD_STATE_LOAD_IMAGE: LOAD_VHCA_STATE, then the buffers
        serve the next record."""
        data = self.buf[0]
        assert data is not None
        await self.mvdev.cmds.load_vhca_state(data)
        self.mvdev.image_loaded(data.length)
        self.load_state = LoadState.READ_HEADER
        self._header_buf().length = 0
        data.length = 0

    def _header_buf(self) -> DataBuffer:
        hdr = self.buf_header[0]
        if hdr is None:
            hdr = self.buf_header[0] = DataBuffer(
                PAGE_SIZE, is_header=True, local=bytearray(PAGE_SIZE)
            )
        return hdr
