"""VFIO_DEVICE_FEATURE: vfio_ioctl_device_feature and the migration feature handlers
(drivers/vfio/vfio_main.c), vfio_check_feature (include/linux/vfio.h)."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driver.vfio.errors import VfioError
from driver.vfio.uapi import (
    DMA_LOGGING_CONTROL,
    DMA_LOGGING_RANGE,
    DMA_LOGGING_REPORT,
    MIG_DATA_SIZE,
    MIG_STATE,
    MIGRATION,
    Feature,
    MigState,
)
from driver.vfio.usermem import UserMemory
from tests.support.vfio_fakes import (
    COMBOS,
    GET,
    PRE,
    PROBE,
    SET,
    FakeDriver,
    FdTable,
    feature,
    open_device,
    raises_errno,
    run,
)

S = MigState
F = Feature
CORE_FEATURES = {F.MIGRATION, F.MIG_DEVICE_STATE, F.DMA_LOGGING_START, F.DMA_LOGGING_STOP,
                 F.DMA_LOGGING_REPORT, F.MIG_DATA_SIZE, F.MIG_PRECOPY_INFOv2}  # fmt: skip
SUPPORTED = {
    F.MIGRATION: GET,
    F.MIG_DEVICE_STATE: GET | SET,
    F.DMA_LOGGING_START: SET,
    F.DMA_LOGGING_STOP: SET,
    F.DMA_LOGGING_REPORT: GET,
    F.MIG_DATA_SIZE: GET,
    F.MIG_PRECOPY_INFOv2: SET,
}
MIG_FEATURES = (F.MIGRATION, F.MIG_DEVICE_STATE, F.MIG_DATA_SIZE)
LOG_FEATURES = (F.DMA_LOGGING_START, F.DMA_LOGGING_STOP, F.DMA_LOGGING_REPORT)
DRIVER_METHODS = {"migration_set_state", "migration_get_state", "migration_get_data_size",
                  "log_start", "log_stop", "log_read_and_clear", "device_feature"}  # fmt: skip

RANGES_ADDR = 0x10000
BITMAP_ADDR = 0x20000


def user() -> UserMemory:
    return UserMemory(
        {
            RANGES_ADDR: bytearray(DMA_LOGGING_RANGE.pack(0x100000, 0x10000)),
            BITMAP_ADDR: bytearray(8),
        }
    )


def valid_request(index: Feature) -> tuple[int, bytes]:
    """(op, data) of a well-formed non-PROBE call of each feature."""
    return {
        F.MIGRATION: (GET, bytes(MIGRATION.size)),
        F.MIG_DEVICE_STATE: (SET, MIG_STATE.pack(S.RUNNING_P2P, 0)),
        F.DMA_LOGGING_START: (SET, DMA_LOGGING_CONTROL.pack(4096, 1, 0, RANGES_ADDR)),
        F.DMA_LOGGING_STOP: (SET, b""),
        F.DMA_LOGGING_REPORT: (GET, DMA_LOGGING_REPORT.pack(0, 0x40000, 4096, BITMAP_ADDR)),
        F.MIG_DATA_SIZE: (GET, bytes(MIG_DATA_SIZE.size)),
        F.MIG_PRECOPY_INFOv2: (SET, b""),
    }[index]


MINSZ = {
    F.MIGRATION: MIGRATION.size,
    F.MIG_DEVICE_STATE: MIG_STATE.size,
    F.DMA_LOGGING_START: DMA_LOGGING_CONTROL.size,
    F.DMA_LOGGING_STOP: 0,
    F.DMA_LOGGING_REPORT: DMA_LOGGING_REPORT.size,
    F.MIG_DATA_SIZE: MIG_DATA_SIZE.size,
    F.MIG_PRECOPY_INFOv2: 0,
}


def driver_calls(driver: FakeDriver) -> list[str]:
    return [c[0] for c in driver.calls if c[0] in DRIVER_METHODS]


# -- the header checks of vfio_ioctl_device_feature ---------------------------------


@settings(max_examples=200, deadline=None)
@given(argsz=st.integers(0, 7), flags=st.integers(0, 2**32 - 1), data=st.binary(max_size=40))
def test_argsz_below_the_header_is_einval(argsz, flags, data):
    """argsz < sizeof(struct vfio_device_feature) -> -EINVAL before anything else."""

    async def go() -> None:
        driver = FakeDriver()
        device = await open_device(driver)
        with raises_errno(errno.EINVAL):
            await feature(device, flags, data, argsz=argsz)
        assert driver_calls(driver) == []

    run(go())


@settings(max_examples=200, deadline=None)
@given(
    index=st.integers(0, 0xFFFF),
    ops=st.integers(0, 7),
    unknown=st.integers(1, (2**32 - 1) >> 19),
    argsz=st.integers(8, 2**32 - 1),
)
def test_unknown_flag_bits_are_einval(index, ops, unknown, argsz):
    """Any flag bit outside MASK|GET|SET|PROBE -> -EINVAL, even for an index that would be
    -ENOTTY (the flag check comes before the dispatch)."""
    flags = index | ops << 16 | unknown << 19

    async def go() -> None:
        driver = FakeDriver()
        device = await open_device(driver)
        with raises_errno(errno.EINVAL):
            await feature(device, flags, argsz=argsz)
        assert driver_calls(driver) == []

    run(go())


@settings(max_examples=100, deadline=None)
@given(index=st.integers(0, 0xFFFF), argsz=st.integers(8, 64))
def test_get_and_set_without_probe_are_einval(index, argsz):
    """GET and SET are mutually exclusive except with PROBE: -EINVAL for every index,
    including unknown ones and ones the driver would handle."""

    async def go() -> None:
        driver = FakeDriver()
        device = await open_device(driver)
        with raises_errno(errno.EINVAL):
            await feature(device, index | GET | SET, bytes(64), argsz=argsz)
        assert driver_calls(driver) == []

    run(go())


# -- PROBE -------------------------------------------------------------------------


@pytest.mark.parametrize("index", sorted(CORE_FEATURES))
@pytest.mark.parametrize("ops", [0, GET, SET, GET | SET])
@pytest.mark.parametrize("argsz", [8, 9, 0xFFFF])
async def test_probe_answers_without_touching_data_or_driver(index, ops, argsz):
    """vfio_check_feature: a GET/SET bit the feature lacks -> -EINVAL; otherwise PROBE returns
    0 at once: no argsz check, no copy from or to the user, no driver call."""
    driver = FakeDriver()
    device = await open_device(driver)
    call = feature(device, index | PROBE | ops, b"", argsz=argsz)
    if ops & ~SUPPORTED[index]:
        with raises_errno(errno.EINVAL):
            await call
    else:
        assert await call == b""
    assert driver_calls(driver) == []
    assert device.precopy_info_v2 is False


@pytest.mark.parametrize(
    ("index", "ops"),
    [
        pytest.param(i, op, id=f"{F(i).name}-{name}")
        for i in sorted(CORE_FEATURES)
        for op, name in ((GET, "GET"), (SET, "SET"))
        if not op & SUPPORTED[i]
    ],
)
async def test_unsupported_direction_is_einval(index, ops):
    """vfio_check_feature: GET on a SET-only feature (and vice versa) -> -EINVAL."""
    driver = FakeDriver()
    device = await open_device(driver)
    with raises_errno(errno.EINVAL):
        await feature(device, index | ops, bytes(64))
    assert driver_calls(driver) == []


@pytest.mark.parametrize("index", sorted(CORE_FEATURES))
async def test_neither_get_nor_set_is_einval(index):
    """Without PROBE one of GET or SET must be requested."""
    driver = FakeDriver()
    device = await open_device(driver)
    with raises_errno(errno.EINVAL):
        await feature(device, index, bytes(64))


# -- minsz, short data ----------------------------------------------------------------


@pytest.mark.parametrize("index", sorted(CORE_FEATURES))
async def test_each_feature_minsz(index):
    """argsz - 8 < minsz -> -EINVAL even when the data is there; argsz - 8 == minsz works."""
    op, data = valid_request(index)
    driver = FakeDriver()
    device = await open_device(driver)
    if MINSZ[index]:
        with raises_errno(errno.EINVAL):
            await feature(device, index | op, data, argsz=8 + MINSZ[index] - 1, user=user())
        assert driver_calls(driver) == []
    out = await feature(device, index | op, data, argsz=8 + MINSZ[index], user=user())
    assert len(out) == len(data)


@pytest.mark.parametrize(
    ("index", "cut"),
    [
        pytest.param(i, cut, id=f"{F(i).name}-{cut}")
        for i in sorted(CORE_FEATURES)
        for cut in (0, 1, 4, 7, 8, 16, 23, 31)
        if cut < MINSZ[i]
    ],
)
async def test_data_shorter_than_argsz_says_is_efault(index, cut):
    """The handlers copy minsz bytes from/to arg->data whatever argsz claims: fewer bytes there
    -> -EFAULT (copy_from_user / copy_to_user failure)."""
    op, data = valid_request(index)
    driver = FakeDriver()
    device = await open_device(driver)
    with raises_errno(errno.EFAULT):
        await feature(device, index | op, data[:cut], argsz=8 + len(data), user=user())
    # MIG_DATA_SIZE asks the driver first and faults on the copy back; the others fault before.
    assert driver_calls(driver) == (["migration_get_data_size"] if index == F.MIG_DATA_SIZE else [])


@pytest.mark.parametrize("index", [F.MIGRATION, F.MIG_DEVICE_STATE, F.MIG_DATA_SIZE])
async def test_bytes_beyond_the_struct_are_left_alone(index):
    """Only the feature's struct is copied back; the rest of what argsz covers is untouched."""
    op, data = valid_request(index)
    tail = b"\xa5" * 16
    driver = FakeDriver()
    device = await open_device(driver)
    out = await feature(device, index | op, data + tail)
    assert out.endswith(tail) and len(out) == len(data) + len(tail)


