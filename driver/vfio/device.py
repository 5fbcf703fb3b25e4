"""struct vfio_device: open/close bookkeeping and the VFIO_DEVICE_FEATURE ioctl
of the VFIO core (drivers/vfio/vfio_main.c), in front of a variant driver."""

from __future__ import annotations

import errno
from collections.abc import Callable

from . import dma_logging
from .errors import VfioError
from .feature import vfio_check_feature
from .group import VfioGroup
from .ops import MigrationFile, VfioDeviceDriver, VfioMigrationOps
from .uapi import (
    FEATURE_HEADER,
    MIG_DATA_SIZE,
    MIG_STATE,
    MIGRATION,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_STATE_NR,
    VFIO_MIGRATION_PRE_COPY,
    Feature,
    MigState,
)
from .usermem import UserArg, UserMemory

_KNOWN_FLAGS = (
    VFIO_DEVICE_FEATURE_MASK
    | VFIO_DEVICE_FEATURE_GET
    | VFIO_DEVICE_FEATURE_SET
    | VFIO_DEVICE_FEATURE_PROBE
)

InstallFd = Callable[[MigrationFile], int]


class VfioDevice:
    """One VFIO device as the core sees it, bound to its variant driver.

    Ioctls need an open device (the kernel has them on a device fd): on a
    device nobody opened they fail with -EBADF.
    """

    def __init__(self, name: str, driver: VfioDeviceDriver) -> None:
        self.name = name
        self.driver = driver
        self.group = VfioGroup(name)  # struct vfio_device.group: who has it open
        self.open_count = 0
        # Set by VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2; device-wide, cleared
        # only at the last close.
        self.precopy_info_v2 = False

    def __repr__(self) -> str:
        return f"VfioDevice({self.name!r}, open_count={self.open_count})"

    # -- open / close (vfio_df_open / vfio_df_close) -------------------------

    async def open(self) -> None:
        """The first open calls the driver's open_device; if that fails the
        device stays closed."""
        self.open_count += 1
        if self.open_count == 1:
            try:
                await self.driver.open_device()
            except BaseException:
                self.open_count -= 1
                raise

    async def close(self) -> None:
        """The last close calls close_device and then forgets the PRECOPY_INFOv2
        opt-in (vfio_df_device_last_close)."""
        if self.open_count == 0:
            raise VfioError(errno.EBADF, f"{self.name} is not open")
        try:
            if self.open_count == 1:
                try:
                    await self.driver.close_device()
                finally:
                    self.precopy_info_v2 = False
        finally:
            self.open_count -= 1

    def _require_open(self) -> None:
        if self.open_count == 0:
            raise VfioError(errno.EBADF, f"{self.name} is not open")

    # -- VFIO_DEVICE_RESET -------------------------------------------------------

    async def reset(self) -> None:
        self._require_open()
        await self.driver.reset()

    # -- VFIO_DEVICE_FEATURE (vfio_ioctl_device_feature) ------------------------

    async def device_feature(
        self,
        argsz: int,
        flags: int,
        data: bytes | bytearray,
        *,
        user: UserMemory,
        install_fd: InstallFd,
    ) -> bytes:
        """The VFIO_DEVICE_FEATURE ioctl with header {argsz, flags}.

        `data` is what the caller has at arg->data, however long (reading past
        it faults: -EFAULT); pointers inside it refer to `user`.  Returns what
        arg->data holds afterwards, same length.  A bytearray is changed in
        place, so the caller also sees what was written when the ioctl fails
        (MIG_DEVICE_STATE SET copies data_fd = -1 back before returning the
        driver's error).  `install_fd` turns a new migration data file into an
        fd number for the caller.
        """
        self._require_open()
        arg = UserArg(data)
        if argsz < FEATURE_HEADER.size:
            raise VfioError(errno.EINVAL, f"argsz {argsz} < {FEATURE_HEADER.size}")
        if flags & ~_KNOWN_FLAGS:
            raise VfioError(errno.EINVAL, f"unknown flags {flags & ~_KNOWN_FLAGS:#x}")
        if (
            not flags & VFIO_DEVICE_FEATURE_PROBE
            and flags & VFIO_DEVICE_FEATURE_SET
            and flags & VFIO_DEVICE_FEATURE_GET
        ):
            raise VfioError(errno.EINVAL, "GET and SET together need PROBE")

        size = argsz - FEATURE_HEADER.size  # what the handlers call argsz
        log_ops = self.driver.log_ops
        match flags & VFIO_DEVICE_FEATURE_MASK:
            case Feature.MIGRATION:
                await self._feature_migration(flags, arg, size)
            case Feature.MIG_DEVICE_STATE:
                await self._feature_mig_device_state(flags, arg, size, install_fd)
            case Feature.DMA_LOGGING_START:
                await dma_logging.logging_start(log_ops, flags, arg, size, user)
            case Feature.DMA_LOGGING_STOP:
                await dma_logging.logging_stop(log_ops, flags, size)
            case Feature.DMA_LOGGING_REPORT:
                await dma_logging.logging_report(log_ops, flags, arg, size, user)
            case Feature.MIG_DATA_SIZE:
                await self._feature_mig_data_size(flags, arg, size)
            case Feature.MIG_PRECOPY_INFOv2:
                self._feature_mig_precopy_info_v2(flags, size)
            case _:
                out = await self.driver.device_feature(flags, arg.data, size)
                arg.copy_to(0, out)
        return arg.data

    def _mig_ops(self) -> VfioMigrationOps:
        mig_ops = self.driver.mig_ops
        if mig_ops is None:
            raise VfioError(errno.ENOTTY, f"{self.name} does not support migration")
        return mig_ops

    async def _feature_migration(self, flags: int, arg: UserArg, argsz: int) -> None:
        """MIGRATION (GET): the device's migration_flags."""
        self._mig_ops()
        if not vfio_check_feature(flags, argsz, VFIO_DEVICE_FEATURE_GET, MIGRATION.size):
            return
        arg.copy_to(0, MIGRATION.pack(self.driver.migration_flags))

    async def _feature_mig_device_state(
        self, flags: int, arg: UserArg, argsz: int, install_fd: InstallFd
    ) -> None:
        """MIG_DEVICE_STATE (GET, SET): {u32 device_state; s32 data_fd}."""
        mig_ops = self._mig_ops()
        supported = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET
        if not vfio_check_feature(flags, argsz, supported, MIG_STATE.size):
            return
        device_state, _ = MIG_STATE.unpack(arg.copy_from(0, MIG_STATE.size))

        if flags & VFIO_DEVICE_FEATURE_GET:
            state = await mig_ops.migration_get_state()
            arg.copy_to(0, MIG_STATE.pack(state, -1))
            return

        file: MigrationFile | None = None
        error: VfioError | None = None
        try:
            # Every driver's loop answers a target >= VFIO_DEVICE_STATE_NR with
            # vfio_mig_get_next_state's -EINVAL; answering it here keeps the
            # driver's migration_set_state typed on MigState.
            if device_state >= VFIO_DEVICE_STATE_NR:
                raise VfioError(errno.EINVAL, f"device_state {device_state} out of range")
            file = await mig_ops.migration_set_state(MigState(device_state))
        except VfioError as err:
            error = err

        if file is not None:
            # vfio_ioct_mig_return_fd: if no fd can be had, the core drops the
            # file reference it was handed and copies nothing back.  (The copy
            # back cannot fault here: the same 8 bytes were just read.)
            try:
                fd = install_fd(file)
            except BaseException:
                await file.release()
                raise
            arg.copy_to(0, MIG_STATE.pack(device_state, fd))
            return
        arg.copy_to(0, MIG_STATE.pack(device_state, -1))
        if error is not None:
            raise error

    async def _feature_mig_data_size(self, flags: int, arg: UserArg, argsz: int) -> None:
        """MIG_DATA_SIZE (GET): the driver's estimate of the STOP_COPY bytes."""
        mig_ops = self._mig_ops()
        if not vfio_check_feature(flags, argsz, VFIO_DEVICE_FEATURE_GET, MIG_DATA_SIZE.size):
            return
        stop_copy_length = await mig_ops.migration_get_data_size()
        arg.copy_to(0, MIG_DATA_SIZE.pack(stop_copy_length))

    def _feature_mig_precopy_info_v2(self, flags: int, argsz: int) -> None:
        """MIG_PRECOPY_INFOv2 (SET, no data): opt in to flags as an output of
        VFIO_MIG_GET_PRECOPY_INFO.  Needs PRE_COPY, tested before the feature
        check, so even a PROBE fails without it."""
        if not self.driver.migration_flags & VFIO_MIGRATION_PRE_COPY:
            raise VfioError(errno.EINVAL, "device does not support PRE_COPY")
        if not vfio_check_feature(flags, argsz, VFIO_DEVICE_FEATURE_SET, 0):
            return
        self.precopy_info_v2 = True
