"""Kernel errnos on the wire: a failed Vfio call ends with the gRPC code of
driver/service/errnos.py ERRNO_CODES and an ErrorInfo {reason: errno name,
domain: "vfio.kernel", metadata: {errno: number}} -- for real failures of the
VFIO core, the mlx5vf driver and the firmware under it, in-process and over a
`fwemu serve` process."""

from __future__ import annotations

import errno
from collections.abc import Awaitable

import grpc
import pytest

from driver.mlx5.cmd import MIGRATION_HEADER
from driver.service.errnos import DOMAIN, ERRNO_CODES, errno_name, grpc_code
from driver.vfio.uapi import (
    DMA_LOGGING_CONTROL,
    DMA_LOGGING_RANGE,
    DMA_LOGGING_REPORT,
    FEATURE_HEADER,
    MIG_STATE,
    MIGRATION,
    Feature,
    MigState,
)
from fwemu.link.ifc import CmdStatus, Fault, FaultKind, Opcode, VfCaps, VfConfig
from grpcsvc.errnames import errno_name as kernel_name
from tests.support.driver_service import (
    GET,
    MIG_STATE_ARGSZ,
    SET,
    SMALL_VF,
    DriverUnderTest,
    VfioCallError,
    VfioClient,
)

S = MigState
pytestmark = pytest.mark.grpc


async def fails_with(call: Awaitable[object], code: int) -> VfioCallError:
    """The call fails with errno `code`, carried the documented way."""
    with pytest.raises(VfioCallError) as e:
        await call
    err = e.value
    assert (err.errno, err.info.reason) == (code, kernel_name(code)), err.info
    assert err.code == ERRNO_CODES[code], err.info
    assert err.info.domain == DOMAIN == "vfio.kernel"
    assert err.info.metadata["errno"] == str(code)
    assert err.info.reason in err.info.message  # "[ENOMSG] ..." for people reading logs
    return err


async def test_argsz_below_the_header_is_einval(drv: DriverUnderTest, client: VfioClient) -> None:
    """vfio_ioctl_device_feature: argsz < sizeof(struct vfio_device_feature) -> -EINVAL."""
    _, fd = await drv.open_vf(client)
    await fails_with(client.device_feature(fd, 4, GET | Feature.MIGRATION), errno.EINVAL)
    # A data part shorter than the feature's minsz is EINVAL too (vfio_check_feature).
    await fails_with(
        client.device_feature(fd, FEATURE_HEADER.size + 4, GET | Feature.MIGRATION, bytes(4)),
        errno.EINVAL,
    )


async def test_unknown_feature_is_enotty(drv: DriverUnderTest, client: VfioClient) -> None:
    """A feature index the core does not know goes to the driver's device_feature,
    which mlx5vf answers -ENOTTY."""
    _, fd = await drv.open_vf(client)
    await fails_with(client.device_feature(fd, 16, GET | 13, bytes(8)), errno.ENOTTY)


