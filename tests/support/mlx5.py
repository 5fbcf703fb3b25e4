"""Shared harness of the mlx5vf behaviour tests (tests/driver/mlx5/).

Devices are built the way driver/registry.py builds them: a `Firmware` model,
a firmware link, a `DeviceRegistry(link)` and `refresh()`.  The same tests run
against both firmware adapters behind the one FirmwareLink interface (the
`mlx5` fixture is parametrized):

* ``inproc``: `InProcessLink(Firmware(clock))`;
* ``grpc``: a real `FirmwareServer(fw)` on 127.0.0.1:0 reached with
  `GrpcLink.connect(...)`, whose completion stream drives the driver's SAVE
  callbacks (host memory: shared memory the firmware maps);
* ``grpc-remote`` (only the `mlx5_wide` fixture, for the tests that move whole
  streams): the same with the firmware holding host memory, so the driver's
  dma_sync_for_cpu / dma_sync_for_device really move the image bytes.

Between the driver and the adapter sits a `RecordingLink` that records every
firmware command mlx5vf issues (and the answer), so the arc -> command tables
of the reference (§5.7) can be checked; everything else about the firmware is
observed through the link's scenario side (get_vf, digest), in both modes.

The uAPI is driven like ioctls: `VfioDevice.device_feature(argsz, flags, data,
user=UserMemory({}), install_fd=...)` with the struct layouts of
driver/vfio/uapi.py, and the data files with read/write/ioctl/release.

tests/driver/conftest.py registers the fixtures (`mlx5`, `mlx5_wide`,
`mlx5_inproc`).

Clocks: `mlx5()` runs the firmware on the event loop's clock (SAVEs complete
by themselves after their latency); `mlx5("virtual")` on a VirtualClock, where a
SAVE stays in flight until the test moves the clock (`env.advance`,
`env.settle`, or `set_state`, which moves it by 0 while an arc waits).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from driver.mlx5.main import Mlx5VfDevice
from driver.mlx5.migf import Mlx5VfMigrationFile
from driver.registry import DeviceRegistry, Registered
from driver.vfio.device import VfioDevice
from driver.vfio.errors import VfioError
from driver.vfio.ops import MigrationFile
from driver.vfio.uapi import (
    FEATURE_HEADER,
    MIG_DATA_SIZE,
    MIG_STATE,
    MIGRATION,
    PRECOPY_INFO,
    VFIO_MIG_GET_PRECOPY_INFO,
    Feature,
    MigState,
)
from driver.vfio.usermem import UserMemory
from fwemu.link.ifc import Fault, KiB, MiB, SaveCompletion, VfCaps, VfConfig
from fwemu.link.inproc import InProcessLink
from fwemu.model import Firmware, LoopClock, VirtualClock
from tests.support.vfio_fakes import GET, P2P, PRE, PROBE, SC, SET, raises_errno

S = MigState
T = TypeVar("T")

# Stream records (struct mlx5_vf_migration_header): le64 size, le32 flags, le32 tag
REC_HEADER = struct.Struct("<QII")
TAG_FW_DATA = 0
TAG_STOP_COPY_SIZE = 1
FLAG_OPTIONAL = 1
STOP_COPY_SIZE_RECORD = 24  # header {8, OPTIONAL, 1} + le64
IMAGE_HEADER = 52  # the emulated firmware's image header, before its payload

ADAPTERS = [
    pytest.param("inproc", id="inproc"),
    pytest.param("grpc", id="grpc", marks=pytest.mark.grpc),
]
REMOTE = pytest.param("grpc-remote", id="grpc-remote", marks=pytest.mark.grpc)

# How long the harness waits for something that must happen (real seconds).
WAIT_S = 10.0


def pages(n: int) -> int:
    return -(-n // 4096) * 4096


def vf_config(
    size: int = 64 * KiB,
    *,
    dirty: int = 0,
    chunks: bool = False,
    chunk_size: int = 8 * MiB,
    mig_state: bool = True,
    latency: float = 0.0,
    bandwidth: int = 0,
    reconfig_bytes: int = 16 * KiB,
    seed: int | None = None,
    **caps: bool,
) -> VfConfig:
    """A small VF; `chunks` is cap_2.migration_in_chunks (off by default here,
    so image sizes are whole), other caps as keywords."""
    return VfConfig(
        size=size,
        seed=seed,
        dirty_bytes_per_s=dirty,
        save_bandwidth=bandwidth,
        save_latency_s=latency,
        chunk_size=chunk_size,
        reconfig_bytes=reconfig_bytes,
        caps=VfCaps(migration_in_chunks=chunks, migration_state=mig_state, **caps),
    )


# --------------------------------------------------------------------------------------
# The link between the driver and the adapter: records the firmware commands
# --------------------------------------------------------------------------------------


@dataclass
class Cmd:
    """One firmware command mlx5vf issued, with its answer."""

    name: str  # QUERY, SAVE, LOAD, SUSPEND, RESUME, FLR
    vhca_id: int
    args: dict[str, Any]
    result: Any = None
    completion: SaveCompletion | None = None

    @property
    def brief(self) -> tuple[Any, ...]:
        """(name, the fields that tell the commands of §5.7 apart)."""
        a = self.args
        if self.name in ("SUSPEND", "RESUME"):
            return (self.name, a["op_mod"])
        if self.name == "QUERY":
            return (self.name, int(a["incremental"]))
        if self.name == "SAVE":
            return (self.name, int(a["incremental"]), int(a["set_track"]))
        return (self.name,)


class RecordingLink:
    """A FirmwareLink + ScenarioLink that forwards to `inner` and records every
    firmware command (scenario calls and host memory pass through unrecorded)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.cmds: list[Cmd] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def query_vhca_migration_state(self, vhca_id: int, **kw: Any) -> Any:
        cmd = Cmd("QUERY", vhca_id, kw)
        self.cmds.append(cmd)
        cmd.result = await self.inner.query_vhca_migration_state(vhca_id, **kw)
        return cmd.result

    async def save_vhca_state(self, vhca_id: int, *, callback: Any, **kw: Any) -> Any:
        cmd = Cmd("SAVE", vhca_id, kw)
        self.cmds.append(cmd)

        def on_completion(c: SaveCompletion) -> None:
            cmd.completion = c
            callback(c)

        cmd.result = await self.inner.save_vhca_state(vhca_id, callback=on_completion, **kw)
        return cmd.result

    async def load_vhca_state(self, vhca_id: int, **kw: Any) -> Any:
        cmd = Cmd("LOAD", vhca_id, kw)
        self.cmds.append(cmd)
        cmd.result = await self.inner.load_vhca_state(vhca_id, **kw)
        return cmd.result

    async def suspend_vhca(self, vhca_id: int, *, op_mod: int) -> Any:
        cmd = Cmd("SUSPEND", vhca_id, {"op_mod": op_mod})
        self.cmds.append(cmd)
        cmd.result = await self.inner.suspend_vhca(vhca_id, op_mod=op_mod)
        return cmd.result

    async def resume_vhca(self, vhca_id: int, *, op_mod: int) -> Any:
        cmd = Cmd("RESUME", vhca_id, {"op_mod": op_mod})
        self.cmds.append(cmd)
        cmd.result = await self.inner.resume_vhca(vhca_id, op_mod=op_mod)
        return cmd.result

    async def function_level_reset(self, vhca_id: int) -> Any:
        cmd = Cmd("FLR", vhca_id, {})
        self.cmds.append(cmd)
        cmd.result = await self.inner.function_level_reset(vhca_id)
        return cmd.result


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Info:
    """struct vfio_precopy_info as the ioctl returned it."""

    argsz: int
    flags: int
    initial_bytes: int
    dirty_bytes: int


