"""The devices of the mlx5vf tests: an environment (one firmware, one adapter,
one registry) and the registered VFs it makes, driven through the uAPI like
ioctls.  See the package docstring for the adapters and the clocks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from driver.mlx5.main import Mlx5VfDevice
from driver.mlx5.migf import Mlx5VfMigrationFile
from driver.registry import DeviceRegistry, Registered
from driver.vfio.device import VfioDevice
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
from fwemu.link.ifc import Fault, KiB, MiB, VfCaps, VfConfig
from fwemu.model import Firmware, LoopClock, VirtualClock
from tests.support.fwemu import open_link
from tests.support.mlx5.recording import Cmd, RecordingLink
from tests.support.vfio_fakes import GET, SET

S = MigState
T = TypeVar("T")

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
        self.core: VfioDevice = reg.core
        self.mvdev: Mlx5VfDevice = reg.mvdev
        self.vhca_id = vhca_id
        self.files: list[MigrationFile] = []  # the "fd table": fd = index

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


async def environments(adapter: str) -> AsyncIterator[Factory]:
    """The body of the `mlx5*` fixtures (tests/driver/mlx5/conftest.py): a
    factory of environments over `adapter`, all closed when it resumes."""
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
        link = RecordingLink(await open_link(fw, adapter, closers))
        registry = DeviceRegistry(link, cmd_timeout=cmd_timeout, max_chunk_size=max_chunk_size)
        env = Mlx5Env(adapter, fw, link, registry, virtual)
        envs.append(env)
        return env

    yield make
    for env in envs:
        await env.close()
    for close in reversed(closers):
        await close()
