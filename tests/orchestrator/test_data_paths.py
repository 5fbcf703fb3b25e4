"""The orchestrator's two data paths, end to end against driver processes
(tests/orchestrator/e2e_harness.py): user memory (MapUserMemory, ReadInto,
WriteFrom: no migration data over gRPC) and gRPC (Read, ReadStream, Write).

`data_path="auto"` takes user memory where a driver can map it and gRPC
where it cannot (a driver on another host; here, a driver looking in another
shm directory), per side; `"shm"` refuses to fall back; `"grpc"` never tries.
Each successful case compares the digests and the REINIT handling.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest
from e2e_harness import QUIET, Rig, Topology, options, rig

from benchmarks.procs import DRIVER, FWEMU, served
from driver.vfio.uapi import MigState
from fwemu.model.constants import MiB
from vfioclient.orchestrator import MigrationError, MigrationReport, migrate

pytestmark = pytest.mark.grpc

BOTH, GRPC = "shm", "grpc"
SOURCE_ONLY = "shm (source), grpc (destination)"


@pytest.fixture(name="topo", scope="module")
def topo_fixture() -> Iterator[tuple[Topology, Topology, Topology]]:
    """fwemu + three drivers: A and B look in /dev/shm (this host), C in a
    directory of its own (as a driver on another host would)."""
    with (
        tempfile.TemporaryDirectory() as elsewhere,
        served(FWEMU, "--vfs", "0", *QUIET) as (_, fw),
        served(DRIVER, "--firmware", fw, *QUIET) as (_, a),
        served(DRIVER, "--firmware", fw, *QUIET) as (_, b),
        served(DRIVER, "--firmware", fw, "--shm-dir", elsewhere, *QUIET) as (_, c),
    ):
        yield Topology(fw, a, b), Topology(fw, a, c), Topology(fw, c, a)


@contextlib.asynccontextmanager
async def rig_of(t: Topology) -> AsyncIterator[Rig]:
    async with rig(t) as r:
        yield r


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
    async with rig_of(topo[0]) as rg:
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
        async with rig_of(t) as rg:
            (p,) = await rg.pairs(1, size=2 * MiB)
            o = rg.digest_hook([p])
            r = await migrate([p.pair], o)
            check(r, rg, expected)


async def test_shm_refuses_a_driver_that_cannot_map(
    topo: tuple[Topology, Topology, Topology],
) -> None:
    """data_path="shm" with a destination on "another host" fails at setup,
    naming the cause, and leaves the source RUNNING."""
    async with rig_of(topo[1]) as rg:
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
    async with rig_of(topo[0]) as rg:
        (p,) = await rg.pairs(1, size=2 * MiB)
        o = rg.digest_hook([p])
        o.stream_depth, o.buffer_cap = stream_depth, 64 << 10
        r = await migrate([p.pair], o)
        check(r, rg, BOTH)
        assert r.precopy_bytes + r.stop_copy_bytes > 2 * MiB


async def test_multifd_over_user_memory(topo: tuple[Topology, Topology, Topology]) -> None:
    """Stop-copy packets hold their slots until written in index order."""
    async with rig_of(topo[0]) as rg:
        (p,) = await rg.pairs(1, size=2 * MiB, dirty_bytes_per_s=64 * MiB)
        o = rg.digest_hook([p])
        o.multifd_channels, o.stream_depth, o.buffer_cap = 3, 4, 8 << 10
        r = await migrate([p.pair], o)
        check(r, rg, BOTH)
        (dev,) = r.devices
        assert dev.multifd_packets > 4


async def test_unknown_data_path_is_refused(topo: tuple[Topology, Topology, Topology]) -> None:
    async with rig_of(topo[0]) as rg:
        (p,) = await rg.pairs(1)
        with pytest.raises(MigrationError, match="unknown data path"):
            await migrate([p.pair], options(data_path="carrier-pigeon"))
        assert await rg.src.get_state(p.pair.source_fd) == MigState.RUNNING
