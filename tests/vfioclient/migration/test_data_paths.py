"""The orchestrator's two data paths, end to end against driver processes
(tests/support/vfioclient_e2e.py): user memory (MapUserMemory, ReadInto,
WriteFrom: no migration data over gRPC) and gRPC (Read, ReadStream, Write).

`data_path="auto"` takes user memory where a driver can map it and gRPC
where it cannot (a driver on another host; here, a driver looking in another
shm directory), per side; `"shm"` refuses to fall back; `"grpc"` never tries.
Each successful case compares the digests and the REINIT handling.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from driver.vfio.uapi import MigState
from fwemu.link.ifc import MiB
from grpcsvc.spawn import DRIVER, FWEMU
from tests.support.tls_mode import firmware_link_args, served
from tests.support.vfioclient_e2e import QUIET, Rig, Topology, options, rig
from vfioclient.migration import MigrationError, MigrationReport, migrate

pytestmark = pytest.mark.grpc

BOTH, GRPC = "shm", "grpc"
SOURCE_ONLY = "shm (source), grpc (destination)"


@pytest.fixture(name="topo", scope="module")
def topo_fixture() -> Iterator[tuple[Topology, Topology, Topology]]:
    """fwemu + three drivers: A and B look in /dev/shm (this host), C in a
    directory of its own (as a driver on another host would)."""
    link = firmware_link_args()
    with (
        tempfile.TemporaryDirectory() as elsewhere,
        served(FWEMU, "--vfs", "0", *QUIET) as (_, fw),
        served(DRIVER, "--firmware", fw, *QUIET, *link) as (_, a),
        served(DRIVER, "--firmware", fw, *QUIET, *link) as (_, b),
        served(DRIVER, "--firmware", fw, "--shm-dir", elsewhere, *QUIET, *link) as (_, c),
    ):
        yield Topology(fw, a, b), Topology(fw, a, c), Topology(fw, c, a)


def shm_files() -> set[str]:
    """This process's segments in /dev/shm."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"vfioclient-{os.getpid()}-")}


def check(r: MigrationReport, rg: Rig, data_path: str) -> None:
    assert r.status == "completed", r.error
    (dev,) = r.devices
    assert dev.data_path == data_path
    assert dev.precopy_bytes > 0 and dev.stop_copy_bytes > 0
    (digests,) = rg.digests
    assert digests[0] == digests[1] != ""


@pytest.mark.parametrize(("mode", "expected"), [("auto", BOTH), ("shm", BOTH), ("grpc", GRPC)])
async def test_reinit_at_first_ack_on_each_data_path(
    topo: tuple[Topology, Topology, Topology], mode: str, expected: str
) -> None:
    """Source and destination drivers on this host: a REINIT at the first
    ack is handled the same on both paths; nothing is left in /dev/shm."""
    assert shm_files() == set()
    async with rig(topo[0]) as rg:
        (p,) = await rg.pairs(1, size=4 * MiB)
        o = rg.digest_hook([p])
        o.data_path = mode
        rg.reconfigure_on_first_ack({p.pair.name: p.src_vhca}, o)
        r = await migrate([p.pair], o)
        check(r, rg, expected)
        (ev,) = r.reinits
        assert ev.handling == "ack re-armed"
        assert await rg.dst.get_state(p.pair.destination_fd) == MigState.RUNNING
    assert shm_files() == set()


async def test_auto_falls_back_per_side(topo: tuple[Topology, Topology, Topology]) -> None:
    """A destination driver that cannot map our memory: the source side
    still reads into it, the destination gets the bytes on a Write call;
    a source driver that cannot: everything over gRPC."""
    for t, expected in ((topo[1], SOURCE_ONLY), (topo[2], GRPC)):
        async with rig(t) as rg:
            (p,) = await rg.pairs(1, size=2 * MiB)
            o = rg.digest_hook([p])
            r = await migrate([p.pair], o)
            check(r, rg, expected)


