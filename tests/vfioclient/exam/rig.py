"""The exam's end-to-end rig: a driver service over an embedded firmware with
its Scenario service on the same loopback port (`vfio-driver serve
--scenario-service` in process), and orchestrators under test that the exam's
announcement starts as tasks of the same loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from driver.registry import DeviceRegistry
from driver.service.server import DriverServer
from fwemu.embedded import EmbeddedFirmware
from fwemu.model.clock import LoopClock
from fwemu.model.firmware import Firmware
from tests.support import tls_mode
from tests.support.vfioclient_migration import options
from vfioclient import PrecopyInfo, VfioClient, VfioClientError
from vfioclient.exam import Trap
from vfioclient.migration import (
    DeviceMigration,
    DevicePair,
    MigrationError,
    MigrationOptions,
    MigrationReport,
    migrate,
)
from vfioclient.migration.run import Migration

Migrate = Callable[[list[DevicePair], MigrationOptions], Awaitable[object]]


@contextlib.asynccontextmanager
async def exam_driver() -> AsyncIterator[str]:
    emb = EmbeddedFirmware(Firmware(LoopClock(), seed=14))
    server = DriverServer(
        DeviceRegistry(emb.link, cmd_timeout=5.0),
        firmware=emb,
        scenario_service=True,
        roles=tls_mode.roles(),
    )
    target = await tls_mode.start(server)
    try:
        yield target
    finally:
        tls_mode.stopped(target)
        await server.stop(0)


@dataclass
class Orchestrator:
    """Starts `run` (the project's `migrate`, or a naive one) on the devices
    the exam names, as a task; keeps what each migration ended with."""

    target: str
    run: Migrate = migrate
    results: dict[str, str] = field(default_factory=dict)  # trap -> "ok" or the error
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    reinits: dict[str, list[str]] = field(default_factory=dict)  # trap -> REINIT phases

    async def _migrate(self, trap: Trap, source: str, destination: str) -> None:
        src = await VfioClient.connect(self.target)
        dst = await VfioClient.connect(self.target)
        try:
            sfd = await src.open_device(source)
            dfd = await dst.open_device(destination)
            try:
                report = await self.run([DevicePair(src, sfd, dst, dfd, name=trap.name)], options())
                self.results[trap.name] = "ok"
                self.reinits[trap.name] = [r.phase for r in getattr(report, "reinits", [])]
            except (MigrationError, VfioClientError) as e:
                self.results[trap.name] = str(e)
            finally:
                await src.close(sfd)
                await dst.close(dfd)
        finally:
            await src.aclose()
            await dst.aclose()

    def ready(self, trap: Trap, source: str, destination: str) -> None:
        self.tasks.append(asyncio.ensure_future(self._migrate(trap, source, destination)))


class IgnoresReinit(DeviceMigration):
    """A device migration that reads PRECOPY_INFO as v1 would: a REINIT's
    initial_bytes are cached like any answer, but the switchover-ack is not
    re-armed and INIT_DATA_SENT not sent again (and a REINIT after the
    decision goes unnoticed)."""

    def take_precopy_info(self, info: PrecopyInfo) -> PrecopyInfo | None:
        self.initial_bytes, self.dirty_bytes = info.initial_bytes, info.dirty_bytes
        return None


class NoFinalCheck(DeviceMigration):
    """Asks PRECOPY_INFO until the switchover decision, never after it."""

    async def query_precopy_info(self) -> PrecopyInfo | None:
        if self.ack.decided:
            return None
        return await super().query_precopy_info()


class WithoutFinalCheck(Migration):
    def __init__(self, pairs: Sequence[DevicePair], options: MigrationOptions) -> None:
        super().__init__(pairs, options)
        self.devices = [NoFinalCheck(p, i, self.ack, options) for i, p in enumerate(pairs)]
        self.report.devices = [d.report for d in self.devices]


async def migrate_without_final_check(
    pairs: Sequence[DevicePair], options: MigrationOptions
) -> MigrationReport:
    """The project's orchestrator minus QEMU 11.1's final save_query_pending."""
    return await WithoutFinalCheck(pairs, options).run()


class NaiveMigration(Migration):
    def __init__(self, pairs: Sequence[DevicePair], options: MigrationOptions) -> None:
        super().__init__(pairs, options)
        self.devices = [IgnoresReinit(p, i, self.ack, options) for i, p in enumerate(pairs)]
        self.report.devices = [d.report for d in self.devices]


async def naive_migrate(pairs: Sequence[DevicePair], options: MigrationOptions) -> MigrationReport:
    """The project's orchestrator without its REINIT handling: no re-arm on REINIT."""
    return await NaiveMigration(pairs, options).run()
