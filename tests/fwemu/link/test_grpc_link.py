"""GrpcLink against a real server on 127.0.0.1: host memory modes, cleanup when
a client goes away, completions when the firmware goes away, rich errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from fwemu.api.v1 import scenario_pb2, scenario_pb2_grpc
from fwemu.demo import migrate_by_hand
from fwemu.link.base import ByteBuffer, LinkError
from fwemu.link.grpc import GrpcLink, ShmBuffer
from fwemu.link.ifc import CmdStatus, MiB, SaveCompletion, Syndrome, VfConfig
from fwemu.model import Firmware, VirtualClock
from fwemu.model.clock import LoopClock
from fwemu.service.server import FirmwareServer
from grpcsvc.errors import error_info


@pytest.fixture
async def server() -> AsyncIterator[tuple[Firmware, str]]:
    fw = Firmware(VirtualClock(), seed=3)
    srv = FirmwareServer(fw)
    port = await srv.start("127.0.0.1:0")
    yield fw, f"127.0.0.1:{port}"
    await srv.stop(0)


async def _save(link: GrpcLink, vhca: int, buf: ShmBuffer | ByteBuffer) -> SaveCompletion:
    done: asyncio.Future[SaveCompletion] = asyncio.get_running_loop().create_future()
    r = await link.save_vhca_state(
        vhca, mkey=buf.mkey, size=buf.length, set_track=True, callback=done.set_result
    )
    assert r.ok, r
    await link.advance_clock(1)
    return await asyncio.wait_for(done, 5)


async def test_shared_memory_buffers_see_images_without_any_transfer(
    server: tuple[Firmware, str],
) -> None:
    """On one host SAVE writes straight into the driver's shared memory."""
    fw, target = server
    link = await GrpcLink.connect(target, memory="shm")
    try:
        (vf,) = await link.create_vfs(1, VfConfig(size=256 * 1024, dirty_bytes_per_s=0))
        buf = await link.alloc_buffer(512 * 1024)
        assert isinstance(buf, ShmBuffer)
        c = await _save(link, vf.vhca_id, buf)
        assert c.status == 0 and c.actual_image_size > 256 * 1024
        assert bytes(buf.view[:4]) == b"VHCA"  # no dma_sync_for_cpu was needed
        assert bytes(fw.mkey_view(buf.mkey)[: c.actual_image_size]) == bytes(
            buf.view[: c.actual_image_size]
        )
    finally:
        await link.close()


async def test_remote_buffers_move_bytes_only_on_dma_sync(server: tuple[Firmware, str]) -> None:
    fw, target = server
    link = await GrpcLink.connect(target, memory="remote")
    try:
        (vf,) = await link.create_vfs(1, VfConfig(size=3 * MiB, dirty_bytes_per_s=0))
        buf = await link.alloc_buffer(4 * MiB)
        assert isinstance(buf, ByteBuffer)
        c = await _save(link, vf.vhca_id, buf)
        assert bytes(buf.view[:4]) == b"\0\0\0\0"
        await link.dma_sync_for_cpu(buf, 0, c.actual_image_size)
        assert bytes(buf.view[: c.actual_image_size]) == bytes(
            fw.mkey_view(buf.mkey)[: c.actual_image_size]
        )
        buf.view[:8] = b"ABCDEFGH"
        await link.dma_sync_for_device(buf, 0, 8)
        assert bytes(fw.mkey_view(buf.mkey)[:8]) == b"ABCDEFGH"
        with pytest.raises(LinkError):
            await link.dma_sync_for_cpu(ByteBuffer(buf.mkey, bytearray(8 * MiB)), 0, 8 * MiB)
    finally:
        await link.close()


@pytest.mark.parametrize("memory", ["shm", "remote"])
async def test_live_migration_by_hand_gives_equal_digests(memory: str) -> None:
    """The demo's firmware-level migration, on the real clock, in both memory modes."""
    fw = Firmware(LoopClock(), seed=5)
    srv = FirmwareServer(fw)
    port = await srv.start("127.0.0.1:0")
    link = await GrpcLink.connect(f"127.0.0.1:{port}", memory=memory)  # type: ignore[arg-type]
    try:
        src, dst = await link.create_vfs(
            2, VfConfig(size=2 * MiB, dirty_bytes_per_s=16 * MiB, save_latency_s=0.001)
        )
        rep = await migrate_by_hand(link, src.vhca_id, dst.vhca_id, iterations=4, interval=0.01)
        assert rep.equal and rep.init_seen >= 1
    finally:
        await link.close()
        await srv.stop(0)


async def test_a_client_going_away_frees_its_mkeys(server: tuple[Firmware, str]) -> None:
    fw, target = server
    link = await GrpcLink.connect(target)
    other = await GrpcLink.connect(target)
    try:
        await link.alloc_buffer(4096)
        await link.alloc_buffer(8192)
        kept = await other.alloc_buffer(4096)
        assert len(fw.mkeys) == 3
        await link.close()
        for _ in range(100):
            if len(fw.mkeys) == 1:
                break
            await asyncio.sleep(0.01)
        assert list(fw.mkeys) == [kept.mkey]
    finally:
        await other.close()


async def test_waiting_saves_complete_aborted_when_the_firmware_goes_away() -> None:
    fw = Firmware(VirtualClock(), seed=3)
    srv = FirmwareServer(fw)
    port = await srv.start("127.0.0.1:0")
    link = await GrpcLink.connect(f"127.0.0.1:{port}")
    try:
        (vf,) = await link.create_vfs(1, VfConfig(size=64 * 1024, save_latency_s=10))
        buf = await link.alloc_buffer(128 * 1024)
        done: asyncio.Future[SaveCompletion] = asyncio.get_running_loop().create_future()
        r = await link.save_vhca_state(
            vf.vhca_id, mkey=buf.mkey, size=buf.length, set_track=True, callback=done.set_result
        )
        assert r.ok
        await srv.stop(0)
        c = await asyncio.wait_for(done, 10)
        assert (c.status, c.syndrome) == (CmdStatus.INT_ERR, Syndrome.ABORTED)
    finally:
        await link.close()


async def test_connect_to_nothing_fails_clearly() -> None:
    with pytest.raises(LinkError, match="cannot reach the firmware"):
        await GrpcLink.connect("127.0.0.1:1", timeout=5)


async def test_scenario_errors_carry_error_info(server: tuple[Firmware, str]) -> None:
    _, target = server
    async with grpc.aio.insecure_channel(target) as ch:
        stub = scenario_pb2_grpc.ScenarioStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.GetDigest(scenario_pb2.GetDigestRequest(vhca_id=77))
        info = error_info(e.value)
        assert info.code == grpc.StatusCode.NOT_FOUND
        assert (info.reason, info.domain) == ("NO_SUCH_VF", "fwemu.emulator")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ApplyScenario(scenario_pb2.ApplyScenarioRequest(text="vfs: 3"))
        info = error_info(e.value)
        assert info.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.reason == "INVALID_SCENARIO" and "vfs" in info.message


async def test_advancing_a_real_clock_is_refused() -> None:
    srv = FirmwareServer(Firmware(LoopClock()))
    port = await srv.start("127.0.0.1:0")
    link = await GrpcLink.connect(f"127.0.0.1:{port}")
    try:
        with pytest.raises(LinkError, match="real clock"):
            await link.advance_clock(1)
    finally:
        await link.close()
        await srv.stop(0)
