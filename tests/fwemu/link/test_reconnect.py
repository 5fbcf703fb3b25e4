"""GrpcLink when the firmware goes away and comes back on the same address:
the completion stream is subscribed again (backoff, until close()), the link
reports down and up, buffers registered with the old stream are retired (their
mkeys are gone), and memory="auto" falls back to remote memory one buffer at a
time."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fwemu.link.base import ByteBuffer, LinkError
from fwemu.link.grpc import GrpcLink, ShmBuffer
from fwemu.link.ifc import MAX_U32, CmdStatus, SaveCompletion, Syndrome, VfConfig
from fwemu.model import Firmware, VirtualClock
from fwemu.service.server import FirmwareServer

pytestmark = pytest.mark.grpc

VF = VfConfig(size=64 * 1024, dirty_bytes_per_s=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Restartable:
    """A firmware server on a fixed address that can be stopped and started again
    (a new Firmware each time, as a restarted `fwemu serve` is)."""

    address: str
    shm_dir: str | None = None
    fw: Firmware | None = None
    srv: FirmwareServer | None = None
    states: list[bool] = field(default_factory=list)

    async def start(self) -> Firmware:
        self.fw = Firmware(VirtualClock(), seed=3)
        self.srv = FirmwareServer(self.fw, shm_dir=self.shm_dir)
        await self.srv.start(self.address)
        return self.fw

    async def stop(self) -> None:
        assert self.srv is not None
        await self.srv.stop(0)
        self.srv = None


@pytest.fixture(name="firmware")
async def firmware_fixture() -> AsyncIterator[Restartable]:
    r = Restartable(f"127.0.0.1:{free_port()}")
    await r.start()
    yield r
    if r.srv is not None:
        await r.stop()


async def until(check: object, timeout: float = 5.0) -> None:
    assert callable(check)
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def save(link: GrpcLink, vhca: int, mkey: int, size: int) -> SaveCompletion:
    done: asyncio.Future[SaveCompletion] = asyncio.get_running_loop().create_future()
    r = await link.save_vhca_state(
        vhca, mkey=mkey, size=size, set_track=True, callback=done.set_result
    )
    assert r.ok, r
    await link.advance_clock(1)
    return await asyncio.wait_for(done, 5)


async def test_the_link_subscribes_again_after_a_restart_and_reports_down_and_up(
    firmware: Restartable,
) -> None:
    link = await GrpcLink.connect(firmware.address)
    states: list[tuple[bool, str]] = []
    link.watch_state(lambda up, why: states.append((up, why)))
    try:
        assert link.up
        await firmware.stop()
        await until(lambda: not link.up)
        assert states[0][0] is False and states[0][1]  # down, with the reason (gRPC words it)
        fw = await firmware.start()
        await until(lambda: link.up)
        assert [up for up, _ in states] == [False, True]
        # Completions flow again: a SAVE on the new firmware completes.
        (vf,) = await link.create_vfs(1, VF)
        buf = await link.alloc_buffer(128 * 1024)
        c = await save(link, vf.vhca_id, buf.mkey, buf.length)
        assert c.status == 0 and c.actual_image_size > 0
        assert fw.mkey_view(buf.mkey) is not None
    finally:
        await link.close()


async def test_while_down_save_and_alloc_fail_at_once(firmware: Restartable) -> None:
    """Their completion or mkey could not survive: LinkError now, not a timeout."""
    link = await GrpcLink.connect(firmware.address, memory="remote")
    try:
        (vf,) = await link.create_vfs(1, VF)
        buf = await link.alloc_buffer(128 * 1024)
        await firmware.stop()
        await until(lambda: not link.up)
        waiting = asyncio.get_running_loop().time()
        with pytest.raises(LinkError, match="completion stream down"):
            await link.alloc_buffer(4096)
        with pytest.raises(LinkError):
            await link.save_vhca_state(
                vf.vhca_id, mkey=buf.mkey, size=buf.length, callback=lambda c: None
            )
        assert asyncio.get_running_loop().time() - waiting < 1.0
        assert not link._waiting  # nothing left waiting for a completion
    finally:
        await link.close()


@pytest.mark.parametrize("memory", ["shm", "remote"])
async def test_buffers_of_a_broken_stream_are_retired(firmware: Restartable, memory: str) -> None:
    """The old firmware's mkeys are gone, and the new one may reuse their
    numbers (drawn at random: made to here): SAVE, LOAD and DMA on an old
    buffer fail with LinkError instead of reaching the new firmware's mkey of
    the same number, and freeing it leaves that one be."""
    link = await GrpcLink.connect(firmware.address, memory=memory)  # type: ignore[arg-type]
    try:
        old = await link.alloc_buffer(128 * 1024)
        number = old.mkey
        await firmware.stop()
        await until(lambda: not link.up)
        assert old.mkey > MAX_U32  # no firmware issues it
        fw = await firmware.start()
        await until(lambda: link.up)
        (vf,) = await link.create_vfs(1, VF)
        fw.mkeys._new_mkey = lambda: number  # type: ignore[method-assign]
        new = await link.alloc_buffer(128 * 1024)
        assert new.mkey == number  # the restarted firmware draws the old number again
        with pytest.raises(LinkError, match="went away with the completion stream"):
            await link.save_vhca_state(
                vf.vhca_id, mkey=old.mkey, size=old.length, callback=lambda c: None
            )
        with pytest.raises(LinkError, match="went away"):
            await link.load_vhca_state(vf.vhca_id, mkey=old.mkey, size=old.length)
        if isinstance(old, ByteBuffer):
            with pytest.raises(LinkError, match="went away"):
                await link.dma_sync_for_cpu(old, 0, 4096)
            with pytest.raises(LinkError, match="went away"):
                await link.dma_sync_for_device(old, 0, 4096)
        else:
            assert isinstance(old, ShmBuffer)
            await link.dma_sync_for_cpu(old, 0, 4096)  # its bytes are ours: nothing to move
        await link.free_buffer(old)
        assert fw.mkey_view(number) is not None  # the new buffer's mkey is still there
        assert (await save(link, vf.vhca_id, new.mkey, new.length)).status == 0
        assert not link._retired
    finally:
        await link.close()


async def test_a_save_accepted_as_the_stream_breaks_completes_aborted(
    firmware: Restartable,
) -> None:
    """A SAVE whose command answers after the stream broke gets its ABORTED
    completion then (its real one is lost), exactly once."""
    link = await GrpcLink.connect(firmware.address)
    try:
        (vf,) = await link.create_vfs(1, VfConfig(size=64 * 1024, save_latency_s=10))
        buf = await link.alloc_buffer(128 * 1024)
        got: list[SaveCompletion] = []
        real_exec = link.exec

        async def exec_racing_a_break(cmd: object) -> object:
            res = await real_exec(cmd)  # type: ignore[arg-type]
            link._went_down("firmware connection lost: test")  # before the answer arrives
            return res

        link.exec = exec_racing_a_break  # type: ignore[assignment,method-assign]
        r = await link.save_vhca_state(
            vf.vhca_id, mkey=buf.mkey, size=buf.length, set_track=True, callback=got.append
        )
        assert r.ok
        assert [(c.status, c.syndrome) for c in got] == [(CmdStatus.INT_ERR, Syndrome.ABORTED)]
        assert not link._waiting
    finally:
        await link.close()


async def test_close_while_down_ends_the_reconnect_loop(firmware: Restartable) -> None:
    link = await GrpcLink.connect(firmware.address)
    link.reconnect_backoff = (0.01, 0.05)
    await firmware.stop()
    await until(lambda: not link.up)
    await asyncio.sleep(0.2)  # a few attempts
    task = link._stream_task
    assert task is not None and not task.done()
    await link.close()
    assert task.done()
    await firmware.start()
    await asyncio.sleep(0.2)
    assert not link.up  # it did not come back after close()


async def test_auto_memory_falls_back_per_buffer_and_tries_shm_again(tmp_path: Path) -> None:
    """memory="auto": a shared memory failure makes that buffer remote; shared
    memory is tried again once shm_retry_s passed, and works if it can."""
    shm = tmp_path / "shm"
    r = Restartable(f"127.0.0.1:{free_port()}", shm_dir=str(shm))
    await r.start()
    link = await GrpcLink.connect(r.address, memory="auto", shm_dir=str(shm))
    link.shm_retry_s = 0.3
    try:
        assert isinstance(await link.alloc_buffer(4096), ByteBuffer)  # no directory: no sharing
        os.mkdir(shm)
        assert isinstance(await link.alloc_buffer(4096), ByteBuffer)  # not tried again yet
        await asyncio.sleep(0.35)
        assert isinstance(await link.alloc_buffer(4096), ShmBuffer)
        assert link.memory == "auto"
    finally:
        await link.close()
        await r.stop()