async def test_shm_refuses_a_driver_that_cannot_map(
    topo: tuple[Topology, Topology, Topology],
) -> None:
    """data_path="shm" with a destination on "another host" fails at setup,
    naming the cause, and leaves the source RUNNING."""
    async with rig(topo[1]) as rg:
        (p,) = await rg.pairs(1)
        with pytest.raises(MigrationError, match="cannot map our user memory"):
            await migrate([p.pair], options(data_path="shm"))
        assert await rg.src.get_state(p.pair.source_fd) == MigState.RUNNING


@pytest.mark.parametrize("stream_depth", [1, 2])
async def test_few_slots_bound_the_data_in_flight(
    topo: tuple[Topology, Topology, Topology], stream_depth: int
) -> None:
    """Two slots (the least) of 64 KiB for a 2 MiB VF: the source waits for
    the destination to give slots back, and the stream is whole."""
    async with rig(topo[0]) as rg:
        (p,) = await rg.pairs(1, size=2 * MiB)
        o = rg.digest_hook([p])
        o.stream_depth, o.buffer_cap = stream_depth, 64 << 10
        r = await migrate([p.pair], o)
        check(r, rg, BOTH)
        assert r.precopy_bytes + r.stop_copy_bytes > 2 * MiB


async def test_multifd_over_user_memory(topo: tuple[Topology, Topology, Topology]) -> None:
    """Stop-copy packets hold their slots until written in index order."""
    async with rig(topo[0]) as rg:
        (p,) = await rg.pairs(1, size=2 * MiB, dirty_bytes_per_s=64 * MiB)
        o = rg.digest_hook([p])
        o.multifd_channels, o.stream_depth, o.buffer_cap = 3, 4, 8 << 10
        r = await migrate([p.pair], o)
        check(r, rg, BOTH)
        (dev,) = r.devices
        assert dev.multifd_packets > 4


async def test_unknown_data_path_is_refused(topo: tuple[Topology, Topology, Topology]) -> None:
    async with rig(topo[0]) as rg:
        (p,) = await rg.pairs(1)
        with pytest.raises(MigrationError, match="unknown data path"):
            await migrate([p.pair], options(data_path="carrier-pigeon"))
        assert await rg.src.get_state(p.pair.source_fd) == MigState.RUNNING


@pytest.mark.parametrize("mode", ["shm", "grpc"])
async def test_a_save_failing_in_stop_copy_fails_the_migration_cleanly(
    topo: tuple[Topology, Topology, Topology], mode: str
) -> None:
    """Once the first stop-copy bytes have arrived, every further SAVE of the
    source fails (chunk mode: one SAVE per 256 KiB piece).  The reads ahead
    get the error (in band on the shm path, as the stream's status on the
    gRPC one): the migration fails naming it, without hanging, the source
    runs again and the destination is reset; without the fault the pair
    then migrates."""
    async with rig(topo[0]) as rg:
        (p,) = await rg.pairs(1, size=32 * MiB, chunk_size=256 << 10, dirty_bytes_per_s=0)
        armed: list[int] = []
        inner = rg.src.read_into_stream if mode == "shm" else rg.src.read_stream

        async def arm() -> None:
            if not armed:
                armed.append(
                    await rg.scenario.inject_fault(
                        p.src_vhca, "fail", opcode="SAVE_VHCA_STATE", count=1000,
                        in_completion=True,
                    )
                )  # fmt: skip

        if mode == "shm":

            def read_into_stream(fd: int) -> object:
                # The stop-copy's call (its reads go in batches; the
                # precopy's one by one on a call of its own).
                call = inner(fd)
                result, submit_many = call.result, call.submit_many  # type: ignore[attr-defined]
                batches: list[int] = []

                async def submit_many_(spans: list[tuple[int, int]]) -> None:
                    # Armed as the first reads go out (a batch may read
                    # every piece already saved before its answer comes).
                    batches.append(len(spans))
                    await submit_many(spans)
                    await arm()

                async def result_() -> int | None:
                    n: int | None = await result()
                    if batches:
                        await arm()
                    return n

                call.result, call.submit_many = result_, submit_many_  # type: ignore[attr-defined]
                return call

            rg.src.read_into_stream = read_into_stream  # type: ignore[assignment,method-assign]
        else:

            async def read_stream(fd: int, **kw: object) -> AsyncIterator[bytes]:
                async for chunk in inner(fd, **kw):  # type: ignore[operator]
                    await arm()
                    yield chunk

            rg.src.read_stream = read_stream  # type: ignore[assignment,method-assign]
        o = options(data_path=mode, bandwidth_estimate=1 << 30)
        with pytest.raises(MigrationError) as e:
            await asyncio.wait_for(migrate([p.pair], o), 30)
        assert armed
        r = e.value.report
        assert r is not None and r.status == "failed" and r.stop_copy_bytes > 0
        assert "ENODEV" in str(e.value) or "EIO" in str(e.value), e.value
        assert await rg.src.get_state(p.pair.source_fd) == MigState.RUNNING
        assert await rg.dst.get_state(p.pair.destination_fd) == MigState.RUNNING
        await rg.scenario.clear_faults(p.src_vhca)
        o = rg.digest_hook([p])
        o.data_path, o.bandwidth_estimate = mode, 1 << 30  # 32 MiB fits the downtime
        r = await migrate([p.pair], o)
        check(r, rg, mode)
        assert r.converged


