"""Migrate VFIO devices the way QEMU's hw/vfio/migration.c does (11.1, with
the VFIO_PRECOPY_INFO_REINIT handling), over VfioClient.

    pairs = [DevicePair(src_client, src_fd, dst_client, dst_fd, name="nic0")]
    report = await migrate(pairs, MigrationOptions(downtime_limit_s=0.3,
                                                   bandwidth_estimate=1 << 30))
    print(report.to_json())

Per device (`DeviceMigration`): discovery (MIGRATION flags, the MIG_PRECOPY_INFOv2
opt-in, the DMA logging PROBE, MIG_DATA_SIZE for the buffer), the source's
precopy iterations (one read of up to the buffer size per iteration, cached
initial/dirty counters, ENOMSG = empty for now) and the destination's RESUMING
data fd, fed in stream order by a loader task.  The two halves talk through an
in-process stream (a queue of chunks and markers, standing in for QEMU's
migration stream) and a shared `SwitchoverAck` (the return path's
switchover-ack): the source sends INIT_DATA_SENT when its initial bytes reach
0, the destination approves once it has written everything before it.

A REINIT (trusted only after a successful v2 opt-in) replaces the cached
initial bytes, resets dirty, clears initial_data_sent and re-arms the ack, so
the switchover waits for the new initial bytes.  After the switchover decision
PRECOPY_INFO is checked once more ("final save_query_pending"): a REINIT there
fails the migration (QEMU 11.1), or with fail_on_late_reinit=False re-arms the
ack and goes back to precopy.

Every state change names a recovery state; if the change fails the recovery
state is tried, and if that fails too the device is reset (QEMU's
vfio_migration_set_state).  A failed migration leaves the sources RUNNING and
resets the destinations (aborting RESUMING).

Multifd (`MigrationOptions.multifd_channels` > 0, QEMU 10.0's device-state
transfer): precopy stays on the main stream, which gets its end marker when
the stop-copy starts; the stop-copy data is read in buffer-size chunks, each
a packet with a sequence index, sent over that many concurrent channels
(tasks forwarding with a jitter, so packets arrive out of order); the
destination keeps them in a reorder buffer and, once the main stream is
loaded, writes them strictly in index order.  The bytes queued (sent and not
yet written) are bounded by `multifd_max_queued_bytes`: the source waits.

Progress: `MigrationOptions.progress` (a `Progress`) hears of phase changes,
bytes moved, the cached initial/dirty counters and REINITs;
`TerminalProgress` draws that on stderr when it is a TTY (and CI is unset).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import errno
import json
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from driver.vfio.uapi import (
    VFIO_DEVICE_FEATURE_SET,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    Feature,
    MigState,
)

from .client import PrecopyInfo, VfioClient, VfioClientError, WriteFromCall
from .usermem import DATA_PATHS, Slot, Slots, UserMemory

log = logging.getLogger(__name__)

S = MigState
BUFFER_CAP = 1 << 20  # QEMU's VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE

Hook = Callable[[], Awaitable[None]]
IterationHook = Callable[[int], Awaitable[None]]
DeviceHook = Callable[["DeviceMigration"], Awaitable[None]]
DigestHook = Callable[["DeviceMigration"], Awaitable[tuple[str, str]]]


class MigrationError(Exception):
    """The migration failed; `report` says how far it got (sources left RUNNING)."""

    def __init__(self, message: str, report: MigrationReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class MigrationOptions:
    downtime_limit_s: float = 0.3
    bandwidth_estimate: int = 1 << 30  # bytes/s
    max_precopy_iterations: int = 10_000
    iteration_interval_s: float = 0.005  # pause after an iteration that read nothing
    stream_depth: int = 16  # chunks in flight between source reads and destination writes
    fail_on_late_reinit: bool = True  # QEMU 11.1
    buffer_cap: int = BUFFER_CAP
    # Hooks (tests, tracing): awaited at the named points.
    on_iteration: IterationHook | None = None  # before each precopy iteration
    on_switchover_ack: DeviceHook | None = None  # destination, just before it approves
    on_switchover_decision: Hook | None = None  # after the decision, before the final check
    on_destinations_loaded: Hook | None = None  # every destination in STOP, before it runs
    # Verification: (source digest, destination digest) of a device, asked for
    # while both are stopped (destinations loaded); unequal fails the migration.
    digests: DigestHook | None = None
    # Multifd stop-copy (0 = off: the stop-copy data goes on the main stream).
    multifd_channels: int = 0
    multifd_max_queued_bytes: int = 32 << 20  # sent, not yet written (>= one packet)
    multifd_jitter_s: float = 0.002  # each channel delays each packet by up to this
    progress: Progress | None = None  # None: no progress
    # How the data moves between the drivers and us: "auto" (user memory when
    # the driver is on this host, else gRPC), "shm" (user memory or fail),
    # "grpc" (Read/ReadStream/Write messages).  See vfioclient/usermem.py.
    data_path: str = "auto"

    @property
    def threshold(self) -> float:
        return self.bandwidth_estimate * self.downtime_limit_s


@dataclass
class DevicePair:
    """One device's source fd and destination fd (device fds, opened by the
    caller, who keeps them), possibly on two clients / services."""

    source: VfioClient
    source_fd: int
    destination: VfioClient
    destination_fd: int
    name: str = ""


# --- report ---------------------------------------------------------------------------------


@dataclass
class ReinitEvent:
    device: str
    at_s: float  # since the migration started
    iteration: int
    phase: str  # "precopy" | "after-switchover-decision"
    initial_bytes: int
    precopy_bytes_before: int  # the device's precopy bytes read before the REINIT
    handling: str  # "ack re-armed" | "failed" | "ack re-armed, back to precopy"


@dataclass
class DeviceReport:
    name: str
    migration_flags: int = 0
    pre_copy: bool = False
    p2p: bool = False
    precopy_info_v2: bool = False
    dma_logging: bool = False
    buffer_size: int = 0
    # "shm" (user memory on both sides), "shm (source), grpc (destination)",
    # or "grpc"
    data_path: str = ""
    precopy_bytes: int = 0
    stop_copy_bytes: int = 0
    reads: int = 0
    empty_reads: int = 0
    init_data_sent: int = 0  # INIT_DATA_SENT markers the source sent
    acks: int = 0  # approvals the destination gave
    # multifd (stop-copy): packets sent (the last one empty), packets that arrived
    # ahead of a lower index, the most packets held waiting for a missing one,
    # the most bytes queued (sent, not yet written).
    multifd_packets: int = 0
    multifd_out_of_order: int = 0
    multifd_max_reorder_depth: int = 0
    multifd_max_queued_bytes: int = 0
    # verification (MigrationOptions.digests): empty when not verified
    source_digest: str = ""
    destination_digest: str = ""


@dataclass
class MigrationReport:
    status: str = "setup"  # setup | precopy | switchover | completed | failed
    error: str | None = None
    iterations: int = 0
    converged: bool = False  # False: switched over at max_precopy_iterations
    exact_queries: int = 0
    precopy_bytes: int = 0
    stop_copy_bytes: int = 0
    reinits: list[ReinitEvent] = field(default_factory=list)
    downtime_s: float | None = None  # first source stop to the last destination RUNNING
    # Time spent verifying (MigrationOptions.digests, on_destinations_loaded):
    # inside the stop, but not counted in downtime_s.
    hook_s: float = 0.0
    verified: bool = False  # every device's digests compared equal
    stop_copy_s: float = 0.0  # first STOP_COPY to the last byte written
    throughput_Bps: float = 0.0  # all bytes moved / total_s
    stop_copy_throughput_Bps: float = 0.0  # stop-copy bytes / stop_copy_s
    total_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    devices: list[DeviceReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# --- switchover-ack -------------------------------------------------------------------------


class SwitchoverAck:
    """The return path's switchover-ack, re-usable as in QEMU 11.1: a device
    requests an ack (again after a REINIT); the destination approves the
    request it has seen INIT_DATA_SENT for.  Requests carry a generation, so
    an approval for an INIT_DATA_SENT sent before a re-arm does not count."""

    def __init__(self) -> None:
        self._generation: dict[str, int] = {}
        self._pending: set[str] = set()
        self.decided = False

    def request(self, device: str) -> int:
        gen = self._generation.get(device, 0) + 1
        self._generation[device] = gen
        self._pending.add(device)
        return gen

    def generation(self, device: str) -> int:
        return self._generation.get(device, 0)

    def approve(self, device: str, generation: int) -> bool:
        if generation != self._generation.get(device):
            return False
        self._pending.discard(device)
        return True

    @property
    def all_acked(self) -> bool:
        return not self._pending

    @property
    def pending(self) -> frozenset[str]:
        return frozenset(self._pending)


class _Marker(enum.Enum):
    END = "end"


@dataclass(frozen=True)
class _InitDataSent:
    generation: int


Chunk = bytes | Slot  # migration data: bytes, or a slot of user memory holding it
_StreamItem = Chunk | _InitDataSent | _Marker


# --- progress ---------------------------------------------------------------------------


class Progress:
    """What the orchestrator tells about its progress; every method does
    nothing here (override what you need).  Exceptions are logged, ignored."""

    def phase(self, name: str) -> None:
        """setup | precopy | switchover | cleanup | completed | failed"""

    def devices(self, names: Sequence[str]) -> None:
        """The devices, once, before anything else about them."""

    def bytes_moved(self, device: str, phase: str, n: int) -> None:
        """`n` more bytes read from the device's source ("precopy" | "stop-copy")."""

    def pending(self, device: str, initial_bytes: int, dirty_bytes: int) -> None:
        """The cached PRECOPY_INFO counters now."""

    def reinit(self, device: str, initial_bytes: int) -> None:
        """A REINIT: new initial bytes."""

    def close(self) -> None:
        """The migration ended (completed or failed)."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}M"


class TerminalProgress(Progress):
    """One line per redraw on stderr with carriage returns: the phase, and per
    device a bar of initial+dirty left against the most seen, and the bytes
    moved.  Draws nothing unless the stream is a TTY and CI is unset."""

    def __init__(
        self, stream: TextIO | None = None, *, min_interval_s: float = 0.1, width: int = 12
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) and "CI" not in os.environ
        self.min_interval_s = min_interval_s
        self.width = width
        self._phase = ""
        self._names: list[str] = []
        self._moved: dict[str, dict[str, int]] = {}
        self._pending: dict[str, tuple[int, int]] = {}
        self._peak: dict[str, int] = {}
        self._reinits: dict[str, int] = {}
        self._last = 0.0
        self._drawn = 0

    def devices(self, names: Sequence[str]) -> None:
        self._names = list(names)

    def phase(self, name: str) -> None:
        self._phase = name
        self._draw(force=True)

    def bytes_moved(self, device: str, phase: str, n: int) -> None:
        d = self._moved.setdefault(device, {})
        d[phase] = d.get(phase, 0) + n
        self._draw()

    def pending(self, device: str, initial_bytes: int, dirty_bytes: int) -> None:
        self._pending[device] = (initial_bytes, dirty_bytes)
        left = initial_bytes + dirty_bytes
        self._peak[device] = max(self._peak.get(device, 0), left)
        self._draw()

    def reinit(self, device: str, initial_bytes: int) -> None:
        self._reinits[device] = self._reinits.get(device, 0) + 1
        self._peak[device] = initial_bytes
        self._draw(force=True)

    def close(self) -> None:
        self._draw(force=True)
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        parts = [f"[{self._phase or '-'}]"]
        for name in self._names or sorted(self._moved):
            init, dirty = self._pending.get(name, (0, 0))
            peak = self._peak.get(name, 0)
            done = 1.0 if peak == 0 else 1.0 - (init + dirty) / peak
            fill = round(max(0.0, min(1.0, done)) * self.width)
            moved = self._moved.get(name, {})
            parts.append(
                f"{name} [{'#' * fill}{'.' * (self.width - fill)}]"
                f" init {_mib(init)} dirty {_mib(dirty)}"
                f" pre {_mib(moved.get('precopy', 0))} stop {_mib(moved.get('stop-copy', 0))}"
                + (f" reinit {self._reinits[name]}" if name in self._reinits else "")
            )
        return "  ".join(parts)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        self.stream.write("\r\x1b[K" + self.line())
        self.stream.flush()
        self._drawn += 1


def _notify(progress: Progress | None, method: str, *args: Any) -> None:
    if progress is None:
        return
    try:
        getattr(progress, method)(*args)
    except Exception:  # progress must never break a migration
        log.exception("progress.%s failed", method)


# --- multifd --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Packet:
    idx: int
    data: Chunk
    last: bool = False  # the end of the device's stop-copy data (empty)


class _Multifd:
    """One device's multifd stop-copy: channels (source -> destination) and
    the destination's reorder buffer, bounded by the queued bytes."""

    def __init__(self, name: str, options: MigrationOptions, report: DeviceReport) -> None:
        self.name = name
        self.channels = options.multifd_channels
        self.max_queued = max(1, options.multifd_max_queued_bytes)
        self.jitter_s = options.multifd_jitter_s
        self.report = report
        self.cond = asyncio.Condition()
        self.reorder: dict[int, _Packet] = {}
        self.next_idx = 0  # the next index to write
        self.queued = 0  # bytes sent and not yet written
        self.error: BaseException | None = None
        self._queues: list[asyncio.Queue[_Packet | None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._sent = 0
        self._arrived = 0  # every index below has arrived
        self._ahead: set[int] = set()  # arrived, above a missing index: held back

    # source side

    def start(self) -> None:
        for i in range(self.channels):
            q: asyncio.Queue[_Packet | None] = asyncio.Queue()
            rng = random.Random(f"{self.name}/{i}")
            self._queues.append(q)
            self._tasks.append(
                asyncio.create_task(self._channel(q, rng), name=f"multifd-{self.name}-{i}")
            )

    async def send(self, data: Chunk, *, last: bool = False) -> None:
        """Queue a packet on the next channel (round robin); waits while the
        queued bytes would go over the bound (one packet always fits)."""
        n = len(data)
        async with self.cond:
            await self.cond.wait_for(
                lambda: (
                    self.error is not None or self.queued == 0 or self.queued + n <= self.max_queued
                )
            )
            if self.error is not None:
                raise MigrationError(f"{self.name} destination: load failed: {self.error}")
            self.queued += n
            r = self.report
            r.multifd_max_queued_bytes = max(r.multifd_max_queued_bytes, self.queued)
        packet = _Packet(self._sent, data, last)
        self._queues[self._sent % self.channels].put_nowait(packet)
        self._sent += 1
        self.report.multifd_packets += 1

    async def finish(self) -> None:
        """The last packet sent: close the channels, wait for them."""
        for q in self._queues:
            q.put_nowait(None)
        await asyncio.gather(*self._tasks)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _channel(self, q: asyncio.Queue[_Packet | None], rng: random.Random) -> None:
        while (p := await q.get()) is not None:
            if self.jitter_s > 0:
                await asyncio.sleep(rng.uniform(0, self.jitter_s))
            async with self.cond:
                r = self.report
                self.reorder[p.idx] = p
                if p.idx != self._arrived:  # ahead of a lower index still on its way
                    r.multifd_out_of_order += 1
                    self._ahead.add(p.idx)
                else:
                    self._arrived += 1
                    while self._arrived in self._ahead:
                        self._ahead.discard(self._arrived)
                        self._arrived += 1
                r.multifd_max_reorder_depth = max(r.multifd_max_reorder_depth, len(self._ahead))
                self.cond.notify_all()

    # destination side

    async def write_in_order(self, write: Callable[[Chunk], Awaitable[int]]) -> None:
        """Write the packets strictly by index until the last one."""
        while True:
            async with self.cond:
                await self.cond.wait_for(lambda: self.next_idx in self.reorder)
                p = self.reorder.pop(self.next_idx)
            if p.data:
                await write(p.data)  # without the lock: channels keep delivering
            async with self.cond:
                self.next_idx += 1
                self.queued -= len(p.data)
                self.cond.notify_all()
            if p.last:
                return

    async def fail(self, exc: BaseException) -> None:
        async with self.cond:
            self.error = exc
            self.cond.notify_all()


async def _put(q: asyncio.Queue[Any], item: Any, consumer: asyncio.Future[Any]) -> None:
    """Queue `item` for `consumer`, waiting for room; if the consumer ends
    first, raise what it failed with (a bounded queue would wait forever)."""
    if not consumer.done():
        try:
            q.put_nowait(item)
            return
        except asyncio.QueueFull:
            pass
        put = asyncio.ensure_future(q.put(item))
        await asyncio.wait({put, consumer}, return_when=asyncio.FIRST_COMPLETED)
        if put.done():
            return
        put.cancel()
    consumer.result()  # raises its error
    raise MigrationError("the destination stopped taking data")


class _DataWriter:
    """The destination's write(2)s on one data fd, as one call while data
    flows (a call per chunk costs a round trip each):

    * bytes go on a Write call: `write` queues a chunk (bounded);
    * a user memory slot the driver maps goes on a WriteFromStream call, and
      is given back when the driver answers that write (a slot it cannot map
      is copied onto the Write call and given back at once).

    `flush` ends the open call and returns once the driver has taken every
    chunk (the bytes taken); the next `write` opens a new call.  Switching
    between the two kinds flushes, so the writes stay in order."""

    def __init__(self, client: VfioClient, fd: int, depth: int) -> None:
        self.client, self.fd, self.depth = client, fd, max(1, depth)
        self._q: asyncio.Queue[bytes | None] = asyncio.Queue(self.depth)
        self._call: asyncio.Task[int] | None = None
        self._from: WriteFromCall | None = None
        self._answers: asyncio.Task[int] | None = None  # reads _from's answers
        self._in_flight: collections.deque[Slot] = collections.deque()

    async def write(self, data: Chunk) -> int:
        if isinstance(data, Slot):
            addr = data.addr(self.client)
            if addr is not None:
                return await self._write_from(data, addr)
            buf = bytes(data.view)
            data.release()
            data = buf
        if self._from is not None:
            await self._flush_from()
        if self._call is None:
            q = self._q = asyncio.Queue(self.depth)

            async def chunks() -> AsyncIterator[bytes]:
                while (c := await q.get()) is not None:
                    yield c

            self._call = asyncio.ensure_future(self.client.write(self.fd, chunks()))
        await _put(self._q, data, self._call)
        return len(data)

    async def _write_from(self, slot: Slot, addr: int) -> int:
        if self._call is not None:
            await self._flush_write()
        if self._answers is not None and self._answers.done():
            await self._flush_from()  # raises what a write failed with
        if self._from is None or self._answers is None:
            call = self._from = self.client.write_from_stream(self.fd)
            self._answers = asyncio.ensure_future(self._take_answers(call))
        self._in_flight.append(slot)
        await self._from.submit(addr, len(slot))
        if self._answers.done():  # it ended meanwhile: nobody else gives the slot back
            while self._in_flight:
                self._in_flight.popleft().release()
        return len(slot)

    async def _take_answers(self, call: WriteFromCall) -> int:
        """Each answer gives its slot back; the bytes taken in all."""
        total = 0
        try:
            while (n := await call.result()) is not None:
                total += n
                self._in_flight.popleft().release()
        finally:
            while self._in_flight:
                self._in_flight.popleft().release()
        return total

    async def flush(self) -> int:
        """Everything queued is written: the bytes the open call took."""
        if self._from is not None:
            return await self._flush_from()
        return await self._flush_write()

    async def _flush_write(self) -> int:
        if self._call is None:
            return 0
        call = self._call
        await _put(self._q, None, call)
        self._call = None
        return await call

    async def _flush_from(self) -> int:
        assert self._from is not None and self._answers is not None
        call, answers = self._from, self._answers
        self._from = self._answers = None
        if not answers.done():
            with contextlib.suppress(asyncio.InvalidStateError):  # it failed: answers says how
                await call.close_writing()
        return await answers

    async def cancel(self) -> None:
        if self._call is not None:
            call, self._call = self._call, None
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await call
        if self._from is not None and self._answers is not None:
            self._from.cancel()
            self._answers.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._answers
            self._from = self._answers = None


# --- one device -------------------------------------------------------------------------


class DeviceMigration:
    """One device: the source half (saving) and the destination half (resuming)."""

    def __init__(
        self, pair: DevicePair, index: int, ack: SwitchoverAck, options: MigrationOptions
    ) -> None:
        self.pair = pair
        self.name = pair.name or f"dev{index}"
        self.src = pair.source
        self.dst = pair.destination
        self.ack = ack
        self.options = options
        self.report = DeviceReport(self.name)
        self.flags = 0
        self.v2 = False
        self.buffer_size = 0
        self.src_data_fd: int | None = None
        self.dst_data_fd: int | None = None
        self.src_state = S.RUNNING
        self.dst_state = S.RUNNING
        self.in_precopy = False
        self.initial_bytes = 0  # cached
        self.dirty_bytes = 0  # cached
        self.initial_data_sent = False
        self._stream: asyncio.Queue[_StreamItem] = asyncio.Queue(max(1, options.stream_depth))
        self._writer: _DataWriter | None = None
        self._loader: asyncio.Task[None] | None = None
        self._slots: Slots | None = None  # the local data path (user memory)
        self._multifd: _Multifd | None = None
        if options.multifd_channels > 0:
            self._multifd = _Multifd(self.name, options, self.report)

    @property
    def pre_copy(self) -> bool:
        return bool(self.flags & VFIO_MIGRATION_PRE_COPY)

    @property
    def p2p(self) -> bool:
        return bool(self.flags & VFIO_MIGRATION_P2P)

    @property
    def pending_estimate(self) -> int:
        """QEMU vfio_state_pending_estimate: cached init + dirty, no ioctl."""
        return self.initial_bytes + self.dirty_bytes if self.in_precopy else 0

    # --- discovery ---------------------------------------------------------------------

    async def discover(self) -> None:
        self.flags = await self.src.migration_flags(self.pair.source_fd)
        dst_flags = await self.dst.migration_flags(self.pair.destination_fd)
        if not self.flags & VFIO_MIGRATION_STOP_COPY or not dst_flags & VFIO_MIGRATION_STOP_COPY:
            raise MigrationError(f"{self.name}: not migratable (no VFIO_MIGRATION_STOP_COPY)")
        if self.pre_copy:
            # v2 opt-in (REINIT); on failure keep v1 semantics: flags ignored.
            try:
                self.v2 = await self.src.enable_precopy_info_v2(self.pair.source_fd)
            except VfioClientError as e:
                log.warning("%s: MIG_PRECOPY_INFOv2 opt-in failed (%s): v1", self.name, e)
                self.v2 = False
        self.report.dma_logging = await self.src.probe(
            self.pair.source_fd, Feature.DMA_LOGGING_START, VFIO_DEVICE_FEATURE_SET
        )
        stop_copy_length = await self.src.data_size(self.pair.source_fd)
        self.buffer_size = max(1, min(self.options.buffer_cap, stop_copy_length))
        self.src_state = await self.src.get_state(self.pair.source_fd)
        r = self.report
        r.migration_flags, r.pre_copy, r.p2p = self.flags, self.pre_copy, self.p2p
        r.precopy_info_v2, r.buffer_size = self.v2, self.buffer_size

    # --- state changes -----------------------------------------------------------------

    async def _set_state(
        self, client: VfioClient, fd: int, state: MigState, recovery: MigState | None, side: str
    ) -> int | None:
        """vfio_migration_set_state: `state`, else `recovery`, else DeviceReset
        (recovery None = QEMU's ERROR: reset straight away)."""
        try:
            return await client.set_state(fd, state)
        except VfioClientError as e:
            why = f"{self.name} {side}: -> {state.name} failed: {e}"
            if recovery is not None:
                try:
                    await client.set_state(fd, recovery)
                    raise MigrationError(f"{why}; recovered to {recovery.name}") from e
                except VfioClientError as e2:
                    why += f"; recovery {recovery.name} failed: {e2}"
            await client.reset(fd)  # a failing reset propagates: nothing else to try
            raise MigrationError(f"{why}; device reset") from e

    async def set_source(self, state: MigState, recovery: MigState | None) -> int | None:
        fd = await self._set_state(self.src, self.pair.source_fd, state, recovery, "source")
        self.src_state = state
        return fd

    async def set_destination(self, state: MigState, recovery: MigState | None) -> int | None:
        fd = await self._set_state(
            self.dst, self.pair.destination_fd, state, recovery, "destination"
        )
        self.dst_state = state
        return fd

    # --- setup -------------------------------------------------------------------------

    async def setup(self) -> None:
        """Destination to RESUMING (load_setup); source to PRE_COPY (save_setup)."""
        await self._setup_user_memory()
        self.dst_data_fd = await self.set_destination(S.RESUMING, None)
        if self.dst_data_fd is None:
            raise MigrationError(f"{self.name}: RESUMING gave no data fd")
        self._loader = asyncio.create_task(self._load(), name=f"load-{self.name}")
        if self.pre_copy and self.src_state == S.RUNNING:
            self.src_data_fd = await self.set_source(S.PRE_COPY, S.RUNNING)
            if self.src_data_fd is None:
                raise MigrationError(f"{self.name}: PRE_COPY gave no data fd")
            self.in_precopy = True
            info = await self.src.precopy_info(self.src_data_fd)
            self.initial_bytes, self.dirty_bytes = info.initial_bytes, info.dirty_bytes
            self.ack.request(self.name)
            self._pending_progress()

    async def _setup_user_memory(self) -> None:
        """The local data path: one segment of stream_depth buffers, mapped
        by the source's driver (else no use: gRPC) and, if it can, the
        destination's (else writes copy out of it onto a Write call)."""
        mode = self.options.data_path
        if mode not in DATA_PATHS:
            raise MigrationError(f"unknown data path {mode!r} (auto, shm or grpc)")
        self.report.data_path = "grpc"
        if mode == "grpc":
            return
        count = max(2, self.options.stream_depth)
        try:
            mem = UserMemory.create(self.buffer_size * count)
        except OSError as e:
            if mode == "shm":
                raise MigrationError(f"{self.name}: no user memory: {e}") from e
            log.info("%s: no user memory (%s): the data goes over gRPC", self.name, e)
            return
        try:
            src, dst = await mem.attach(self.src), await mem.attach(self.dst)
            mem.seal()
        except BaseException:
            await mem.close()
            raise
        if src is None or (mode == "shm" and dst is None):
            await mem.close()
            if mode == "shm":
                raise MigrationError(f"{self.name}: a driver cannot map our user memory")
            return
        self._slots = Slots(mem, self.buffer_size, count)
        self.report.data_path = "shm" if dst is not None else "shm (source), grpc (destination)"

    async def close_user_memory(self) -> None:
        if self._slots is not None:
            slots, self._slots = self._slots, None
            await slots.memory.close()

    async def _free_slot(self) -> Slot:
        """A free slot: waits for one, or for the destination to fail."""
        assert self._slots is not None and self._loader is not None
        slot = self._slots.try_acquire()
        if slot is not None:
            return slot
        get = asyncio.ensure_future(self._slots.acquire())
        await asyncio.wait({get, self._loader}, return_when=asyncio.FIRST_COMPLETED)
        if not get.done():
            get.cancel()
            self.check_loader()
            raise MigrationError(f"{self.name}: the destination stopped taking data")
        return get.result()

    async def _read_slot(self) -> Slot | None:
        """One read(2) of up to a buffer into a free slot (a precopy
        iteration's): the slot, None when it read nothing."""
        assert self.src_data_fd is not None
        slot = await self._free_slot()
        addr = slot.addr(self.src)
        assert addr is not None
        try:
            slot.length = await self.src.read_into(self.src_data_fd, addr, self.buffer_size)
        except BaseException:
            slot.release()
            raise
        if slot.length == 0:
            slot.release()
            return None
        return slot

    async def _read_chunks(self) -> AsyncIterator[Chunk]:
        """The stop-copy data to the end of the stream, in order."""
        assert self.src_data_fd is not None
        if self._slots is None:
            async for chunk in self.src.read_stream(self.src_data_fd, chunk_size=self.buffer_size):
                if chunk:
                    yield chunk
            return
        # read(2)s into every free slot, ahead of their answers (the driver
        # stops after the read that returns 0); a slot is waited for only
        # when no read is ahead.
        call = self.src.read_into_stream(self.src_data_fd)
        ahead: collections.deque[Slot] = collections.deque()
        try:
            while True:
                while True:
                    slot = await self._free_slot() if not ahead else self._slots.try_acquire()
                    if slot is None:
                        break
                    ahead.append(slot)
                    addr = slot.addr(self.src)
                    assert addr is not None
                    await call.submit(addr, self.buffer_size)
                n = await call.result()
                slot = ahead.popleft()
                if not n:  # 0: the end (None: the call ended after it)
                    slot.release()
                    return
                slot.length = n
                yield slot
        finally:
            while ahead:
                ahead.popleft().release()
            call.cancel()

    def _pending_progress(self) -> None:
        _notify(self.options.progress, "pending", self.name, self.initial_bytes, self.dirty_bytes)

    # --- source: precopy ---------------------------------------------------------------

    async def _send(self, item: _StreamItem) -> None:
        """Onto the migration stream (bounded: waits while the destination is behind)."""
        assert self._loader is not None
        try:
            await _put(self._stream, item, self._loader)
        except VfioClientError as e:  # what the loader failed with
            raise MigrationError(f"{self.name} destination: load failed: {e}") from e

    async def iterate(self) -> int:
        """save_live_iterate: one read of up to the buffer size; the bytes read."""
        if not self.in_precopy or self.src_data_fd is None:
            return 0
        self.report.reads += 1
        data: Chunk | None
        try:
            if self._slots is not None:
                data = await self._read_slot()
            else:
                data = await self.src.read(self.src_data_fd, self.buffer_size)
        except VfioClientError as e:
            if e.errno != errno.ENOMSG:
                raise
            data = None
        if not data:  # empty for now
            self.report.empty_reads += 1
            self.initial_bytes = self.dirty_bytes = 0
        else:
            await self._send(data)
            n = len(data)
            self.report.precopy_bytes += n
            _notify(self.options.progress, "bytes_moved", self.name, "precopy", n)
            taken = min(n, self.initial_bytes)
            self.initial_bytes -= taken
            self.dirty_bytes = max(0, self.dirty_bytes - (n - taken))
        if self.initial_bytes == 0 and not self.initial_data_sent:
            await self._send(_InitDataSent(self.ack.generation(self.name)))
            self.initial_data_sent = True
            self.report.init_data_sent += 1
        return len(data) if data else 0

    async def query_precopy_info(self) -> PrecopyInfo | None:
        """PRECOPY_INFO: refresh the cached counters; the answer if it is a
        REINIT (the caller handles it), else None."""
        if not self.in_precopy or self.src_data_fd is None:
            return None
        info = await self.src.precopy_info(self.src_data_fd)
        if self.v2 and info.reinit:
            return info
        self.initial_bytes, self.dirty_bytes = info.initial_bytes, info.dirty_bytes
        self._pending_progress()
        return None

    def rearm(self, info: PrecopyInfo) -> None:
        """REINIT: new initial bytes, dirty reset, a new switchover-ack needed."""
        self.initial_bytes = info.initial_bytes
        self.dirty_bytes = 0
        self.initial_data_sent = False
        self.ack.request(self.name)
        _notify(self.options.progress, "reinit", self.name, info.initial_bytes)
        self._pending_progress()

    async def exact_pending(self) -> int:
        """vfio_state_pending_exact: stop_copy_length (includes unread precopy data)."""
        try:
            return await self.src.data_size(self.pair.source_fd)
        except VfioClientError:
            return 100 << 30  # QEMU: never switch over on an unknown size

    # --- switchover --------------------------------------------------------------------

    async def to_p2p(self) -> None:
        if self.p2p:
            await self.set_source(S.PRE_COPY_P2P if self.in_precopy else S.RUNNING_P2P, S.RUNNING)

    async def to_stop_copy(self) -> None:
        fd = await self.set_source(S.STOP_COPY, S.STOP)
        self.in_precopy = False
        if fd is not None:  # came from STOP (no precopy): a new saving fd
            self.src_data_fd = fd
        if self.src_data_fd is None:
            raise MigrationError(f"{self.name}: STOP_COPY has no data fd")

    async def drain(self) -> None:
        """save_complete_precopy: read to EOF, in order, into the stream; then
        wait for the destination to have written all of it."""
        assert self.src_data_fd is not None
        self.initial_bytes = self.dirty_bytes = 0
        self._pending_progress()
        if self._multifd is not None:
            await self._drain_multifd(self._multifd)
            return
        async for chunk in self._read_chunks():
            await self._send(chunk)
            self._stop_copy_read(len(chunk))
        await self._send(_Marker.END)
        await self.loaded()

    def _stop_copy_read(self, n: int) -> None:
        self.report.stop_copy_bytes += n
        _notify(self.options.progress, "bytes_moved", self.name, "stop-copy", n)

    async def _drain_multifd(self, mf: _Multifd) -> None:
        """The main stream ends here; the stop-copy data goes as indexed
        packets over the channels, the last one empty."""
        assert self.src_data_fd is not None
        await self._send(_Marker.END)
        mf.start()
        try:
            async for chunk in self._read_chunks():
                await mf.send(chunk)
                self._stop_copy_read(len(chunk))
                self.check_loader()
            await mf.send(b"", last=True)
            await mf.finish()
            await self.loaded()
        finally:
            await mf.stop()

    # --- destination -------------------------------------------------------------------

    async def _load(self) -> None:
        """load_state: write data in stream order; approve on INIT_DATA_SENT;
        with multifd, then the stop-copy packets in index order.  Then
        load_cleanup: the data fd is closed while the device is still
        RESUMING (RESUMING -> STOP ends the stream, and nothing must hold it
        after)."""
        assert self.dst_data_fd is not None
        writer = self._writer = _DataWriter(self.dst, self.dst_data_fd, self.options.stream_depth)
        try:
            await self._load_main(writer)
            if self._multifd is not None:
                await self._multifd.write_in_order(writer.write)
                await writer.flush()
        except BaseException as e:
            await writer.cancel()
            if self._multifd is not None:
                await self._multifd.fail(e)
            raise
        await self._close_data_fd(self.dst, "dst_data_fd")

    async def _load_main(self, writer: _DataWriter) -> None:
        while True:
            item = await self._stream.get()
            if item is _Marker.END:
                await writer.flush()
                return
            if isinstance(item, _InitDataSent):
                # Approve only once everything before the marker is written.
                await writer.flush()
                if self.options.on_switchover_ack is not None:
                    await self.options.on_switchover_ack(self)
                if self.ack.approve(self.name, item.generation):
                    self.report.acks += 1
                continue
            assert isinstance(item, bytes | Slot)
            await writer.write(item)

    def check_loader(self) -> None:
        """Raise what the loader failed with, if it did."""
        if self._loader is not None and self._loader.done() and not self._loader.cancelled():
            exc = self._loader.exception()
            if exc is not None:
                raise MigrationError(f"{self.name} destination: load failed: {exc}") from exc

    async def loaded(self) -> None:
        assert self._loader is not None
        try:
            await self._loader
        except VfioClientError as e:
            raise MigrationError(f"{self.name} destination: load failed: {e}") from e

    # --- cleanup -----------------------------------------------------------------------

    async def _close_data_fd(self, client: VfioClient, attr: str) -> None:
        fd = getattr(self, attr)
        if fd is not None:
            setattr(self, attr, None)
            with contextlib.suppress(VfioClientError):  # EBADF: the session ended
                await client.close(fd)

    async def close_data_fds(self) -> None:
        await self._close_data_fd(self.src, "src_data_fd")
        await self._close_data_fd(self.dst, "dst_data_fd")

    async def abort(self) -> None:
        """Migration failed: data fds closed (nothing more moves on them, and
        the reset below must not cut a stream under a holder), source back to
        RUNNING, destination reset."""
        if self._loader is not None:
            if not self._loader.done():
                self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loader  # (also retrieves what it failed with)
        await self.close_data_fds()
        self.in_precopy = False
        if self.src_state != S.RUNNING:
            try:
                await self.set_source(S.RUNNING, None)
            except (MigrationError, VfioClientError) as e:
                log.error("%s: source recovery failed: %s", self.name, e)
        if self.dst_state != S.RUNNING:
            try:
                await self.dst.reset(self.pair.destination_fd)  # aborts RESUMING
                self.dst_state = S.RUNNING
            except VfioClientError as e:
                log.error("%s: destination reset failed: %s", self.name, e)


# --- the migration ------------------------------------------------------------------------


class _Migration:
    def __init__(self, pairs: Sequence[DevicePair], options: MigrationOptions) -> None:
        self.options = options
        self.ack = SwitchoverAck()
        self.devices = [DeviceMigration(p, i, self.ack, options) for i, p in enumerate(pairs)]
        self.report = MigrationReport(devices=[d.report for d in self.devices])
        self.t0 = time.monotonic()
        self._phase_start = self.t0
        _notify(options.progress, "devices", [d.name for d in self.devices])
        _notify(options.progress, "phase", "setup")

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _phase(self, name: str) -> None:
        t = time.monotonic()
        self.report.phases[self.report.status] = t - self._phase_start
        self.report.status, self._phase_start = name, t
        _notify(self.options.progress, "phase", name)

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
            for d in self.devices:
                await d.abort()
                await d.close_user_memory()
            self._finish("failed")
            if isinstance(e, MigrationError):
                e.report = self.report
                raise
            if isinstance(e, Exception):
                raise MigrationError(self.report.error, self.report) from e
            raise
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
        _notify(self.options.progress, "close")

    async def _run(self) -> None:
        devs = self.devices
        for d in devs:
            await d.discover()
        if len(devs) > 1 and not all(d.p2p for d in devs):
            raise MigrationError("several devices migrate together only if all support P2P")
        for d in devs:
            await d.setup()
        self._phase("precopy")
        if any(d.in_precopy for d in devs):
            await self._precopy()
        else:
            self.report.converged = True
        self._phase("switchover")
        await self._switchover()

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

        async def exact(d: DeviceMigration) -> tuple[int, PrecopyInfo | None]:
            return await d.exact_pending(), await d.query_precopy_info()

        answers = await asyncio.gather(*(exact(d) for d in devs))
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
        for d in devs:  # RESUMING -> STOP: the driver loads and validates
            await d.set_destination(S.STOP, None)
        t = time.monotonic()
        if self.options.on_destinations_loaded is not None:
            await self.options.on_destinations_loaded()
        if self.options.digests is not None:
            await self._verify(self.options.digests)
        self.report.hook_s = time.monotonic() - t
        for d in devs:
            if d.p2p:
                await d.set_destination(S.RUNNING_P2P, None)
        for d in devs:
            await d.set_destination(S.RUNNING, None)
        self.report.downtime_s = time.monotonic() - stop - self.report.hook_s
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
    return await _Migration(pairs, options).run()