async def test_migration_features_without_migration_are_enotty(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """MIGRATION / MIG_DEVICE_STATE on a device without mig_ops -> -ENOTTY
    (mlx5vf enables migration only with every capability it needs)."""
    (vf,) = await drv.create_vfs(caps=VfCaps(migration_tracking_state=False))
    assert not (await client.device_info(vf.name)).migratable
    fd = await client.open_device(vf.name)
    await fails_with(client.device_feature(fd, 16, GET | Feature.MIGRATION, bytes(8)), errno.ENOTTY)
    await fails_with(client.set_state(fd, S.STOP), errno.ENOTTY)


async def test_short_argument_memory_is_efault(drv: DriverUnderTest, client: VfioClient) -> None:
    """argsz promises 8 data bytes the caller does not have: copy_from_user faults."""
    _, fd = await drv.open_vf(client)
    flags = SET | Feature.MIG_DEVICE_STATE
    await fails_with(client.device_feature(fd, MIG_STATE_ARGSZ, flags, bytes(4)), errno.EFAULT)


async def test_read_at_the_temporary_end_of_precopy_is_enomsg(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """PRE_COPY with nothing left to read: read() fails with ENOMSG (a temporary
    end of stream; OUT_OF_RANGE), never returns 0."""
    _, fd = await drv.open_vf(client)
    dfd = await client.set_state(fd, S.PRE_COPY)
    initial = (await client.precopy_info(dfd)).initial_bytes
    assert len(await client.read(dfd, initial)) == initial
    await fails_with(client.read(dfd, 1 << 20), errno.ENOMSG)


async def test_unknown_fd_is_ebadf(drv: DriverUnderTest, client: VfioClient) -> None:
    """close(2), ioctl(2), read(2) of an fd that is not open: EBADF (NOT_FOUND)."""
    await fails_with(client.close(77), errno.EBADF)
    await fails_with(client.device_feature(77, 16, GET | Feature.MIGRATION, bytes(8)), errno.EBADF)
    await fails_with(client.read(77, 10), errno.EBADF)
    await fails_with(client.write(77, [b"x"]), errno.EBADF)
    await fails_with(client.precopy_info(77), errno.EBADF)
    await fails_with(client.reset(77), errno.EBADF)


async def test_unknown_device_is_enoent(drv: DriverUnderTest, client: VfioClient) -> None:
    """Opening a device node that does not exist: ENOENT (NOT_FOUND)."""
    await fails_with(client.open_device("0000:99:00.7"), errno.ENOENT)


async def test_unknown_mandatory_record_is_eopnotsupp_then_the_file_is_enodev(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """mlx5vf_resume_write: an unknown tag without TAG_OPTIONAL -> -EOPNOTSUPP;
    the error latches the file in ERROR, so the next write is -ENODEV."""
    _, fd = await drv.open_vf(client)
    await client.set_state(fd, S.STOP)
    dfd = await client.set_state(fd, S.RESUMING)
    record = MIGRATION_HEADER.pack(0, 0, 0x80)  # tag 0x80, mandatory
    await fails_with(client.write(dfd, [record]), errno.EOPNOTSUPP)
    await fails_with(client.write(dfd, [MIGRATION_HEADER.pack(8, 1, 1)]), errno.ENODEV)


async def test_reads_of_a_file_whose_device_was_closed_are_enodev(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """Closing the device fd is its last close: close_device disables the data
    files, whose reads then fail with -ENODEV (FAILED_PRECONDITION)."""
    _, fd = await drv.open_vf(client)
    dfd = await client.set_state(fd, S.PRE_COPY)
    await client.close(fd)
    await fails_with(client.read(dfd, 100), errno.ENODEV)
    await fails_with(client.precopy_info(dfd), errno.ENODEV)


async def test_unsupported_state_target_is_einval(drv: DriverUnderTest, client: VfioClient) -> None:
    """vfio_mig_get_next_state: STOP_COPY -> PRE_COPY has no path: -EINVAL, and
    ERROR is never a valid target."""
    _, fd = await drv.open_vf(client)
    await client.set_state(fd, S.STOP)
    await client.set_state(fd, S.STOP_COPY)
    await fails_with(client.set_state(fd, S.PRE_COPY), errno.EINVAL)
    await fails_with(client.set_state(fd, S.ERROR), errno.EINVAL)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (CmdStatus.INT_ERR, errno.EIO),
        (CmdStatus.BAD_PARAM_ERR, errno.EINVAL),
        (CmdStatus.RES_BUSY, errno.EBUSY),
        (CmdStatus.NOT_READY, errno.EAGAIN),
        (CmdStatus.LIM_ERR, errno.ENOMEM),
    ],
)
async def test_firmware_status_reaches_the_caller_as_its_errno(
    drv: DriverUnderTest, client: VfioClient, status: CmdStatus, code: int
) -> None:
    """mlx5_cmd_check: a failed synchronous command is the status's errno
    (RUNNING -> STOP starts with SUSPEND_VHCA)."""
    vf, fd = await drv.open_vf(client)
    await drv.link.inject_fault(
        vf.vhca_id, Fault(FaultKind.FAIL, opcode=Opcode.SUSPEND_VHCA, status=status)
    )
    await fails_with(client.set_state(fd, S.STOP), code)
    assert await client.get_state(fd) == S.RUNNING  # the arc failed: no state was reached


async def test_commands_of_a_removed_vf_are_enotconn(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """A VF that went away (SR-IOV disabled) is detached: every firmware command
    of mlx5vf fails with -ENOTCONN (UNAVAILABLE)."""
    vf, fd = await drv.open_vf(client)
    await drv.link.remove_vf(vf.vhca_id)
    assert vf.name in [d.name for d in await client.list_devices()]  # still open: still listed
    await fails_with(client.set_state(fd, S.STOP), errno.ENOTCONN)
    await client.close(fd)
    assert vf.name not in [d.name for d in await client.list_devices()]


async def test_a_vf_replaced_in_its_slot_is_a_new_device(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """A VF removed and created again in its slot (same vhca_id, same PCI
    name) between two looks is a new device, as a replugged function is to
    the kernel: the old one's fd gets -ENOTCONN, and the name now offers the
    new VF with its own caps."""
    vf, fd = await drv.open_vf(client)
    assert [d.migratable for d in await client.list_devices() if d.name == vf.name] == [True]
    await drv.link.remove_vf(vf.vhca_id)
    (new,) = await drv.link.create_vfs(
        1, VfConfig(**{**SMALL_VF, "caps": VfCaps(migration_tracking_state=False)})
    )
    assert new.vhca_id == vf.vhca_id  # the same slot
    listed = [d for d in await client.list_devices() if d.name == vf.name]
    assert [d.migratable for d in listed] == [False]  # the new VF's caps, not the old's
    await fails_with(client.set_state(fd, S.STOP), errno.ENOTCONN)
    await client.close(fd)
    fd2 = await client.open_device(vf.name)
    await fails_with(client.set_state(fd2, S.STOP), errno.ENOTTY)  # not migratable
    await client.close(fd2)


async def test_dma_logging_argument_errors(inproc: DriverUnderTest) -> None:
    """DMA_LOGGING_START: more ranges than fit a page -> -E2BIG; REPORT with
    iova + length past 2^64 -> -EOVERFLOW (both INVALID_ARGUMENT)."""
    (vf,) = await inproc.create_vfs()
    async with await VfioClient.connect(inproc.target) as client:
        fd = await client.open_device(vf.name)
        start = SET | Feature.DMA_LOGGING_START
        ctl = DMA_LOGGING_CONTROL.pack(4096, 257, 0, 0x10000)
        ranges = b"".join(DMA_LOGGING_RANGE.pack(i << 20, 4096) for i in range(257))
        argsz = FEATURE_HEADER.size + DMA_LOGGING_CONTROL.size
        await fails_with(
            client.device_feature(fd, argsz, start, ctl, {0x10000: ranges}), errno.E2BIG
        )
        report = DMA_LOGGING_REPORT.pack(1 << 63, 1 << 63, 4096, 0x20000)
        argsz = FEATURE_HEADER.size + DMA_LOGGING_REPORT.size
        await fails_with(
            client.device_feature(fd, argsz, GET | Feature.DMA_LOGGING_REPORT, report),
            errno.EOVERFLOW,
        )


async def test_overlapping_user_buffers_are_efault(inproc: DriverUnderTest) -> None:
    """user_memory describes the caller's address space: buffers that overlap
    (or two at one address) describe none, so their addresses are bad (EFAULT),
    not a server failure."""
    (vf,) = await inproc.create_vfs()
    async with await VfioClient.connect(inproc.target) as client:
        fd = await client.open_device(vf.name)
        argsz = FEATURE_HEADER.size + MIGRATION.size
        flags = GET | Feature.MIGRATION
        await fails_with(
            client.device_feature(fd, argsz, flags, bytes(8), {0x1000: bytes(64), 0x1020: b"x"}),
            errno.EFAULT,
        )
        await fails_with(
            client.device_feature(fd, argsz, flags, bytes(8), {(1 << 64) - 1: bytes(2)}),
            errno.EFAULT,
        )


async def test_the_fd_table_is_bounded_emfile(inproc: DriverUnderTest) -> None:
    """get_unused_fd_flags: fd numbers stay below RLIMIT_NOFILE (1024), so with
    0-2 taken the 1022nd open fails with EMFILE (RESOURCE_EXHAUSTED) and leaves
    the device as it was; closing an fd frees its number again."""
    (vf,) = await inproc.create_vfs()
    async with await VfioClient.connect(inproc.target) as client:
        fds = [await client.open_device(vf.name) for _ in range(1021)]
        assert fds == list(range(3, 1024))
        await fails_with(client.open_device(vf.name), errno.EMFILE)
        assert (await client.device_info(vf.name)).open_count == 1021  # the failed one undone
        await client.close(fds[10])
        assert await client.open_device(vf.name) == fds[10]


async def test_a_device_fd_state_change_that_opens_nothing_reports_minus_one(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """MIG_DEVICE_STATE SET without a new file copies back data_fd = -1 (and
    DeviceFeatureResponse.data_fd says the same)."""
    _, fd = await drv.open_vf(client)
    r = await client.device_feature(
        fd, MIG_STATE_ARGSZ, SET | Feature.MIG_DEVICE_STATE, MIG_STATE.pack(S.STOP, 1234)
    )
    assert MIG_STATE.unpack(r.data) == (S.STOP, -1) and r.data_fd == -1


def test_every_errno_has_a_code_and_unknown_ones_are_unknown() -> None:
    """The README's table is ERRNO_CODES; errnos outside it are UNKNOWN, named
    as the kernel names them."""
    assert grpc_code(errno.ENOMSG) == grpc.StatusCode.OUT_OF_RANGE
    assert grpc_code(errno.EXDEV) == grpc.StatusCode.UNKNOWN
    assert errno_name(512) == "ERESTARTSYS" and errno_name(errno.EBADF) == "EBADF"
    assert all(isinstance(c, grpc.StatusCode) for c in ERRNO_CODES.values())
