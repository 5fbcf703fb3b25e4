"""What each load-test user does, without Locust: a flow leases devices,
sets them up, repeats its step, and tears down; every call and every
measured moment goes to a Recorder (Locust's request event, in
vfioload/locustfile.py; a list in the tests).

- reinit-loop: PRE_COPY, drain; then, per step: reconfigure, expect REINIT at
  the next PRECOPY_INFO (its latency: "REINIT detection"), drain the new
  initial bytes until PRECOPY_INFO says none are left ("re-arm").  A step
  without REINIT is a "missed REINIT"; a REINIT nobody caused is "spurious".
- migration: a whole migration as QEMU runs one (PRE_COPY, switchover-ack,
  a final PRECOPY_INFO before STOP_COPY), with a reconfiguration at a random
  moment (none, before the ack, after it, after the switchover decision);
  downtime and total time, and equal digests.
- precopy-hammer: PRECOPY_INFO, as fast as answers come.
- faults: a firmware fault per step; the errno and the recovery must be what
  a user expects of the device (fail-save, fail-query, load-refused,
  tracking-lost).
"""

from __future__ import annotations

import contextlib
import errno
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fwemu.link.ifc import CmdStatus, FaultKind, Opcode, Syndrome
from vfioclient import VfioClientError
from vfioclient.sync import SyncVfioClient

from .pool import Device, DevicePool
from .scenario import SyncScenario

T = TypeVar("T")

# enum vfio_device_mig_state values the flows use (include/uapi/linux/vfio.h)
STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY = 1, 2, 3, 4, 6
DRAIN_ROUNDS = 64  # a re-arm that needs more PRECOPY_INFOs than this is stuck


class Recorder(Protocol):
    def __call__(
        self,
        kind: str,
        name: str,
        seconds: float,
        *,
        length: int = 0,
        error: BaseException | None = None,
    ) -> None: ...


class LoadError(Exception):
    """What a user saw that it should not have (a failure in Locust's stats)."""