class Dev:
    """One registered VF (core + mvdev) and uAPI calls on it."""

    def __init__(self, env: Mlx5Env, reg: Registered, vhca_id: int) -> None:
        self.env = env
        self.reg = reg
        self.vhca_id = vhca_id
        self.files: list[MigrationFile] = []  # the "fd table": fd = index

    @property
    def core(self) -> VfioDevice:
        return self.reg.core

    @property
    def mvdev(self) -> Mlx5VfDevice:
        return self.reg.mvdev

    @property
    def saving_migf(self) -> Mlx5VfMigrationFile:
        migf = self.mvdev.saving_migf
        assert migf is not None, "no saving file"
        return migf

    def _install(self, f: MigrationFile) -> int:
        self.files.append(f)
        return len(self.files) - 1

    async def feature(
        self, flags: int, data: bytes | bytearray = b"", argsz: int | None = None
    ) -> bytes:
        """VFIO_DEVICE_FEATURE with header {argsz, flags} and arg->data = data."""
        if argsz is None:
            argsz = FEATURE_HEADER.size + len(data)
        out: bytes = await self.core.device_feature(
            argsz, flags, data, user=UserMemory({}), install_fd=self._install
        )
        return out

    async def migration_flags(self) -> int:
        out = await self.feature(GET | Feature.MIGRATION, bytes(MIGRATION.size))
        return int(MIGRATION.unpack(out)[0])

    async def get_state(self) -> MigState:
        out = await self.feature(GET | Feature.MIG_DEVICE_STATE, MIG_STATE.pack(0, 0))
        state, fd = MIG_STATE.unpack(out)
        assert fd == -1
        return MigState(state)

    async def set_state_raw(self, state: int, data: bytearray | None = None) -> tuple[int, int]:
        buf = data if data is not None else bytearray(MIG_STATE.pack(state, 0))
        out = await self.feature(SET | Feature.MIG_DEVICE_STATE, buf)
        st, fd = MIG_STATE.unpack(out)
        return st, fd

    async def set_state(self, state: MigState, *, drive: bool = True) -> Any:
        """MIG_DEVICE_STATE SET; returns the new data file (or None).  On a
        virtual clock the clock is moved (by 0) while the arc waits for a SAVE
        to complete, unless `drive` is False."""
        if drive:
            st, fd = await self.env.drive(self.set_state_raw(state))
        else:
            st, fd = await self.set_state_raw(state)
        assert st == state
        return self.files[fd] if fd >= 0 else None

    async def walk(self, *states: MigState) -> Any:
        """Several SETs in a row; the last data file produced."""
        f = None
        for st in states:
            f = await self.set_state(st) or f
        return f

    async def data_size(self) -> int:
        out = await self.feature(GET | Feature.MIG_DATA_SIZE, bytes(MIG_DATA_SIZE.size))
        return int(MIG_DATA_SIZE.unpack(out)[0])

    async def opt_in_v2(self) -> None:
        assert await self.feature(SET | Feature.MIG_PRECOPY_INFOv2) == b""

    # firmware side of this VF
    async def vf(self) -> Any:
        return await self.env.link.get_vf(self.vhca_id)

    async def digest(self) -> str:
        return str(await self.env.link.digest(self.vhca_id))

    def cmds(self, since: int = 0) -> list[Cmd]:
        return [c for c in self.env.link.cmds[since:] if c.vhca_id == self.vhca_id]

    def mark(self) -> int:
        return len(self.env.link.cmds)


