"""The migration of a set of devices together: precopy rounds, the
switchover decision (with QEMU 11.1's final save_query_pending), the
stop-copy, verification and cleanup; a failure leaves the sources RUNNING
and the destinations reset.  The destinations are behind a `Destinations`
(link.py): in this process, or a destination agent (remote.py); this logic
is the same for both."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from ..client import PrecopyInfo
from ..uapi import MigState
from .device import DeviceMigration
from .link import Destinations
from .local import LocalDestinations
from .options import DevicePair, DigestHook, MigrationOptions, OutgoingDevice
from .progress import notify
from .report import MigrationError, MigrationReport, ReinitEvent
from .switchover import SwitchoverAck

log = logging.getLogger(__name__)

S = MigState


class Migration:
    def __init__(
        self,
        pairs: Sequence[DevicePair | OutgoingDevice],
        options: MigrationOptions,
        destinations: Destinations | None = None,
    ) -> None:
        self.options = options
        self.ack = SwitchoverAck()
        self.destinations = destinations or LocalDestinations()
        self.devices = [DeviceMigration(p, i, self.ack, options) for i, p in enumerate(pairs)]
        self.report = MigrationReport(
            devices=[d.report for d in self.devices],
            channel=self.destinations.channel,
            downtime_limit_s=options.downtime_limit_s,
        )
        self.t0 = time.monotonic()
        self._phase_start = self.t0
        notify(options.progress, "devices", [d.name for d in self.devices])
        notify(options.progress, "phase", "setup")

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _phase(self, name: str) -> None:
        t = time.monotonic()
        self.report.phases[self.report.status] = t - self._phase_start
        self.report.status, self._phase_start = name, t
        notify(self.options.progress, "phase", name)

    def _reinit(self, d: DeviceMigration, info: PrecopyInfo, phase: str, handling: str) -> None:
        log.info("%s: REINIT (%s, initial %d): %s", d.name, phase, info.initial_bytes, handling)
        self.report.reinits.append(
            ReinitEvent(
                d.name,
                self._now(),
                self.report.iterations,
                phase,
                info.initial_bytes,
                d.report.precopy_bytes,
                handling,
            )
        )

    async def run(self) -> MigrationReport:
        try:
            await self._run()
        except BaseException as e:
            self.report.error = str(e) or type(e).__name__
            await self.destinations.abort(self.devices, e)
            for d in self.devices:
                await d.abort()
                await d.close_user_memory()
            await self.destinations.close()
            self._finish("failed")
            if isinstance(e, MigrationError):
                e.report = self.report
                raise
            if isinstance(e, Exception):
                raise MigrationError(self.report.error, self.report) from e
            raise
        await self.destinations.close()
        self._finish("completed")
        return self.report

    def _finish(self, status: str) -> None:
        self._phase(status)
        self.report.total_s = self._now()
        self.report.precopy_bytes = sum(d.report.precopy_bytes for d in self.devices)
        self.report.stop_copy_bytes = sum(d.report.stop_copy_bytes for d in self.devices)
        r = self.report
        if r.total_s > 0:
            r.throughput_Bps = (r.precopy_bytes + r.stop_copy_bytes) / r.total_s
        if r.stop_copy_s > 0:
            r.stop_copy_throughput_Bps = r.stop_copy_bytes / r.stop_copy_s
        notify(self.options.progress, "close")

    async def _run(self) -> None:
        devs = self.devices
        for d in devs:
            await d.discover()
        if len(devs) > 1 and not all(d.p2p for d in devs):
            raise MigrationError("several devices migrate together only if all support P2P")
        if self.destinations.setup_alongside:
            infos = await self._setup_alongside()
        else:
            await self.destinations.setup(devs)
            infos = [await d.setup() for d in devs]
        self.report.channel = self.destinations.channel
        for d, info in zip(devs, infos, strict=True):
            if info is not None:
                self._reinit(d, info, "setup", "the first ack waits for them")
        self._phase("precopy")
        if any(d.in_precopy for d in devs):
            await self._precopy()
        else:
            self.report.converged = True
        self._phase("switchover")
        await self._switchover()

    async def _setup_alongside(self) -> list[PrecopyInfo | None]:
        """The destinations' load_setup (an agent's) while the sources'
        save_setup runs, as QEMU's source sends its setup sections and goes
        on; a failure of either waits for the other to end (the caller's
        abort then puts both back)."""
        devs = self.devices
        dest = asyncio.ensure_future(self.destinations.setup(devs))
        try:
            infos = [await d.setup_source() for d in devs]
        except BaseException:
            if not dest.done():
                dest.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await dest
            raise
        await dest
        for d in devs:
            d.linked()
        return infos

    async def _precopy(self) -> None:
        o, devs = self.options, self.devices
        for it in range(1, o.max_precopy_iterations + 1):
            self.report.iterations = it
            if o.on_iteration is not None:
                await o.on_iteration(it)
            moved = await asyncio.gather(*(d.iterate() for d in devs))
            for d in devs:
                d.check_loader()
            if await self._ready_for_switchover():
                self.report.converged = True
                return
            if not any(moved):  # nothing to read for now: let the devices catch up
                await asyncio.sleep(o.iteration_interval_s)
        if not self.ack.all_acked:
            raise MigrationError(
                f"no switchover-ack after {o.max_precopy_iterations} iterations "
                f"(waiting for {sorted(self.ack.pending)})"
            )
        log.warning("switching over after %d iterations without converging", self.report.iterations)

    async def _ready_for_switchover(self) -> bool:
        o, devs = self.options, self.devices
        if sum(d.pending_estimate for d in devs) >= o.threshold:
            return False
        acked = self.ack.all_acked  # before the queries: an ack arriving later waits a round
        self.report.exact_queries += 1

        answers = await asyncio.gather(*(d.pending_exact() for d in devs))
        reinit = False
        for d, (_, info) in zip(devs, answers, strict=True):
            if info is not None:
                d.rearm(info)
                self._reinit(d, info, "precopy", "ack re-armed")
                reinit = True
        pending = sum(n for n, _ in answers)
        if reinit or not acked or pending > o.threshold:
            return False
        # The switchover decision; then QEMU 11.1's final save_query_pending.
        self.ack.decided = True
        if o.on_switchover_decision is not None:
            await o.on_switchover_decision()
        late = False
        for d in devs:
            info = await d.query_precopy_info()
            if info is None:
                continue
            if o.fail_on_late_reinit:
                self._reinit(d, info, "after-switchover-decision", "failed")
                raise MigrationError(
                    f"{d.name}: REINIT after the switchover decision "
                    "(switchover-ack requested too late)"
                )
            d.rearm(info)
            self._reinit(d, info, "after-switchover-decision", "ack re-armed, back to precopy")
            late = True
        if late:
            self.ack.decided = False
            return False
        return True

    async def _verify(self, digests: DigestHook) -> None:
        for d in self.devices:
            src, dst = await digests(d)
            d.report.source_digest, d.report.destination_digest = src, dst
            if not src or src != dst:
                raise MigrationError(
                    f"{d.name}: verification failed: destination digest {dst or '(none)'} "
                    f"!= source digest {src or '(none)'}"
                )
        self.report.verified = True

    async def _switchover(self) -> None:
        devs = self.devices
        stop = time.monotonic()
        for d in devs:  # all devices to P2P first
            await d.to_p2p()
        t_copy = time.monotonic()
        for d in devs:
            await d.to_stop_copy()
        await asyncio.gather(*(d.drain() for d in devs))
        self.report.stop_copy_s = time.monotonic() - t_copy
        o = self.options
        if o.on_destinations_loaded is None and o.digests is None:
            self.destinations.stop_before_start = False  # nothing looks at them stopped
        await self.destinations.complete(devs)  # RESUMING -> STOP: loaded and validated
        t = time.monotonic()
        if self.options.on_destinations_loaded is not None:
            await self.options.on_destinations_loaded()
        if self.options.digests is not None:
            await self._verify(self.options.digests)
        self.report.hook_s = time.monotonic() - t + self.destinations.verify_s
        await self.destinations.start(devs)
        r = self.report
        r.downtime_s = time.monotonic() - stop - r.hook_s
        if r.downtime_s > r.downtime_limit_s:
            # QEMU goes on too (the VM is already stopped): say so.
            r.downtime_exceeded = True
            log.warning(
                "downtime %.1f ms exceeded the limit of %.1f ms",
                r.downtime_s * 1000,
                r.downtime_limit_s * 1000,
            )
        self._phase("cleanup")
        for d in devs:  # save_cleanup, outside the downtime
            await d.set_source(S.STOP, None)
            await d.close_data_fds()
            await d.close_user_memory()


async def migrate(pairs: Sequence[DevicePair], options: MigrationOptions) -> MigrationReport:
    """Migrate every pair's source to its destination; raises MigrationError
    (its `report` filled in) after leaving the sources RUNNING."""
    if not pairs:
        raise ValueError("nothing to migrate")
    return await Migration(pairs, options).run()