@dataclass
class Flow:
    """A user's flow: `kind` names it in the stats (the user class)."""

    kind: str
    client: SyncVfioClient
    scenario: SyncScenario
    pool: DevicePool
    record: Recorder
    rng: random.Random = field(default_factory=random.Random)
    devices: list[Device] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)  # device fds, as `devices`

    DEVICES = 1

    def call(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One timed RPC (or Scenario call), recorded under `name`."""
        t = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        except OSError as e:
            self.record(self.kind, name, time.perf_counter() - t, error=e)
            raise
        self.record(self.kind, name, time.perf_counter() - t)
        return out

    def measured(self, name: str, seconds: float) -> None:
        self.record(self.kind, name, seconds)

    def failed(self, name: str, why: str) -> None:
        self.record(self.kind, name, 0.0, error=LoadError(why))

    # --- the device lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self.devices = self.pool.lease(self.DEVICES)
        try:
            for d in self.devices:
                self.fds.append(self.call("OpenDevice", self.client.open_device, d.name))
            self.setup()
        except BaseException:
            self.stop()
            raise

    def setup(self) -> None:
        """After the devices opened (the flow's own state)."""

    def step(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Close every fd: the last close puts a device back to RUNNING, and
        its data fds go with it; the devices go back to the pool."""
        for fd in self.fds:
            with contextlib.suppress(OSError):  # died with its device or the driver
                self.client.close(fd)
        self.fds = []
        self.pool.give_back(self.devices)
        self.devices = []

    # --- what the flows share ------------------------------------------------------------

    def drain(self, fd: int, sink: Callable[[bytes], None] | None = None) -> int:
        """ReadStream to ENOMSG (or the end of the stream): the bytes read."""
        t = time.perf_counter()
        n = 0
        try:
            for chunk in self.client.read_stream(fd):
                n += len(chunk)
                if sink is not None:
                    sink(chunk)
        except VfioClientError as e:
            if e.errno != errno.ENOMSG:
                self.record(self.kind, "ReadStream", time.perf_counter() - t, error=e)
                raise
        self.record(self.kind, "ReadStream", time.perf_counter() - t, length=n)
        return n

    def precopy(self, fd: int) -> Any:
        return self.call("PrecopyInfo", self.client.precopy_info, fd)

    def open_data(self, fd: int, state: int, name: str) -> int:
        """SET a state whose arc opens a data file: its fd."""
        data = self.call(name, self.client.set_state, fd, state)
        if data is None:
            raise LoadError(f"SET state {state} opened no data fd")
        return data


class ReinitLoop(Flow):
    def setup(self) -> None:
        (fd,) = self.fds
        if not self.call("MIG_PRECOPY_INFOv2", self.client.enable_precopy_info_v2, fd):
            raise LoadError(f"{self.devices[0].name}: no PRE_COPY, no REINIT to test")
        self.data_fd = self.open_data(fd, PRE_COPY, "SET PRE_COPY")
        self.rearm()

    def rearm(self) -> None:
        """Drain until PRECOPY_INFO reports no initial bytes: the switchover-ack
        could be given again.  A REINIT here is spurious: nobody reconfigured."""
        for _ in range(DRAIN_ROUNDS):
            self.drain(self.data_fd)
            info = self.precopy(self.data_fd)
            if info.reinit:
                self.failed("spurious REINIT", f"{self.devices[0].name}: REINIT while re-arming")
            if info.initial_bytes == 0:
                return
        raise LoadError(f"{self.devices[0].name}: initial bytes left after {DRAIN_ROUNDS} drains")

    def step(self) -> None:
        dev = self.devices[0]
        t0 = time.perf_counter()
        self.call("Reconfigure", self.scenario.reconfigure, dev.vhca_id)
        info = self.precopy(self.data_fd)
        if not info.reinit:
            self.failed("missed REINIT", f"{dev.name}: no REINIT after a reconfiguration")
            self.rearm()
            return
        detected = time.perf_counter()
        self.measured("REINIT detection", detected - t0)
        self.rearm()
        self.measured("re-arm", time.perf_counter() - detected)


class PrecopyHammer(Flow):
    def setup(self) -> None:
        (fd,) = self.fds
        self.data_fd = self.open_data(fd, PRE_COPY, "SET PRE_COPY")

    def step(self) -> None:
        info = self.precopy(self.data_fd)
        if info.initial_bytes or info.dirty_bytes > (1 << 20):
            self.drain(self.data_fd)  # keep the stream short: the rate is the point


MOMENTS = ("none", "before-ack", "after-ack", "after-decision")


@dataclass
class _Run:
    """One migration's bookkeeping."""

    moment: str
    reconfigured: bool = False
    ack: bool = False
    reinits: int = 0
    rounds: int = 0


class MigrationFlow(Flow):
    DEVICES = 2
    MAX_ROUNDS = 200
    DIRTY_LIMIT = 256 << 10  # switch over once no more than this is dirty

    def step(self) -> None:
        (src, dst), (sfd, dfd) = self.devices, self.fds
        run = _Run(self.rng.choice(MOMENTS))
        t0 = time.perf_counter()
        self.call("MIG_PRECOPY_INFOv2", self.client.enable_precopy_info_v2, sfd)
        ddata = self.open_data(dfd, RESUMING, "SET RESUMING")
        sdata = self.open_data(sfd, PRE_COPY, "SET PRE_COPY")
        self.reconfigure_at("before-ack", run, src)

        def forward(fd: int) -> None:
            chunks: list[bytes] = []
            self.drain(fd, chunks.append)
            if chunks:
                self.call("Write", self.client.write, ddata, chunks)

        while True:
            run.rounds += 1
            if run.rounds > self.MAX_ROUNDS:
                raise LoadError(f"{src.name}: no switchover after {self.MAX_ROUNDS} rounds")
            forward(sdata)
            info = self.precopy(sdata)
            if info.reinit:
                run.reinits += 1
                run.ack = False  # new initial data: the ack is to be earned again
                continue
            if info.initial_bytes:
                continue
            if not run.ack:
                run.ack = True
                self.reconfigure_at("after-ack", run, src)
                continue
            if info.dirty_bytes > self.DIRTY_LIMIT:
                continue
            # The switchover decision; then QEMU's last look before stopping.
            self.reconfigure_at("after-decision", run, src)
            last = self.precopy(sdata)
            if last.reinit or last.initial_bytes:
                run.reinits += int(last.reinit)
                run.ack = False
                continue
            break
        t_down = time.perf_counter()
        self.call("SET STOP_COPY", self.client.set_state, sfd, STOP_COPY)  # same data fd
        forward(sdata)
        self.call("SET STOP (destination)", self.client.set_state, dfd, STOP)
        self.call("SET STOP (source)", self.client.set_state, sfd, STOP)
        downtime = time.perf_counter() - t_down
        ours = self.call("GetDigest", self.scenario.digest, src.vhca_id)
        theirs = self.call("GetDigest", self.scenario.digest, dst.vhca_id)
        self.measured("downtime", downtime)
        self.measured("migration", time.perf_counter() - t0)
        for fd in (sdata, ddata):
            self.call("CloseFd", self.client.close, fd)
        self.call("SET RUNNING", self.client.set_state, sfd, RUNNING)
        self.call("SET RUNNING", self.client.set_state, dfd, RUNNING)
        if ours != theirs:
            self.failed("digest", f"{src.name} -> {dst.name}: {ours} != {theirs}")
        if run.reconfigured and run.reinits == 0:
            self.failed("missed REINIT", f"{src.name}: reconfigured {run.moment}, no REINIT")

    def reconfigure_at(self, moment: str, run: _Run, src: Device) -> None:
        """The run's one reconfiguration, the first time its moment comes."""
        if run.moment == moment and not run.reconfigured:
            run.reconfigured = True
            self.call("Reconfigure", self.scenario.reconfigure, src.vhca_id)


@dataclass(frozen=True)
class FaultCase:
    name: str
    fault: dict[str, int]
    expect: int  # the errno


_INT_ERR = {"status": CmdStatus.INT_ERR, "syndrome": Syndrome.INJECTED}

FAULT_CASES = (
    FaultCase(
        "fail-save",
        {"kind": FaultKind.FAIL, "opcode": Opcode.SAVE_VHCA_STATE, **_INT_ERR},
        errno.EIO,
    ),
    FaultCase(
        "fail-query",
        {"kind": FaultKind.FAIL, "opcode": Opcode.QUERY_VHCA_MIGRATION_STATE, **_INT_ERR},
        errno.EIO,
    ),
    FaultCase(
        "load-refused",
        {"kind": FaultKind.FAIL, "opcode": Opcode.LOAD_VHCA_STATE, **_INT_ERR},
        errno.EIO,
    ),
    FaultCase("tracking-lost", {"kind": FaultKind.TRACKING_LOST}, 0),
)


class FaultsFlow(Flow):
    DEVICES = 2

    def cases(self) -> Iterator[FaultCase]:
        while True:
            yield from FAULT_CASES

    def setup(self) -> None:
        self._cases = self.cases()

    def step(self) -> None:
        case = next(self._cases)
        getattr(self, "_" + case.name.replace("-", "_"))(case)

    def _expect(self, case: FaultCase, fn: Callable[..., Any], *args: Any) -> None:
        """`fn` fails with the case's errno (recorded as the case, not as a failure)."""
        t = time.perf_counter()
        try:
            fn(*args)
        except VfioClientError as e:
            if e.errno != case.expect:
                self.failed(case.name, f"errno {e.name}, expected {errno.errorcode[case.expect]}")
                return
            self.measured(case.name, time.perf_counter() - t)
            return
        self.failed(case.name, f"no error, expected {errno.errorcode[case.expect]}")

    def _state(self, fd: int, want: int, case: FaultCase) -> None:
        got = self.call("GET state", self.client.get_state, fd)
        if got != want:
            self.failed(case.name, f"device left in {got!r}, expected state {want}")

    def _inject(self, dev: Device, case: FaultCase) -> None:
        self.call("InjectFault", self.scenario.inject_fault, dev.vhca_id, **case.fault)

    def _fail_save(self, case: FaultCase) -> None:
        """RUNNING -> PRE_COPY whose SAVE fails: EIO, the device still RUNNING,
        and a second try works."""
        dev, fd = self.devices[0], self.fds[0]
        self._inject(dev, case)
        self._expect(case, self.client.set_state, fd, PRE_COPY)
        self._state(fd, RUNNING, case)
        data = self.open_data(fd, PRE_COPY, "SET PRE_COPY")
        self.call("CloseFd", self.client.close, data)
        self.call("SET RUNNING", self.client.set_state, fd, RUNNING)

    def _fail_query(self, case: FaultCase) -> None:
        """A PRECOPY_INFO whose QUERY fails: EIO, the device still PRE_COPY,
        and the next PRECOPY_INFO answers."""
        dev, fd = self.devices[0], self.fds[0]
        data = self.open_data(fd, PRE_COPY, "SET PRE_COPY")
        self.drain(data)
        self._inject(dev, case)
        self._expect(case, self.client.precopy_info, data)
        self._state(fd, PRE_COPY, case)
        self.precopy(data)
        self.call("CloseFd", self.client.close, data)
        self.call("SET RUNNING", self.client.set_state, fd, RUNNING)

    def _load_refused(self, case: FaultCase) -> None:
        """A destination whose LOAD fails: the write carrying the image's
        end fails with EIO; a reset brings the destination back to RUNNING."""
        (_, dst), (sfd, dfd) = self.devices, self.fds
        self.call("SET STOP", self.client.set_state, sfd, STOP)
        sdata = self.open_data(sfd, STOP_COPY, "SET STOP_COPY")
        chunks: list[bytes] = []
        self.drain(sdata, chunks.append)
        ddata = self.open_data(dfd, RESUMING, "SET RESUMING")
        self._inject(dst, case)
        self._expect(case, self.client.write, ddata, chunks)
        for data in (sdata, ddata):
            self.call("CloseFd", self.client.close, data)
        self.call("DeviceReset", self.client.reset, dfd)
        self._state(dfd, RUNNING, case)
        self.call("SET RUNNING", self.client.set_state, sfd, RUNNING)

    def _tracking_lost(self, case: FaultCase) -> None:
        """Tracking lost in PRE_COPY: no errno; the final image is a full one,
        and the destination gets the source's digest."""
        (src, dst), (sfd, dfd) = self.devices, self.fds
        ddata = self.open_data(dfd, RESUMING, "SET RESUMING")
        sdata = self.open_data(sfd, PRE_COPY, "SET PRE_COPY")
        chunks: list[bytes] = []
        self.drain(sdata, chunks.append)
        self._inject(src, case)
        self.call("Reconfigure", self.scenario.reconfigure, src.vhca_id)
        t = time.perf_counter()
        self.precopy(sdata)
        self.drain(sdata, chunks.append)
        self.call("SET STOP_COPY", self.client.set_state, sfd, STOP_COPY)  # same data fd
        self.drain(sdata, chunks.append)
        self.call("Write", self.client.write, ddata, chunks)
        self.call("SET STOP (destination)", self.client.set_state, dfd, STOP)
        self.call("SET STOP (source)", self.client.set_state, sfd, STOP)
        ours = self.call("GetDigest", self.scenario.digest, src.vhca_id)
        theirs = self.call("GetDigest", self.scenario.digest, dst.vhca_id)
        if ours == theirs:
            self.measured(case.name, time.perf_counter() - t)
        else:
            self.failed(case.name, f"digests differ after tracking was lost: {ours} != {theirs}")
        for data in (sdata, ddata):
            self.call("CloseFd", self.client.close, data)
        self.call("SET RUNNING", self.client.set_state, sfd, RUNNING)
        self.call("SET RUNNING", self.client.set_state, dfd, RUNNING)


FLOWS: dict[str, type[Flow]] = {
    "reinit-loop": ReinitLoop,
    "migration": MigrationFlow,
    "precopy-hammer": PrecopyHammer,
    "faults": FaultsFlow,
}