# -- dispatch to the driver -------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    index=st.integers(0, 0xFFFF).filter(lambda i: i not in CORE_FEATURES),
    ops=st.sampled_from([GET, SET, PROBE, PROBE | GET | SET]),
    data=st.binary(max_size=16),
    extra=st.integers(0, 8),
)
def test_other_indexes_go_to_the_driver_or_are_enotty(index, ops, data, extra):
    """default: device->ops->device_feature(flags, arg->data, argsz - 8); a driver that does
    not know the feature answers -ENOTTY."""

    async def go() -> None:
        driver = FakeDriver()
        device = await open_device(driver)
        argsz = 8 + len(data) + extra
        with raises_errno(errno.ENOTTY):
            await feature(device, index | ops, data, argsz=argsz)
        assert driver.called("device_feature") == [("device_feature", index | ops, data, argsz - 8)]

    run(go())


async def test_driver_feature_reply_is_copied_to_the_data():
    """What the driver's device_feature writes lands in arg->data."""
    driver = FakeDriver()
    driver.feature_reply = b"\x01\x02"
    device = await open_device(driver)
    assert await feature(device, F.LOW_POWER_ENTRY | SET, bytes(4)) == b"\x01\x02\x00\x00"


# -- devices without mig_ops / log_ops -------------------------------------------------


