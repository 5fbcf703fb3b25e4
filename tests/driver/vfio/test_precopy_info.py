"""VFIO_MIG_GET_PRECOPY_INFO's core helper vfio_check_precopy_ioctl (include/linux/vfio.h)
and the device-wide MIG_PRECOPY_INFOv2 opt-in (vfio_main.c)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driver.vfio.device import VfioDevice
from driver.vfio.precopy import VfioPrecopyInfo, vfio_check_precopy_ioctl
from driver.vfio.uapi import (
    PRECOPY_INFO,
    VFIO_DEVICE_FEATURE,
    VFIO_MIG_GET_PRECOPY_INFO,
    Feature,
    MigState,
)
from tests.support.vfio_fakes import (
    SET,
    FakeDriver,
    FakeFile,
    feature,
    open_device,
    raises_errno,
    run,
)

CMD = VFIO_MIG_GET_PRECOPY_INFO
OPT_IN = Feature.MIG_PRECOPY_INFOv2 | SET
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def info_bytes(argsz: int = 24, flags: int = 0, initial: int = 0, dirty: int = 0) -> bytes:
    return PRECOPY_INFO.pack(argsz, flags, initial, dirty)


@settings(max_examples=200, deadline=None)
@given(argsz=st.integers(24, 2**32 - 1), flags=u32, initial=u64, dirty=u64, tail=st.binary())
def test_v1_echoes_every_field_the_caller_passed(argsz, flags, initial, dirty, tail):
    """Without the opt-in the helper returns the caller's 24 bytes untouched, flags included
    (the v1 bug-compatibility: drivers copy the whole struct back)."""
    device = VfioDevice("vf", FakeDriver())
    info = vfio_check_precopy_ioctl(device, CMD, info_bytes(argsz, flags, initial, dirty) + tail)
    assert info == VfioPrecopyInfo(argsz, flags, initial, dirty)
    assert info.pack() == info_bytes(argsz, flags, initial, dirty)


@settings(max_examples=200, deadline=None)
@given(argsz=st.integers(24, 2**32 - 1), flags=u32, initial=u64, dirty=u64)
def test_v2_zeroes_flags_only(argsz, flags, initial, dirty):
    """With precopy_info_v2 set the helper clears flags (an output field from then on); the
    other fields are still what the caller passed."""
    device = VfioDevice("vf", FakeDriver())
    device.precopy_info_v2 = True
    info = vfio_check_precopy_ioctl(device, CMD, info_bytes(argsz, flags, initial, dirty))
    assert info == VfioPrecopyInfo(argsz, 0, initial, dirty)


@pytest.mark.parametrize("argsz", [0, 1, 8, 16, 23])
@pytest.mark.parametrize("v2", [False, True])
def test_argsz_below_24_is_einval(argsz, v2):
    """info.argsz < offsetofend(dirty_bytes) -> -EINVAL."""
    device = VfioDevice("vf", FakeDriver())
    device.precopy_info_v2 = v2
    with raises_errno(errno.EINVAL):
        vfio_check_precopy_ioctl(device, CMD, info_bytes(argsz))


@pytest.mark.parametrize("n", [0, 1, 8, 16, 23])
def test_short_argument_is_efault(n):
    """copy_from_user of 24 bytes: fewer there -> -EFAULT (before argsz is looked at)."""
    device = VfioDevice("vf", FakeDriver())
    with raises_errno(errno.EFAULT):
        vfio_check_precopy_ioctl(device, CMD, info_bytes(24)[:n])


@pytest.mark.parametrize("cmd", [0, VFIO_DEVICE_FEATURE, CMD - 1, CMD + 1, CMD | 1 << 16])
def test_wrong_cmd_is_enotty(cmd):
    """cmd != VFIO_MIG_GET_PRECOPY_INFO -> -ENOTTY, before the argument is read."""
    device = VfioDevice("vf", FakeDriver())
    with raises_errno(errno.ENOTTY):
        vfio_check_precopy_ioctl(device, cmd, b"")


def test_pack_is_the_uapi_layout():
    """struct vfio_precopy_info: u32 argsz, u32 flags, u64 initial_bytes, u64 dirty_bytes, LE."""
    raw = VfioPrecopyInfo(24, 1, 0x0102030405060708, 2).pack()
    assert raw == (
        b"\x18\x00\x00\x00\x01\x00\x00\x00\x08\x07\x06\x05\x04\x03\x02\x01"
        b"\x02\x00\x00\x00\x00\x00\x00\x00"
    )


async def test_opt_in_is_sticky_across_opens_and_cleared_at_last_close():
    """precopy_info_v2 is per device: it survives a close while another open remains and is
    cleared by vfio_df_device_last_close; a new open starts at v1 again."""
    driver = FakeDriver()
    device = await open_device(driver)
    await device.open()
    file = FakeFile(device, (MigState.RUNNING, MigState.PRE_COPY))
    raw = info_bytes(24, 0xABCD, 1, 2)

    await feature(device, OPT_IN)
    assert VfioPrecopyInfo.unpack(await file.ioctl(CMD, raw)).flags == 0
    await device.close()
    assert device.open_count == 1 and device.precopy_info_v2 is True
    assert VfioPrecopyInfo.unpack(await file.ioctl(CMD, raw)).flags == 0
    await device.close()
    assert device.open_count == 0 and device.precopy_info_v2 is False
    await device.open()
    assert VfioPrecopyInfo.unpack(await file.ioctl(CMD, raw)).flags == 0xABCD


async def test_opt_in_is_cleared_after_close_device():
    """vfio_df_device_last_close calls close_device first, then clears the opt-in."""
    driver = FakeDriver()
    device = await open_device(driver)
    await feature(device, OPT_IN)
    seen: list[bool] = []
    driver.on_close = lambda: seen.append(device.precopy_info_v2)
    await device.close()
    assert seen == [True]
    assert device.precopy_info_v2 is False


def test_opt_in_through_the_feature_is_what_the_helper_sees():
    """SET MIG_PRECOPY_INFOv2 on the device turns the helper to v2 for every file of it."""

    async def go() -> tuple[int, int]:
        device = await open_device(FakeDriver())
        raw = info_bytes(24, 7)
        before = vfio_check_precopy_ioctl(device, CMD, raw).flags
        await feature(device, OPT_IN)
        return before, vfio_check_precopy_ioctl(device, CMD, raw).flags

    assert run(go()) == (7, 0)