async def test_the_stop_copy_moves_in_batches_of_reads_and_writes(
    topo: tuple[Topology, Topology, Topology],
) -> None:
    """Each read(2) and write(2) of the stop-copy stays one call of at most a
    buffer, but they travel several to a message: the source asks for a
    quarter of its slots' reads in one ReadIntoStream request (several such
    requests in flight), and the destination writes up to as many slots
    queued behind the one it takes in one WriteFromStream request.  The
    stream is whole (the digests agree) and every chunk is one operation."""
    async with rig(topo[0]) as rg:
        # A guest dirtying fast: the stop-copy is most of the 2 MiB.
        (p,) = await rg.pairs(1, size=2 * MiB, dirty_bytes_per_s=256 * MiB)
        o = rg.digest_hook([p])
        o.buffer_cap = 64 << 10  # many chunks
        reads: list[int] = []  # operations per ReadIntoStream request
        writes: list[int] = []  # per WriteFromStream request
        read_stream, write_stream = rg.src.read_into_stream, rg.dst.write_from_stream

        def counting_reads(fd: int) -> object:
            call = read_stream(fd)
            one, many = call.submit, call.submit_many

            async def submit(addr: int, count: int, **kw: bool) -> None:
                reads.append(1)
                await one(addr, count, **kw)

            async def submit_many(spans: list[tuple[int, int]]) -> None:
                reads.append(len(spans))
                await many(spans)

            call.submit, call.submit_many = submit, submit_many  # type: ignore[method-assign]
            return call

        def slow_writes(fd: int) -> object:
            call = write_stream(fd)
            one, many = call.submit, call.submit_many

            async def submit(addr: int, count: int) -> None:
                writes.append(1)
                await one(addr, count)

            async def submit_many(spans: list[tuple[int, int]]) -> None:
                writes.append(len(spans))
                await asyncio.sleep(0.02)  # a slow destination: the stream queues behind it
                await many(spans)

            call.submit, call.submit_many = submit, submit_many  # type: ignore[method-assign]
            return call

        rg.src.read_into_stream = counting_reads  # type: ignore[method-assign,assignment]
        rg.dst.write_from_stream = slow_writes  # type: ignore[method-assign,assignment]
        r = await migrate([p.pair], o)
        check(r, rg, BOTH)
        chunks = -(-r.stop_copy_bytes // (64 << 10))
        assert chunks >= 16, r.stop_copy_bytes
        assert sum(reads) >= chunks + 1  # every chunk, and the read that returned 0
        assert max(reads) == o.stream_depth // 4 and len(reads) < sum(reads) / 2
        assert 2 <= max(writes) <= o.stream_depth // 4 and sum(writes) >= chunks