@pytest.mark.parametrize("index", MIG_FEATURES)
@pytest.mark.parametrize("ops", [GET, SET, PROBE, PROBE | GET | SET])
async def test_no_mig_ops_is_enotty(index, ops):
    """MIGRATION, MIG_DEVICE_STATE, MIG_DATA_SIZE: !device->mig_ops -> -ENOTTY, before the
    feature check (so also for PROBE and for a direction the feature lacks)."""
    driver = FakeDriver(0, migration=False)
    device = await open_device(driver)
    with raises_errno(errno.ENOTTY):
        await feature(device, index | ops, bytes(8))


@pytest.mark.parametrize("index", LOG_FEATURES)
@pytest.mark.parametrize("ops", [GET, SET, PROBE, PROBE | GET | SET])
async def test_no_log_ops_is_enotty(index, ops):
    """DMA_LOGGING_*: !device->log_ops -> -ENOTTY, before the feature check."""
    driver = FakeDriver(logging=False)
    device = await open_device(driver)
    with raises_errno(errno.ENOTTY):
        await feature(device, index | ops, bytes(32), user=user())


@pytest.mark.parametrize("ops", [SET, PROBE])
async def test_precopy_info_v2_without_mig_ops_is_einval_not_enotty(ops):
    """MIG_PRECOPY_INFOv2 does not look at mig_ops; a device without migration has no PRE_COPY
    flag, so -EINVAL."""
    driver = FakeDriver(0, migration=False)
    device = await open_device(driver)
    with raises_errno(errno.EINVAL):
        await feature(device, F.MIG_PRECOPY_INFOv2 | ops)