async def precopy_info(file: Any, flags: int = 0, argsz: int = PRECOPY_INFO.size) -> Info:
    """VFIO_MIG_GET_PRECOPY_INFO on a saving data file."""
    out = await file.ioctl(VFIO_MIG_GET_PRECOPY_INFO, PRECOPY_INFO.pack(argsz, flags, 0, 0))
    assert len(out) == PRECOPY_INFO.size
    return Info(*PRECOPY_INFO.unpack(out))


@dataclass(eq=False)
class Mlx5Env:
    """One firmware, one adapter, one registry."""

    adapter: str
    fw: Firmware
    link: RecordingLink
    registry: DeviceRegistry
    virtual: bool
    devs: list[Dev] = field(default_factory=list)

    async def devices(self, count: int = 1, config: VfConfig | None = None) -> list[Dev]:
        """New VFs, probed by the registry and opened."""
        infos = await self.link.create_vfs(count, config or vf_config())
        regs = await self.registry.refresh()
        out = []
        for info in infos:
            [reg] = [r for r in regs if r.mvdev.function_id == info.function_id]
            dev = Dev(self, reg, info.vhca_id)
            await dev.core.open()
            self.devs.append(dev)
            out.append(dev)
        return out

    async def device(self, config: VfConfig | None = None, **kw: Any) -> Dev:
        [dev] = await self.devices(1, config or vf_config(**kw))
        return dev

    async def advance(self, seconds: float = 0.0) -> None:
        """Move the firmware's virtual clock (a no-op on the real clock)."""
        if self.virtual:
            await self.link.advance_clock(seconds)

    async def wait_until(self, cond: Callable[[], bool], what: str = "condition") -> None:
        """Poll `cond` (moving a virtual clock by 0 each time, so completions
        due now are delivered) until it holds."""
        deadline = time.monotonic() + WAIT_S
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await self.advance(0)
            await asyncio.sleep(0.002)

    async def drive(self, aw: Awaitable[T]) -> T:
        """Await `aw`, moving a virtual clock by 0 meanwhile so that SAVEs it
        waits for complete (on the real clock they complete by themselves)."""
        task = asyncio.ensure_future(aw)
        if not self.virtual:
            return await task
        deadline = time.monotonic() + WAIT_S
        while not task.done():
            if time.monotonic() > deadline:
                task.cancel()
                raise AssertionError("timed out driving the virtual clock")
            await self.advance(0)
            await asyncio.wait({task}, timeout=0.002)
        return task.result()

    async def settle(self, dev: Dev) -> None:
        """Let the SAVE in flight on the device's saving file complete."""
        migf = dev.mvdev.saving_migf
        if migf is None:
            return
        await self.wait_until(
            lambda: not migf.inflight_save and not migf.save_comp.locked(), "the SAVE to complete"
        )

    async def inject(self, dev: Dev, fault: Fault) -> int:
        return int(await self.link.inject_fault(dev.vhca_id, fault))

    async def reconfigure(self, dev: Dev, objects: list[tuple[str, int]] | None = None) -> None:
        await self.link.reconfigure(dev.vhca_id, objects)

    async def fw_query(self, dev: Dev, *, incremental: bool, chunk: bool) -> Any:
        """QUERY_VHCA_MIGRATION_STATE sent by the test, not the driver (looking
        never changes the VF; with chunk=1 it arms chunk mode as mlx5vf does)."""
        res = await self.link.inner.query_vhca_migration_state(
            dev.vhca_id, incremental=incremental, chunk=chunk
        )
        assert res.ok, res
        return res

    async def close(self) -> None:
        for dev in self.devs:
            # A reset first: its FLR aborts a SAVE held in flight on a virtual
            # clock, which close_device (disable_fds) would otherwise wait for.
            while dev.core.open_count:
                if dev.mvdev.migratable:
                    await asyncio.wait_for(dev.core.reset(), WAIT_S)
                await asyncio.wait_for(dev.core.close(), WAIT_S)


