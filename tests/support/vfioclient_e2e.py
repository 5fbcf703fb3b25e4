"""Services as real processes for the end-to-end migration tests.

Two topologies, each started once per test module (process start-up is the
slow part) with VFs created per test through the firmware's Scenario service:

* `ThreeProcess`: `fwemu serve` + two `vfio-driver serve --firmware <fwemu>`
  (driver A holds the source devices, driver B the destinations); the
  Scenario service is fwemu's.
* `Embedded`: one `vfio-driver serve --vfs 0 --scenario-service` (the firmware
  runs in the driver process; its Scenario service is on the driver's port).

The test process is the orchestrating client (`VfioClient` for the source
and destination "processes", `ScenarioClient` for the firmware).  In the
mTLS pass (tests/support/tls_mode.py) the services require client
certificates, the drivers' links present the driver's, and the clients the
admin's (from VFIO_TLS_*, which the session sets).

Digests are read in `on_destinations_loaded`: every source has been read to
the end of its STOP_COPY stream and every destination is in STOP, both VFs
suspended, so their states cannot change and must be equal then.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from driver.shards import pci_name
from fwemu.link.ifc import MiB, VfCaps, VfConfig
from grpcsvc.spawn import DRIVER, FWEMU
from tests.support import tls_mode
from tests.support.tls_mode import served
from tests.support.vfioclient_migration import options
from vfioclient import VfioClient
from vfioclient.migration import DevicePair, MigrationOptions, at_first_ack
from vfioclient.scenario import ScenarioClient

WORKLOAD = {"size": 1 * MiB, "dirty_bytes_per_s": 4 * MiB}
QUIET = ("--log-level", "error", "--loop", "asyncio")


@dataclass(frozen=True)
class Topology:
    scenario: str  # the firmware's Scenario service
    source_driver: str
    destination_driver: str


@contextlib.contextmanager
def three_process() -> Iterator[Topology]:
    link = tls_mode.firmware_link_args()
    with (
        served(FWEMU, "--vfs", "0", *QUIET) as (_, fw),
        served(DRIVER, "--firmware", fw, *QUIET, *link) as (_, a),
        served(DRIVER, "--firmware", fw, *QUIET, *link) as (_, b),
    ):
        yield Topology(fw, a, b)


@contextlib.contextmanager
def embedded() -> Iterator[Topology]:
    with served(DRIVER, "--vfs", "0", "--scenario-service", *QUIET) as (_, d):
        yield Topology(d, d, d)


@dataclass
class Pair:
    pair: DevicePair
    src_vhca: int
    dst_vhca: int


@dataclass
class Rig:
    topo: Topology
    scenario: ScenarioClient
    src: VfioClient
    dst: VfioClient
    digests: list[tuple[str, str]] = field(default_factory=list)

    async def create(self, count: int, **config: object) -> list[int]:
        """`count` new VFs (vhca ids); both drivers probe them."""
        vfs = await self.scenario.create_vfs(count, VfConfig(**{**WORKLOAD, **config}))  # type: ignore[arg-type]
        await self.src.list_devices()  # ListDevices refreshes the registry
        await self.dst.list_devices()
        return [v.vhca_id for v in vfs]

    async def pairs(self, n: int = 1, **config: object) -> list[Pair]:
        """n source/destination pairs, opened (sources on the source driver)."""
        ids = await self.create(2 * n, **config)
        infos = {v.vhca_id: v for v in await self.scenario.list_vfs()}
        out = []
        for s, d in zip(ids[0::2], ids[1::2], strict=True):
            sfd = await self.src.open_device(pci_name(infos[s].function_id))
            dfd = await self.dst.open_device(pci_name(infos[d].function_id))
            out.append(Pair(DevicePair(self.src, sfd, self.dst, dfd, name=f"vf{s}"), s, d))
        return out

    def digest_hook(self, pairs: list[Pair]) -> MigrationOptions:
        async def loaded() -> None:
            for p in pairs:
                self.digests.append(
                    (await self.scenario.digest(p.src_vhca), await self.scenario.digest(p.dst_vhca))
                )

        return options(on_destinations_loaded=loaded)

    def reconfigure_on_first_ack(self, targets: dict[str, int], o: MigrationOptions) -> set[str]:
        """Reconfigure a device's source (through the Scenario service) when
        its destination is about to give its first switchover-ack, at the
        next precopy iteration boundary (vfioclient.migration.at_first_ack
        says why there).  The names of the devices reconfigured so far."""
        done: set[str] = set()
        for name, vhca in targets.items():

            async def reconfigure(name: str = name, vhca: int = vhca) -> None:
                await self.scenario.reconfigure(vhca)
                done.add(name)

            at_first_ack(o, name, reconfigure)
        return done


@contextlib.asynccontextmanager
async def rig(topo: Topology) -> AsyncIterator[Rig]:
    scenario = await ScenarioClient.connect(topo.scenario)
    src = await VfioClient.connect(topo.source_driver)
    dst = await VfioClient.connect(topo.destination_driver)
    try:
        yield Rig(topo, scenario, src, dst)
    finally:
        await src.aclose()  # the session ends: the fds close
        await dst.aclose()
        await scenario.aclose()


__all__ = [
    "Pair",
    "Rig",
    "Topology",
    "VfCaps",
    "embedded",
    "options",
    "rig",
    "three_process",
]
