"""struct vfio_device open counting (vfio_df_open / vfio_df_close) and VFIO_DEVICE_RESET."""

from __future__ import annotations

import errno

from driver.vfio.device import VfioDevice
from driver.vfio.errors import VfioError
from driver.vfio.uapi import MigState
from tests.support.vfio_fakes import FakeDriver, raises_errno


def names(driver: FakeDriver) -> list[str]:
    return [c[0] for c in driver.calls]


async def test_only_the_first_open_and_last_close_reach_the_driver():
    """open_device on open_count 0 -> 1, close_device on 1 -> 0, nothing in between."""
    driver = FakeDriver()
    device = VfioDevice("vf0", driver)
    await device.open()
    await device.open()
    await device.close()
    assert names(driver) == ["open_device"]
    assert device.open_count == 1
    await device.close()
    assert names(driver) == ["open_device", "close_device"]
    assert device.open_count == 0


async def test_closing_an_unopened_device_is_ebadf():
    """There is no fd to close."""
    device = VfioDevice("vf0", FakeDriver())
    with raises_errno(errno.EBADF):
        await device.close()
    assert device.open_count == 0


async def test_failed_first_open_leaves_the_device_closed():
    """vfio_df_open: if open_device fails, open_count goes back down and the next open tries
    again."""
    driver = FakeDriver()
    driver.errors["open_device"] = VfioError(errno.ENOTCONN)
    device = VfioDevice("vf0", driver)
    with raises_errno(errno.ENOTCONN):
        await device.open()
    assert device.open_count == 0
    del driver.errors["open_device"]
    await device.open()
    assert names(driver) == ["open_device", "open_device"] and device.open_count == 1


async def test_reset_goes_to_the_driver():
    """VFIO_DEVICE_RESET: the driver's reset (the device runs again)."""
    driver = FakeDriver()
    device = VfioDevice("vf0", driver)
    await device.open()
    driver.state = MigState.ERROR
    await device.reset()
    assert names(driver)[-1] == "reset" and driver.state == MigState.RUNNING