Factory = Callable[..., Awaitable[Mlx5Env]]


async def _factory(adapter: str) -> AsyncIterator[Factory]:
    closers: list[Callable[[], Awaitable[None]]] = []
    envs: list[Mlx5Env] = []

    async def make(
        clock: str = "loop",
        *,
        max_chunk_size: int = 8 * MiB,
        seed: int = 1,
        cmd_timeout: float = WAIT_S,
    ) -> Mlx5Env:
        virtual = clock == "virtual"
        fw = Firmware(VirtualClock() if virtual else LoopClock(), seed=seed)
        inner: Any
        if adapter == "inproc":
            inner = InProcessLink(fw)
        else:
            from fwemu.link.grpc import GrpcLink
            from fwemu.service.server import FirmwareServer

            server = FirmwareServer(fw)
            port = await server.start("127.0.0.1:0")
            closers.append(lambda: server.stop(0))
            memory = "remote" if adapter == "grpc-remote" else "auto"
            inner = await GrpcLink.connect(f"127.0.0.1:{port}", memory=memory)
        closers.append(inner.close)
        link = RecordingLink(inner)
        registry = DeviceRegistry(link, cmd_timeout=cmd_timeout, max_chunk_size=max_chunk_size)
        env = Mlx5Env(adapter, fw, link, registry, virtual)
        envs.append(env)
        return env

    yield make
    for env in envs:
        await env.close()
    for close in reversed(closers):
        await close()


