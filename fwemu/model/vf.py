"""One emulated VF: its capabilities, device state, workload, suspend state and
migration context (dirty tracking, image chains, chunked saves, loads)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import xxhash

from .constants import PAGE_SIZE, KiB, MiB, MigState
from .device_state import DeviceState, Workload, obj_type_index
from .faults import FaultQueue
from .image import Cursor, ImageKind, Plan
from .page_track import PageTracker
from .pages import DIRTY, INIT, PageStates


@dataclass(slots=True)
class Caps:
    """Migration capability bits of the VF's firmware (all set = current firmware)."""

    migration: bool = True  # cmd_hca_cap.migration
    adv_virtualization: bool = True  # cmd_hca_cap.adv_virtualization
    migratable: bool = True  # cmd_hca_cap_2.migratable
    migration_multi_load: bool = True
    migration_tracking_state: bool = True
    migration_in_chunks: bool = True
    migration_state: bool = True  # the 2026 REINIT series

    def migration_capable(self) -> bool:
        """Whether the firmware does migration commands for this function at all.
        (mlx5vf asks for more before it enables migration: multi_load and
        tracking_state too; that is the driver's rule, not the firmware's.)"""
        return self.migration and self.migratable


@dataclass(slots=True)
class VfConfig:
    size: int = 4 * MiB
    seed: int | None = None  # None: derived from the firmware seed and the VF number
    dirty_bytes_per_s: int = 1 * MiB
    save_bandwidth: int = 0  # bytes/s; 0 = unlimited
    save_latency_s: float = 0.0
    chunk_size: int = 8 * MiB
    reconfig_bytes: int = 256 * KiB
    caps: Caps = field(default_factory=Caps)

    MIN_SIZE = 1 * KiB
    MAX_SIZE = 16 << 30

    def validate(self) -> None:
        if not self.MIN_SIZE <= self.size <= self.MAX_SIZE:
            raise ValueError(f"size must be between {self.MIN_SIZE} and {self.MAX_SIZE} bytes")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise ValueError("seed must be a 64-bit unsigned value")
        if self.dirty_bytes_per_s < 0 or self.save_bandwidth < 0:
            raise ValueError("rates cannot be negative")
        if not 0 <= self.save_latency_s <= 3600:
            raise ValueError("save_latency_s must be between 0 and 3600 seconds")
        if not PAGE_SIZE <= self.chunk_size <= (1 << 32) - PAGE_SIZE:
            raise ValueError("chunk_size must be between 4 KiB and 4 GiB - 4 KiB")
        if not 1 <= self.reconfig_bytes <= self.MAX_SIZE:
            raise ValueError("reconfig_bytes must be positive")


@dataclass(slots=True)
class ReconfigTrigger:
    trigger_id: int
    objects: list[tuple[int, int]]  # (type index, size); empty = one QP of reconfig_bytes
    at_time: float | None = None
    after_saved_bytes: int | None = None

    def due(self, now: float, saved_bytes: int) -> bool:
        if self.at_time is not None:
            return self.at_time <= now
        if self.after_saved_bytes is not None:
            return saved_bytes >= self.after_saved_bytes
        return True


@dataclass(slots=True)
class ChunkedSave:
    """An untracked image being saved in pieces (chunk mode)."""

    plan: Plan
    cursor: Cursor
    kind: ImageKind
    seq: int
    next_piece: int
    chain_id: int


@dataclass(slots=True)
class LoadChain:
    """What the next LOAD must continue: chain, image seq and piece."""

    chain_id: int
    seq: int
    next_piece: int  # 0: a new image (seq + 1) is expected