# -- MIGRATION, MIG_DATA_SIZE -----------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS)
async def test_migration_get_returns_the_flags(combo):
    """MIGRATION GET: {u64 flags} = device->migration_flags (nothing is read from the user)."""
    driver = FakeDriver(COMBOS[combo])
    device = await open_device(driver)
    out = await feature(device, F.MIGRATION | GET, b"\xff" * 8)
    assert MIGRATION.unpack(out) == (COMBOS[combo],)


async def test_mig_data_size_get_returns_the_driver_estimate():
    """MIG_DATA_SIZE GET: stop_copy_length from migration_get_data_size."""
    driver = FakeDriver()
    driver.data_size = 2**40 + 3
    device = await open_device(driver)
    assert MIG_DATA_SIZE.unpack(await feature(device, F.MIG_DATA_SIZE | GET, bytes(8))) == (
        2**40 + 3,
    )


async def test_mig_data_size_driver_error_writes_nothing():
    """A get_data_size failure is returned before anything is copied back."""
    driver = FakeDriver()
    driver.errors["migration_get_data_size"] = VfioError(errno.ENOTCONN)
    device = await open_device(driver)
    data = bytearray(b"\x77" * 8)
    with raises_errno(errno.ENOTCONN):
        await feature(device, F.MIG_DATA_SIZE | GET, data)
    assert data == b"\x77" * 8


# -- MIG_DEVICE_STATE ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cur", "new"),
    [(S.STOP, S.STOP_COPY), (S.RUNNING, S.PRE_COPY), (S.STOP, S.RESUMING),
     (S.RUNNING_P2P, S.PRE_COPY_P2P), (S.RUNNING, S.STOP_COPY)],
)  # fmt: skip
async def test_set_returning_a_file_installs_an_fd(cur, new):
    """SET: a file from migration_set_state becomes a new fd written to data_fd; device_state
    echoes the request."""
    driver = FakeDriver()
    device = await open_device(driver)
    driver.state = cur
    fds = FdTable(first=17)
    out = await feature(device, F.MIG_DEVICE_STATE | SET, MIG_STATE.pack(new, 0), fds=fds)
    assert MIG_STATE.unpack(out) == (new, 17)
    assert fds.files == {17: driver.files[-1]}
    assert not driver.files[-1].released


async def test_set_without_a_file_writes_data_fd_minus_one():
    """SET that produces no file: data_fd = -1 whatever the user put there."""
    driver = FakeDriver()
    device = await open_device(driver)
    out = await feature(device, F.MIG_DEVICE_STATE | SET, MIG_STATE.pack(S.STOP, 1234))
    assert MIG_STATE.unpack(out) == (S.STOP, -1)


@pytest.mark.parametrize("code", [errno.EIO, errno.ENODEV, errno.EINVAL])
async def test_set_error_copies_back_minus_one_then_fails(code):
    """out_copy: on a driver error the struct still goes back with data_fd = -1, then the
    error is returned."""
    driver = FakeDriver()
    driver.fail_arcs[(S.RUNNING, S.RUNNING_P2P)] = code
    device = await open_device(driver)
    data = bytearray(MIG_STATE.pack(S.STOP, 321) + b"tail")
    with raises_errno(code):
        await feature(device, F.MIG_DEVICE_STATE | SET, data)
    assert data == MIG_STATE.pack(S.STOP, -1) + b"tail"


