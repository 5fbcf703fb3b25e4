"""The in-process rig of the migration tests: a firmware model with a live
workload behind a driver service on a loopback port, and two clients of it
(the source's "process" and the destination's).  `options` converge once
acked."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from driver.registry import DeviceRegistry
from driver.service.server import DriverServer
from driver.shards import pci_name
from fwemu.link.ifc import VfConfig
from fwemu.link.inproc import InProcessLink
from fwemu.model.clock import LoopClock
from fwemu.model.firmware import Firmware
from tests.support import tls_mode
from tests.support.vfioclient_usermem import record_user_memory
from vfioclient import VfioClient
from vfioclient.migration import DevicePair, MigrationOptions

WORKLOAD = {"size": 1 << 20, "dirty_bytes_per_s": 8 << 20}


def options(**kw: object) -> MigrationOptions:
    o = MigrationOptions(
        downtime_limit_s=0.3,
        bandwidth_estimate=100 << 20,  # 30 MiB under the limit: converges once acked
        max_precopy_iterations=2000,
        iteration_interval_s=0.002,
    )
    for k, v in kw.items():
        setattr(o, k, v)
    return o


@dataclass
class InProcessRig:
    fw: Firmware
    server: DriverServer
    target: str
    src: VfioClient  # the source's client ("process") ...
    dst: VfioClient  # ... and the destination's
    digests: list[tuple[str, str]] = field(default_factory=list)
    read: list[bytes] = field(default_factory=list)  # what the source read, in order
    written: list[bytes] = field(default_factory=list)  # what the destination wrote
    data_path: str = "auto"  # the MigrationOptions.data_path a test migrates with

    async def pair(self, **config: object) -> tuple[DevicePair, int, int]:
        """A source VF and a destination VF, opened; the pair and their vhca ids."""
        vfs = self.fw.create_vfs(2, VfConfig(**{**WORKLOAD, **config}))  # type: ignore[arg-type]
        await self.server.registry.refresh()
        s, d = vfs
        sfd = await self.src.open_device(pci_name(s.function_id))
        dfd = await self.dst.open_device(pci_name(d.function_id))
        return DevicePair(self.src, sfd, self.dst, dfd, name=f"vf{s.vhca_id}"), s.vhca_id, d.vhca_id

    def digest_hook(self, ids: list[tuple[int, int]]) -> MigrationOptions:
        async def loaded() -> None:
            self.digests.extend((self.fw.digest(s), self.fw.digest(d)) for s, d in ids)

        return options(on_destinations_loaded=loaded)

    def record_data(self) -> None:
        """Wrap the clients' read / read_stream / write and their user memory
        calls (each side's client is used by that side only) to record the
        data, in order."""
        src_read, src_stream, dst_write = self.src.read, self.src.read_stream, self.dst.write

        async def read(fd: int, count: int, **kw: Any) -> bytes:
            data = await src_read(fd, count, **kw)
            self.read.append(data)
            return data

        async def read_stream(fd: int, **kw: Any) -> AsyncIterator[bytes]:
            async for chunk in src_stream(fd, **kw):
                self.read.append(chunk)
                yield chunk

        async def write(fd: int, chunks: Any) -> int:
            # The migration streams a data fd's chunks through one call.
            assert not isinstance(chunks, bytes)

            async def recorded() -> AsyncIterator[bytes]:
                async for c in chunks:
                    self.written.append(c)
                    yield c

            return await dst_write(fd, recorded())

        self.src.read = read  # type: ignore[method-assign]
        self.src.read_stream = read_stream  # type: ignore[method-assign]
        self.dst.write = write  # type: ignore[method-assign]
        record_user_memory(
            self.src,
            self.dst,
            lambda _fd, b: self.read.append(b),
            lambda _fd, b: self.written.append(b),
        )


@contextlib.asynccontextmanager
async def in_process_rig(*, seed: int = 7, cmd_timeout: float = 5.0) -> AsyncIterator[InProcessRig]:
    fw = Firmware(LoopClock(), seed=seed)
    server = DriverServer(
        DeviceRegistry(InProcessLink(fw), cmd_timeout=cmd_timeout), roles=tls_mode.roles()
    )
    target = await tls_mode.start(server)
    # The library's clients take TLS from VFIO_TLS_* (the admin's in the mTLS pass).
    src = await VfioClient.connect(target)
    dst = await VfioClient.connect(target)
    try:
        yield InProcessRig(fw, server, target, src, dst)
    finally:
        await src.aclose()
        await dst.aclose()
        tls_mode.stopped(target)
        await server.stop(0)