class Vf:
    """An emulated VF.  Methods here enforce the state rules; Firmware validates
    command fields and routes commands."""

    def __init__(self, vf_id: int, config: VfConfig, seed: int, uid: str, now: float) -> None:
        self.vf_id = vf_id
        self.config = config
        self.seed = seed
        self.uid = uid  # firmware-unique; seeds chain ids
        self.state = DeviceState.generate(config.size, seed)
        self.workload = Workload(seed, config.dirty_bytes_per_s, now)
        self.faults = FaultQueue()
        self._reconfig_rng = random.Random(seed ^ 0x12EC_0F16)
        self.triggers: list[ReconfigTrigger] = []
        self.last_time = now
        # PCI/firmware function state
        self.initiator_suspended = False
        self.responder_suspended = False
        # saving side
        self.tracking = False
        self.pages = PageStates()  # CLEAN/DIRTY/INIT while tracking
        self.table_dirty = False
        self.chain_id = 0
        self.next_seq = 0
        self.chains_started = 0
        self.chunk_armed = False
        self.chunked: ChunkedSave | None = None
        self.save_in_flight: int | None = None  # token
        # loading side
        self.load_chain: LoadChain | None = None
        self.loads_since_suspend = 0
        # DMA dirty tracking objects (PAGE_TRACK)
        self.page_trackers: dict[int, PageTracker] = {}
        # counters
        self.saved_bytes = 0
        self.loaded_bytes = 0
        self.reconfigurations = 0

    # --- identity -------------------------------------------------------------

    @property
    def vhca_id(self) -> int:
        return self.vf_id + 1

    @property
    def function_id(self) -> int:
        return self.vf_id + 1

    @property
    def running(self) -> bool:
        return not (self.initiator_suspended or self.responder_suspended)

    @property
    def fully_suspended(self) -> bool:
        return self.initiator_suspended and self.responder_suspended

    def digest(self) -> str:
        return self.state.digest()

    # --- time: workload and scheduled reconfigurations ----------------------

    def advance(self, now: float) -> None:
        """Bring the VF to `now`: run the workload and due reconfigurations
        (both only while the VF runs; a due reconfiguration waits for it)."""
        if now < self.last_time:
            now = self.last_time
        if self.running:
            for trig in sorted(
                (t for t in self.triggers if t.at_time is not None and t.at_time <= now),
                key=lambda t: (t.at_time or 0.0, t.trigger_id),
            ):
                at = max(self.last_time, trig.at_time or 0.0)
                self._run_workload(at)
                self._fire(trig)
            self._run_workload(now)
            for trig in [t for t in self.triggers if t.due(now, self.saved_bytes)]:
                self._fire(trig)
        self.last_time = now

    def _run_workload(self, until: float) -> None:
        self.last_time = max(self.last_time, until)
        writes = self.workload.due(until)
        if writes:
            first = self.workload.counter + 1
            pages = self.workload.run(self.state, writes)
            if self.tracking:
                self.pages.mark_dirty(pages)
            for tracker in self.page_trackers.values():
                for counter, page in enumerate(pages, start=first):
                    tracker.device_wrote(page, counter)

    def _fire(self, trig: ReconfigTrigger) -> None:
        self.triggers.remove(trig)
        self.reconfigure_now(trig.objects)

    def reconfigure_now(self, objects: list[tuple[int, int]]) -> range:
        """The guest reconfigures the function: new objects with new contents.
        While tracking, their pages are new initial data (migration_state INIT)."""
        specs = objects or [(obj_type_index("QP"), self.config.reconfig_bytes)]
        new_pages = self.state.add_objects(specs, self._reconfig_rng)
        # A partly filled last page may now hold new bytes too.
        if self.tracking:
            self.pages.mark_init(new_pages)
            self.table_dirty = True
        self.reconfigurations += 1
        return new_pages

    def add_trigger(self, trig: ReconfigTrigger, now: float) -> None:
        self.advance(now)
        self.triggers.append(trig)
        self.advance(now)

    # --- migration_state ---------------------------------------------------

    def migration_state(self) -> MigState:
        if self.tracking:
            if self.table_dirty or self.pages.has_init:
                return MigState.OPER_MIGRATION_INIT
            if self.pages.has_dirty:
                return MigState.OPER_MIGRATION_DIRTY
            return MigState.OPER_MIGRATION_IDLE
        if self.fully_suspended:
            return MigState.OPER_MIGRATION_READY
        return MigState.UNINITIALIZED

    # --- saving-side plans --------------------------------------------------

    def incremental_plan(self) -> Plan:
        """Everything changed since the last tracked SAVE; new initial data first."""
        plan = Plan()
        if self.table_dirty:
            plan.add_table(self.state)
        size = self.state.size
        plan.add_pages(self.pages.runs(INIT), size)
        plan.add_pages(self.pages.runs(DIRTY), size)
        return plan

    def full_plan(self) -> Plan:
        return Plan.full(self.state)

    def next_chain_id(self) -> int:
        """The id the next full image's chain will have (unique per firmware instance)."""
        return xxhash.xxh3_64_intdigest(
            f"{self.uid}:{self.seed}:{self.chains_started + 1}".encode()
        )

    def begin_chain(self, chain_id: int) -> None:
        self.chains_started += 1
        self.chain_id = chain_id
        self.next_seq = 1  # the full image was seq 0

    def captured(self, ranges: list[tuple[int, int]], table_written: bool) -> None:
        """A tracked SAVE captured these arena ranges: they are clean again."""
        if table_written:
            self.table_dirty = False
        size = self.state.size
        for off, length in ranges:
            first = off // PAGE_SIZE
            end = off + length
            last = end // PAGE_SIZE if end < size else self.state.num_pages
            self.pages.clean(first, last)

    def start_tracking_after_full(self, captured_ranges: list[tuple[int, int]]) -> None:
        """A full tracked SAVE starts a session; what it did not capture is dirty."""
        self.tracking = True
        self.table_dirty = False
        self.pages = PageStates(self.state.num_pages, DIRTY)
        self.captured(captured_ranges, table_written=True)

    def end_tracking(self) -> None:
        self.tracking = False
        self.pages = PageStates()
        self.table_dirty = False

    def set_suspended(self, *, initiator: bool, responder: bool, now: float) -> None:
        """Change the function's suspend state; the workload runs only while it runs."""
        self.initiator_suspended = initiator
        self.responder_suspended = responder
        if self.running:
            self.workload.resume(now)
        else:
            self.workload.pause(now)

    def reset_function(self, now: float) -> None:
        """PCI FLR: the function runs again and forgets any migration context."""
        self.end_tracking()
        self.chunked = None
        self.chunk_armed = False
        self.load_chain = None
        self.loads_since_suspend = 0
        self.set_suspended(initiator=False, responder=False, now=now)

    def with_config(self, **changes: object) -> VfConfig:
        return replace(self.config, **changes)  # type: ignore[arg-type]