async def test_get_error_copies_nothing_back():
    """GET: a migration_get_state failure is returned as is, the struct untouched."""
    driver = FakeDriver()
    driver.errors["migration_get_state"] = VfioError(errno.EIO)
    device = await open_device(driver)
    data = bytearray(MIG_STATE.pack(5, 6))
    with raises_errno(errno.EIO):
        await feature(device, F.MIG_DEVICE_STATE | GET, data)
    assert data == MIG_STATE.pack(5, 6)


async def test_get_reads_the_struct_first():
    """MIG_DEVICE_STATE copies the struct in before GET or SET: short data is -EFAULT even for
    GET, and the driver is not asked."""
    driver = FakeDriver()
    device = await open_device(driver)
    with raises_errno(errno.EFAULT):
        await feature(device, F.MIG_DEVICE_STATE | GET, bytes(7), argsz=16)
    assert driver_calls(driver) == []


# -- MIG_PRECOPY_INFOv2 -------------------------------------------------------------------


async def test_precopy_info_v2_set_opts_in():
    """SET (no payload; argsz and data are not looked at) sets device->precopy_info_v2."""
    driver = FakeDriver()
    device = await open_device(driver)
    assert await feature(device, F.MIG_PRECOPY_INFOv2 | SET, b"", argsz=4096) == b""
    assert device.precopy_info_v2 is True


@pytest.mark.parametrize("ops", [GET, GET | PROBE, GET | SET | PROBE])
async def test_precopy_info_v2_get_is_einval(ops):
    """INFOv2 is SET-only: GET (also with PROBE) -> -EINVAL, the opt-in unchanged."""
    driver = FakeDriver()
    device = await open_device(driver)
    with raises_errno(errno.EINVAL):
        await feature(device, F.MIG_PRECOPY_INFOv2 | ops)
    assert device.precopy_info_v2 is False


@pytest.mark.parametrize("combo", ["SC", "SC+P2P"])
@pytest.mark.parametrize("ops", [SET, PROBE, PROBE | SET, GET])
async def test_precopy_info_v2_without_pre_copy_is_einval_even_for_probe(combo, ops):
    """The PRE_COPY test comes before vfio_check_feature: without PRE_COPY every call, PROBE
    included, is -EINVAL."""
    driver = FakeDriver(COMBOS[combo])
    device = await open_device(driver)
    with raises_errno(errno.EINVAL):
        await feature(device, F.MIG_PRECOPY_INFOv2 | ops)
    assert device.precopy_info_v2 is False


async def test_precopy_info_v2_needs_only_the_pre_copy_flag():
    """The check is migration_flags & PRE_COPY, nothing else."""
    driver = FakeDriver(PRE)
    device = await open_device(driver)
    await feature(device, F.MIG_PRECOPY_INFOv2 | SET)
    assert device.precopy_info_v2 is True


async def test_feature_on_a_closed_device_is_ebadf():
    """Ioctls need an open device fd."""
    driver = FakeDriver()
    device = await open_device(driver)
    await device.close()
    with raises_errno(errno.EBADF):
        await feature(device, F.MIGRATION | GET, bytes(8))
    with raises_errno(errno.EBADF):
        await device.reset()


def test_struct_layouts():
    """uapi sizes the handlers rely on."""
    assert (MIGRATION.size, MIG_STATE.size, MIG_DATA_SIZE.size) == (8, 8, 8)
    assert (DMA_LOGGING_CONTROL.size, DMA_LOGGING_REPORT.size, DMA_LOGGING_RANGE.size) == (
        24,
        32,
        16,
    )
    assert MIG_STATE.pack(3, -1) == struct.pack("<Ii", 3, -1)
