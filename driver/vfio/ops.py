"""What a VFIO variant driver gives the VFIO core, as in include/linux/vfio.h:
struct vfio_device_ops, struct vfio_migration_ops, struct vfio_log_ops, and
the file operations of a migration data file (the object behind a data_fd).

Everything is async: the emulation runs on one event loop, and what the kernel
does while sleeping (waiting for a SAVE completion, a blocking read) is an await.
Errors are raised as VfioError(errno).
"""

from __future__ import annotations

from typing import Protocol

from .uapi import MigState


class IovaBitmap(Protocol):
    """The user's dirty bitmap of a DMA_LOGGING_REPORT (struct iova_bitmap):
    drivers only ever set bits, one per page_size page from iova."""

    iova: int
    length: int
    page_size: int

    def set(self, iova: int, length: int) -> None:
        """Mark [iova, iova + length) dirty (rounded out to whole pages)."""
        ...


class UserBuffer(Protocol):
    """The caller's memory a read(2) copies into (its copy_to_user): a
    memoryview, or user memory the driver reaches through a file
    (driver.service.usermap.UserRange).  Assignment may raise VfioError
    (EFAULT)."""

    def __len__(self) -> int: ...

    def __setitem__(self, key: slice, value: memoryview, /) -> None: ...


class MigrationFile(Protocol):
    """A migration data file: the saving or resuming side of a data_fd."""

    async def read(self, count: int, *, nonblock: bool = False) -> bytes:
        """read(2) on the fd: b"" at end of stream; VfioError otherwise."""
        ...

    async def readinto(self, dest: UserBuffer, *, nonblock: bool = False) -> int:
        """read(2) on the fd into the caller's memory: the bytes read, 0 at
        end of stream; the errors of read()."""
        ...

    async def write(self, data: bytes | memoryview) -> int:
        """write(2) on the fd: the number of bytes taken."""
        ...

    async def ioctl(self, cmd: int, arg: bytes) -> bytes:
        """unlocked_ioctl on the fd (VFIO_MIG_GET_PRECOPY_INFO): `arg` is what
        the user's pointer holds (at least what the ioctl copies in); returns
        what the ioctl copies back to it."""
        ...

    async def release(self) -> None:
        """The last reference to the file went away (close of the last fd)."""
        ...


class VfioMigrationOps(Protocol):
    """struct vfio_migration_ops."""

    async def migration_set_state(self, new_state: MigState) -> MigrationFile | None:
        """Move the device to `new_state`, arc by arc (vfio_mig_get_next_state);
        the last arc may produce a data file."""
        ...

    async def migration_get_state(self) -> MigState: ...

    async def migration_get_data_size(self) -> int:
        """Estimated STOP_COPY bytes (VFIO_DEVICE_FEATURE_MIG_DATA_SIZE)."""
        ...


class VfioLogOps(Protocol):
    """struct vfio_log_ops (device DMA dirty tracking)."""

    async def log_start(self, ranges: list[tuple[int, int]], page_size: int) -> int:
        """Start tracking [iova, iova + length) ranges; returns the page size
        the device really tracks at (the core copies it back to the user)."""
        ...

    async def log_stop(self) -> None: ...

    async def log_read_and_clear(self, iova: int, length: int, bitmap: IovaBitmap) -> None: ...


class VfioDeviceDriver(Protocol):
    """A variant driver's device (struct vfio_device_ops plus the migration
    setup it did at probe time: migration_flags, mig_ops, log_ops)."""

    migration_flags: int
    mig_ops: VfioMigrationOps | None
    log_ops: VfioLogOps | None

    async def open_device(self) -> None: ...

    async def close_device(self) -> None: ...

    async def reset(self) -> None:
        """VFIO_DEVICE_RESET: the device runs again (RUNNING), data files end."""
        ...

    async def device_feature(self, flags: int, data: bytes, argsz: int) -> bytes:
        """Feature indexes the core does not handle (vfio_device_ops.device_feature);
        raise VfioError(ENOTTY) for unknown ones."""
        ...
