"""Replacements and removals as the driver sees them (issue 13): during
PRE_COPY a REPLACE reconfiguration makes the firmware report INIT, so the
driver's next MIG_GET_PRECOPY_INFO says VFIO_PRECOPY_INFO_REINIT with new
initial bytes; and a migration during which the source is reconfigured many
times over, its state never growing, ends with the destination's digest equal
to the source's.  The driver service runs in this process over an in-process
firmware (tests/support/driver_service.py), served in the run's mode."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from driver.vfio.uapi import VFIO_PRECOPY_INFO_REINIT, Feature, MigState
from fwemu.link.ifc import KiB, MiB, ReconfigMode
from fwemu.link.inproc import InProcessLink
from fwemu.model import Firmware, LoopClock
from tests.support.driver_service import SET, DriverUnderTest, Vf, VfioCallError, VfioClient

pytestmark = pytest.mark.grpc

SIZE = 1 * MiB
READ = 1 << 20  # each read(2)'s count, QEMU's buffer


@pytest.fixture
async def drv() -> AsyncIterator[DriverUnderTest]:
    d = await DriverUnderTest.start(InProcessLink(Firmware(LoopClock(), seed=7)), "inproc")
    yield d
    await d.stop()


class Source:
    """A source device in PRE_COPY: its data fd and what was read from it."""

    def __init__(self, client: VfioClient, fd: int, saving: int) -> None:
        self.client, self.fd, self.saving = client, fd, saving
        self.stream = bytearray()
        self.reinits = 0
        self.last_read = 0  # what the last read(2) returned

    @classmethod
    async def start(cls, client: VfioClient, vf: Vf) -> Source:
        fd = await client.open_device(vf.name)
        await client.device_feature(fd, 8, SET | Feature.MIG_PRECOPY_INFOv2)
        return cls(client, fd, await client.set_state(fd, MigState.PRE_COPY))

    async def iterate(self) -> tuple[int, int, bool]:
        """One precopy iteration: (initial_bytes, flags, whether read() had data)."""
        info = await self.client.precopy_info(self.saving)
        if info.flags & VFIO_PRECOPY_INFO_REINIT:
            self.reinits += 1
        self.last_read = 0
        try:
            data = await self.client.read(self.saving, READ)
        except VfioCallError as e:
            assert e.errno == errno.ENOMSG, e
            await asyncio.sleep(0.002)
            return info.initial_bytes, info.flags, False
        self.stream += data
        self.last_read = len(data)
        return info.initial_bytes, info.flags, True

    async def converge(self, limit: int = 2000) -> None:
        """Iterate until no initial data is left and a read drains what is
        pending: it finds nothing, or less than it asked for.  (With the guest
        still writing, a read that finds nothing needs an iteration shorter
        than the gap between two of its page writes, ~2 ms at 2 MiB/s, and a
        loaded CI run once gave none in 2,000 iterations.)"""
        for _ in range(limit):
            initial, _, had_data = await self.iterate()
            if initial == 0 and (not had_data or self.last_read < READ):
                return
        raise AssertionError("precopy did not converge")

    async def stop_copy(self) -> bytes:
        assert await self.client.set_state(self.fd, MigState.STOP_COPY) == -1
        chunks, err = await self.client.read_all(self.saving)
        assert err is None, err
        self.stream += b"".join(chunks)
        assert await self.client.set_state(self.fd, MigState.STOP) == -1
        return bytes(self.stream)


async def load(client: VfioClient, vf: Vf, stream: bytes) -> None:
    fd = await client.open_device(vf.name)
    await client.set_state(fd, MigState.STOP)
    resuming = await client.set_state(fd, MigState.RESUMING)
    assert await client.write(
        resuming, [stream[i : i + (1 << 20)] for i in range(0, len(stream), 1 << 20)]
    ) == len(stream)
    assert await client.set_state(fd, MigState.STOP) == -1


async def migrate(
    drv: DriverUnderTest,
    during: Callable[[int], Awaitable[None]],
    iterations: int,
    **config: object,
) -> Source:
    """A migration from a new VF to another; `during(i)` runs before precopy
    iteration i; the digests are compared with both VFs stopped."""
    src, dst = await drv.create_vfs(2, size=SIZE, **config)
    async with await VfioClient.connect(drv.target) as client:
        source = await Source.start(client, src)
        await source.converge()
        for _ in range(iterations):
            await during(src.vhca_id)
            await source.iterate()
        await source.converge()
        await load(client, dst, await source.stop_copy())
        assert await drv.link.digest(src.vhca_id) == await drv.link.digest(dst.vhca_id)
    return source


async def test_a_replacement_during_precopy_is_a_reinit(drv: DriverUnderTest) -> None:
    """PRE_COPY, everything read (initial_bytes 0), then REPLACE of one QP:
    the next GET_PRECOPY_INFO reports REINIT with the new initial bytes (the
    object table and the replaced pages); the state did not grow; the
    migration then completes with equal digests."""
    src, dst = await drv.create_vfs(2, size=SIZE, reconfig_bytes=64 * KiB)
    async with await VfioClient.connect(drv.target) as client:
        source = await Source.start(client, src)
        await source.converge()
        assert source.reinits == 0
        await drv.link.reconfigure(src.vhca_id, mode=ReconfigMode.REPLACE)
        initial, flags, _ = await source.iterate()
        assert flags & VFIO_PRECOPY_INFO_REINIT
        assert initial >= 64 * KiB
        assert (await drv.link.get_vf(src.vhca_id)).state_size == SIZE
        await source.converge()
        await load(client, dst, await source.stop_copy())
        assert await drv.link.digest(src.vhca_id) == await drv.link.digest(dst.vhca_id)


async def test_a_removal_during_precopy_is_a_reinit_of_the_object_table(
    drv: DriverUnderTest,
) -> None:
    src, _ = await drv.create_vfs(2, size=SIZE)
    async with await VfioClient.connect(drv.target) as client:
        source = await Source.start(client, src)
        await source.converge()
        await drv.link.reconfigure(src.vhca_id, [("QP", 1)], mode=ReconfigMode.REMOVE)
        initial, flags, _ = await source.iterate()
        assert flags & VFIO_PRECOPY_INFO_REINIT
        assert 0 < initial < 4 * KiB  # the object table, no pages


async def test_many_replacements_during_a_live_migration_end_in_equal_digests(
    drv: DriverUnderTest,
) -> None:
    """A live workload and 300 reconfigurations during precopy (mostly
    REPLACE, some REMOVE, of various sizes): the source never grows, the
    driver reports REINITs, and the destination ends equal to the source."""
    modes = [ReconfigMode.REPLACE] * 4 + [ReconfigMode.REMOVE]
    n = 0

    async def reconfigure(vhca_id: int) -> None:
        nonlocal n
        n += 1
        mode = modes[n % len(modes)]
        await drv.link.reconfigure(vhca_id, [("CQ", (n % 7 + 1) * 9 * KiB)], mode=mode)
        assert (await drv.link.get_vf(vhca_id)).state_size == SIZE

    source = await migrate(drv, reconfigure, 300, dirty_bytes_per_s=2 * MiB)
    assert n == 300 and source.reinits > 10