@pytest.fixture(params=ADAPTERS, name="mlx5")
async def mlx5_fixture(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    """Factory of environments over the parametrized adapter:
    `env = await mlx5(clock="loop" | "virtual", max_chunk_size=..., seed=...,
    cmd_timeout=...)` (cmd_timeout: when the driver gives up on a SAVE
    completion, as mlx5_cmd_exec_cb does)."""
    async for make in _factory(request.param):
        yield make


@pytest.fixture(name="mlx5_inproc")
async def mlx5_inproc_fixture() -> AsyncIterator[Factory]:
    """The `mlx5` factory over the in-process firmware only (tests that make
    many devices and look at the driver, not the adapter)."""
    async for make in _factory("inproc"):
        yield make


@pytest.fixture(params=[*ADAPTERS, REMOTE], name="mlx5_wide")
async def mlx5_wide_fixture(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    """The `mlx5` factory plus a third adapter, ``grpc-remote``: the firmware
    holds host memory, so the driver's dma_sync_for_cpu / dma_sync_for_device
    really move the image bytes (for the tests that move whole streams)."""
    async for make in _factory(request.param):
        yield make


# --------------------------------------------------------------------------------------
# Data streams
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    size: int
    flags: int
    tag: int
    payload: bytes
    offset: int  # of the record header in the stream


def parse_stream(stream: bytes) -> list[Record]:
    """Split a saving stream into records; the stream must end on a record."""
    out = []
    pos = 0
    while pos < len(stream):
        assert pos + REC_HEADER.size <= len(stream), f"torn record header at {pos}"
        size, flags, tag = REC_HEADER.unpack_from(stream, pos)
        end = pos + REC_HEADER.size + size
        assert end <= len(stream), f"record at {pos} of {size} bytes runs past the stream"
        out.append(Record(size, flags, tag, bytes(stream[pos + REC_HEADER.size : end]), pos))
        pos = end
    return out


def record(payload: bytes, *, tag: int = TAG_FW_DATA, flags: int = 0) -> bytes:
    return REC_HEADER.pack(len(payload), flags, tag) + payload


async def read_available(file: Any, count: int = 1 << 20) -> bytes:
    """Non-blocking reads until the temporary end of a PRE_COPY stream (ENOMSG)."""
    out = bytearray()
    while True:
        try:
            chunk = await file.read(count, nonblock=True)
        except VfioError as e:
            if e.errno == errno.ENOMSG:
                return bytes(out)
            raise
        assert chunk, "b'' in PRE_COPY"
        out += chunk


async def precopy_with_dirt(env: Mlx5Env, dev: Dev, seconds: float = 0.02) -> Any:
    """RUNNING -> PRE_COPY, its initial data read, then `seconds` of the VF's
    workload (a virtual clock moved): the saving file, with dirt to report."""
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await read_available(f)
    await env.advance(seconds)
    return f


async def read_to_eof(env: Mlx5Env, file: Any, count: int = 1 << 20) -> bytes:
    """Read a STOP_COPY stream to its end (b''), moving a virtual clock when
    the data is not there yet (EAGAIN)."""
    out = bytearray()
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            chunk = await file.read(count, nonblock=True)
        except VfioError as e:
            if e.errno != errno.EAGAIN:
                raise
            assert time.monotonic() < deadline, "stop-copy data never came"
            await env.advance(0)
            await asyncio.sleep(0.001)
            continue
        if not chunk:
            return bytes(out)
        out += chunk


async def write_all(file: Any, stream: bytes, cuts: list[int] | None = None) -> None:
    """Write `stream` in the pieces `cuts` makes (offsets), each fully taken."""
    bounds = [0, *sorted(set(c for c in cuts or [] if 0 < c < len(stream))), len(stream)]
    for a, b in itertools.pairwise(bounds):
        assert await file.write(stream[a:b]) == b - a


async def migrate_stopped(env: Mlx5Env, src: Dev) -> bytes:
    """RUNNING -> STOP -> STOP_COPY, read to EOF, -> STOP: the whole stream."""
    await src.set_state(S.STOP)
    f = await src.set_state(S.STOP_COPY)
    stream = await read_to_eof(env, f)
    await src.set_state(S.STOP)
    return stream


async def load_stream(dst: Dev, stream: bytes, cuts: list[int] | None = None) -> None:
    """RUNNING -> STOP -> RESUMING, write, -> STOP."""
    await dst.set_state(S.STOP)
    f = await dst.set_state(S.RESUMING)
    await write_all(f, stream, cuts)
    await dst.set_state(S.STOP)


async def pre_copy_stream(env: Mlx5Env, src: Dev, rounds: int = 2) -> tuple[bytes, str]:
    """A whole migration stream of `src` (which should have a workload):
    PRE_COPY with `rounds` incremental images, then PRE_COPY_P2P, STOP_COPY,
    read to EOF, STOP.  Returns (stream, the stopped source's digest)."""
    f = await src.set_state(S.PRE_COPY)
    await env.settle(src)
    stream = bytearray(await read_available(f))
    for _ in range(rounds):
        await (env.advance(0.02) if env.virtual else asyncio.sleep(0.02))
        await env.drive(f.ioctl(VFIO_MIG_GET_PRECOPY_INFO, PRECOPY_INFO.pack(24, 0, 0, 0)))
        await env.settle(src)
        stream += await read_available(f)
    await (env.advance(0.02) if env.virtual else asyncio.sleep(0.02))  # dirt for the final image
    await src.set_state(S.PRE_COPY_P2P)
    await src.set_state(S.STOP_COPY)
    stream += await read_to_eof(env, f)
    await src.set_state(S.STOP)
    return bytes(stream), await src.digest()


__all__ = [
    "ADAPTERS",
    "FLAG_OPTIONAL",
    "GET",
    "IMAGE_HEADER",
    "P2P",
    "PRE",
    "PROBE",
    "REC_HEADER",
    "SC",
    "SET",
    "STOP_COPY_SIZE_RECORD",
    "TAG_FW_DATA",
    "TAG_STOP_COPY_SIZE",
    "Cmd",
    "Dev",
    "Info",
    "Mlx5Env",
    "Record",
    "RecordingLink",
    "S",
    "load_stream",
    "migrate_stopped",
    "mlx5_fixture",
    "mlx5_inproc_fixture",
    "mlx5_wide_fixture",
    "pages",
    "parse_stream",
    "pre_copy_stream",
    "precopy_info",
    "precopy_with_dirt",
    "raises_errno",
    "read_available",
    "read_to_eof",
    "record",
    "vf_config",
    "write_all",
]
