"""A small fake variant driver for the VFIO core tests, and call helpers.

FakeDriver runs the same arc loop as mlx5vf/mtty (vfio_mig_step_loop), records
every arc it is handed, can fail chosen arcs, returns a FakeFile on the arcs that
open a data session, and records its DMA-logging and feature calls.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest

from driver.vfio.device import VfioDevice
from driver.vfio.errors import VfioError
from driver.vfio.migration import vfio_mig_step_loop
from driver.vfio.ops import (
    IovaBitmap,
    MigrationFile,
    UserBuffer,
    VfioLogOps,
    VfioMigrationOps,
)
from driver.vfio.precopy import vfio_check_precopy_ioctl
from driver.vfio.uapi import (
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    Feature,
    MigState,
)
from driver.vfio.usermem import UserMemory
from grpcsvc.errnames import errno_name

S = MigState
GET = VFIO_DEVICE_FEATURE_GET
SET = VFIO_DEVICE_FEATURE_SET
PROBE = VFIO_DEVICE_FEATURE_PROBE
SC = VFIO_MIGRATION_STOP_COPY
P2P = VFIO_MIGRATION_P2P
PRE = VFIO_MIGRATION_PRE_COPY
ALL_FLAGS = SC | P2P | PRE
GET_STATE = Feature.MIG_DEVICE_STATE | GET
SET_STATE = Feature.MIG_DEVICE_STATE | SET
COMBOS = {"SC": SC, "SC+P2P": SC | P2P, "SC+PRE": SC | PRE, "SC+P2P+PRE": SC | P2P | PRE}

# Arcs that return a new data file (reference §1.4).
FILE_ARCS = frozenset(
    {(S.RUNNING, S.PRE_COPY), (S.RUNNING_P2P, S.PRE_COPY_P2P), (S.STOP, S.STOP_COPY),
     (S.STOP, S.RESUMING)}
)  # fmt: skip


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from a synchronous (hypothesis) test."""
    return asyncio.run(coro)


@contextmanager
def raises_errno(code: int) -> Iterator[pytest.ExceptionInfo[VfioError]]:
    """The call fails with exactly this errno (a VfioError)."""
    with pytest.raises(VfioError) as info:
        yield info
    got = info.value.errno or 0
    assert got == code, f"expected {errno_name(code)}, got {errno_name(got)}: {info.value}"


class FakeFile:
    """A migration data file that only knows whether it was released."""

    def __init__(self, device: VfioDevice | None, arc: tuple[MigState, MigState]) -> None:
        self.device = device
        self.arc = arc
        self.released = False

    async def read(self, count: int, *, nonblock: bool = False) -> bytes:
        return b""

    async def readinto(self, dest: UserBuffer, *, nonblock: bool = False) -> int:
        return 0

    async def write(self, data: bytes | memoryview) -> int:
        return len(data)

    async def ioctl(self, cmd: int, arg: bytes) -> bytes:
        assert self.device is not None
        return vfio_check_precopy_ioctl(self.device, cmd, arg).pack()

    async def release(self) -> None:
        self.released = True


