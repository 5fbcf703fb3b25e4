"""mlx5vf's DMA logging (vfio_log_ops) over the firmware's PAGE_TRACK object,
through VFIO_DEVICE_FEATURE as a QEMU-like client drives it, against both
firmware links."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator

import pytest

from driver.registry import DeviceRegistry, Registered
from driver.vfio.errors import VfioError
from driver.vfio.uapi import (
    DMA_LOGGING_CONTROL,
    DMA_LOGGING_RANGE,
    DMA_LOGGING_REPORT,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    Feature,
)
from driver.vfio.usermem import UserMemory
from fwemu.link.grpc import GrpcLink
from fwemu.link.ifc import KiB, MiB, VfCaps, VfConfig
from fwemu.link.inproc import InProcessLink
from fwemu.model import Firmware, VirtualClock
from fwemu.service.server import FirmwareServer

GiB = 1 << 30
RANGES_AT = 0x1000
BITMAP_AT = 0x200000


def no_fd(file: object) -> int:
    raise AssertionError("no data fd expected")


@pytest.fixture(params=["inproc", "grpc"])
async def fw_and_dev(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Firmware, Registered]]:
    fw = Firmware(VirtualClock(), seed=4)
    fw.create_vfs(1, VfConfig(size=256 * KiB, dirty_bytes_per_s=1 * MiB))
    fw.create_vfs(1, VfConfig(size=64 * KiB, caps=VfCaps(adv_virtualization=False)))
    server = None
    if request.param == "inproc":
        link = InProcessLink(fw)
    else:
        server = FirmwareServer(fw)
        port = await server.start("127.0.0.1:0")
        link = await GrpcLink.connect(f"127.0.0.1:{port}")  # type: ignore[assignment]
    reg = DeviceRegistry(link)  # type: ignore[arg-type]
    devs = await reg.refresh()
    await devs[0].core.open()
    try:
        yield fw, devs[0]
    finally:
        await devs[0].core.close()
        await link.close()
        if server is not None:
            await server.stop(0)


async def start(dev: Registered, page_size: int, ranges: list[tuple[int, int]]) -> int:
    ctl = DMA_LOGGING_CONTROL.pack(page_size, len(ranges), 0, RANGES_AT)
    raw = b"".join(DMA_LOGGING_RANGE.pack(a, n) for a, n in ranges)
    out = await dev.core.device_feature(
        8 + len(ctl),
        Feature.DMA_LOGGING_START | VFIO_DEVICE_FEATURE_SET,
        ctl,
        user=UserMemory({RANGES_AT: bytearray(raw)}),
        install_fd=no_fd,
    )
    return int(DMA_LOGGING_CONTROL.unpack(out)[0])


async def report(dev: Registered, iova: int, length: int, page_size: int) -> list[int]:
    nbits = length // page_size
    bitmap = bytearray(-(-nbits // 64) * 8)
    user = UserMemory({BITMAP_AT: bitmap})
    arg = DMA_LOGGING_REPORT.pack(iova, length, page_size, BITMAP_AT)
    await dev.core.device_feature(
        8 + len(arg),
        Feature.DMA_LOGGING_REPORT | VFIO_DEVICE_FEATURE_GET,
        arg,
        user=user,
        install_fd=no_fd,
    )
    bits = user.buffers[BITMAP_AT]
    return [iova + i * page_size for i in range(nbits) if bits[i // 8] >> (i % 8) & 1]


async def test_dirty_pages_follow_the_workload_and_are_cleared_by_a_report(fw_and_dev):
    """The device dirties guest pages while it runs; each report returns them
    once (read and clear), as bits of page_size from iova."""
    fw, dev = fw_and_dev
    assert await start(dev, 4096, [(0, GiB), (8 * GiB, GiB)]) == 4096
    fw.clock.advance(1.0)
    dirty = await report(dev, 0, GiB, 4096) + await report(dev, 8 * GiB, GiB, 4096)
    assert 0 < len(dirty) <= 256
    assert await report(dev, 0, GiB, 4096) == []
    fw.clock.advance(0.5)
    assert await report(dev, 0, GiB, 4096) or await report(dev, 8 * GiB, GiB, 4096)


async def test_page_size_is_clamped_to_what_the_firmware_tracks(fw_and_dev):
    """mlx5vf clamps the page size into the firmware's [2^12, 2^30] and writes it back."""
    _, dev = fw_and_dev
    assert await start(dev, 1 << 31, [(0, 4 * GiB)]) == 1 << 30


async def test_start_twice_is_einval_and_stop_allows_a_new_start(fw_and_dev):
    _, dev = fw_and_dev
    await start(dev, 4096, [(0, GiB)])
    with pytest.raises(VfioError) as e:
        await start(dev, 4096, [(0, GiB)])
    assert e.value.errno == errno.EINVAL
    await dev.core.device_feature(
        8,
        Feature.DMA_LOGGING_STOP | VFIO_DEVICE_FEATURE_SET,
        b"",
        user=UserMemory(),
        install_fd=no_fd,
    )
    assert await start(dev, 4096, [(0, GiB)]) == 4096


async def test_report_without_tracking_is_einval(fw_and_dev):
    _, dev = fw_and_dev
    with pytest.raises(VfioError) as e:
        await report(dev, 0, GiB, 4096)
    assert e.value.errno == errno.EINVAL


async def test_many_ranges_are_combined(fw_and_dev):
    """More ranges than the firmware takes are merged across the smallest gaps
    (vfio_combine_iova_ranges), and tracking still works."""
    fw, dev = fw_and_dev
    ranges = [(i * 2 * GiB, 64 * 4096) for i in range(40)]
    assert await start(dev, 4096, ranges) == 4096
    fw.clock.advance(1.0)
    dirty = []
    for a, n in ranges:
        dirty += await report(dev, a, n, 4096)
    assert dirty


async def test_devices_without_adv_virtualization_have_no_log_ops():
    """log_ops only with cmd_hca_cap.adv_virtualization: PROBE of DMA logging is ENOTTY."""
    fw = Firmware(VirtualClock())
    fw.create_vfs(1, VfConfig(size=64 * KiB, caps=VfCaps(adv_virtualization=False)))
    (dev,) = await DeviceRegistry(InProcessLink(fw)).refresh()
    await dev.core.open()
    with pytest.raises(VfioError) as e:
        await dev.core.device_feature(
            8,
            Feature.DMA_LOGGING_START | VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET,
            b"",
            user=UserMemory(),
            install_fd=no_fd,
        )
    assert e.value.errno == errno.ENOTTY