class FakeDriver:
    """Implements ops.VfioDeviceDriver, VfioMigrationOps and VfioLogOps."""

    def __init__(
        self, migration_flags: int = ALL_FLAGS, *, migration: bool = True, logging: bool = True
    ) -> None:
        self.migration_flags = migration_flags
        self.mig_ops: VfioMigrationOps | None = self if migration else None
        self.log_ops: VfioLogOps | None = self if logging else None
        self.device: VfioDevice | None = None
        self.state = S.RUNNING
        self.arcs: list[tuple[MigState, MigState]] = []
        self.fail_arcs: dict[tuple[MigState, MigState], int] = {}
        self.file_arcs: set[tuple[MigState, MigState]] = set(FILE_ARCS)
        self.files: list[FakeFile] = []
        self.calls: list[tuple[Any, ...]] = []
        self.errors: dict[str, VfioError] = {}  # method name -> error it raises
        self.data_size = 0x1234_5678
        self.log_page_size: int | None = None  # what log_start answers (None: as asked)
        self.dirty: list[tuple[int, int]] = []  # what log_read_and_clear marks
        self.feature_reply = b""
        self.on_close: Callable[[], None] | None = None

    def _maybe_fail(self, name: str) -> None:
        if name in self.errors:
            raise self.errors[name]

    # -- vfio_device_ops ---------------------------------------------------------

    async def open_device(self) -> None:
        self.calls.append(("open_device",))
        self._maybe_fail("open_device")
        self.state = S.RUNNING

    async def close_device(self) -> None:
        self.calls.append(("close_device",))
        if self.on_close is not None:
            self.on_close()

    async def reset(self) -> None:
        self.calls.append(("reset",))
        self.state = S.RUNNING

    async def device_feature(self, flags: int, data: bytes, argsz: int) -> bytes:
        self.calls.append(("device_feature", flags, data, argsz))
        self._maybe_fail("device_feature")
        if not self.feature_reply:
            raise VfioError(errno.ENOTTY, "fake: unknown feature")
        return self.feature_reply

    # -- vfio_migration_ops ------------------------------------------------------

    async def migration_set_state(self, new_state: MigState) -> MigrationFile | None:
        self.calls.append(("migration_set_state", new_state))
        try:
            self.state, file = await vfio_mig_step_loop(
                self.state, new_state, self.migration_flags, self._step, self
            )
        except VfioError as err:
            assert err.last_state is not None
            self.state = err.last_state
            raise
        return file

    # ArcHooks: the state is recorded arc by arc, as mlx5vf records mig_state.

    def arc_starting(self, cur: MigState, nxt: MigState) -> None:
        pass

    def arc_ended(self, cur: MigState, nxt: MigState, file: MigrationFile | None) -> None:
        pass

    def arc_done(self, cur: MigState, nxt: MigState, file: MigrationFile | None) -> None:
        self.state = nxt

    async def _step(self, nxt: MigState) -> MigrationFile | None:
        arc = (self.state, nxt)
        self.arcs.append(arc)
        if arc in self.fail_arcs:
            raise VfioError(self.fail_arcs[arc], f"fake: arc {arc} fails")
        if arc in self.file_arcs:
            file = FakeFile(self.device, arc)
            self.files.append(file)
            return file
        return None

    async def migration_get_state(self) -> MigState:
        self.calls.append(("migration_get_state",))
        self._maybe_fail("migration_get_state")
        return self.state

    async def migration_get_data_size(self) -> int:
        self.calls.append(("migration_get_data_size",))
        self._maybe_fail("migration_get_data_size")
        return self.data_size

    # -- vfio_log_ops ------------------------------------------------------------

    async def log_start(self, ranges: list[tuple[int, int]], page_size: int) -> int:
        self.calls.append(("log_start", list(ranges), page_size))
        self._maybe_fail("log_start")
        return page_size if self.log_page_size is None else self.log_page_size

    async def log_stop(self) -> None:
        self.calls.append(("log_stop",))
        self._maybe_fail("log_stop")

    async def log_read_and_clear(self, iova: int, length: int, bitmap: IovaBitmap) -> None:
        self.calls.append(("log_read_and_clear", iova, length))
        self._maybe_fail("log_read_and_clear")
        for addr, n in self.dirty:
            bitmap.set(addr, n)

    def called(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]


class FdTable:
    """install_fd: hands out fd numbers from `first`, or fails with `error`."""

    def __init__(self, error: int | None = None, *, first: int = 3) -> None:
        self.error = error
        self.files: dict[int, MigrationFile] = {}
        self._next = first

    def __call__(self, file: MigrationFile) -> int:
        if self.error is not None:
            raise VfioError(self.error, "fake: no fd")
        fd = self._next
        self._next += 1
        self.files[fd] = file
        return fd


async def open_device(driver: FakeDriver, name: str = "vf0") -> VfioDevice:
    device = VfioDevice(name, driver)
    driver.device = device
    await device.open()
    return device


async def feature(
    device: VfioDevice,
    flags: int,
    data: bytes | bytearray = b"",
    *,
    argsz: int | None = None,
    user: UserMemory | None = None,
    fds: FdTable | None = None,
) -> bytes:
    """VFIO_DEVICE_FEATURE; argsz defaults to the header plus the data given."""
    return await device.device_feature(
        8 + len(data) if argsz is None else argsz,
        flags,
        data,
        user=UserMemory() if user is None else user,
        install_fd=FdTable() if fds is None else fds,
    )
