"""One emulated VF: its capabilities, device state, workload, suspend state and
migration context (dirty tracking, image chains, chunked saves, loads)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace

import xxhash

from ..link.ifc import (
    PAGE_SIZE,
    MiB,
    QueryVhcaMigState,
    ReconfigMode,
    VfConfig,
    obj_type_index,
)
from .device_state import DeviceState
from .faults import FaultQueue
from .image import Cursor, ImageKind, Plan
from .memory import MemoryBudget, OutOfMemory
from .page_track import PageTrackObject
from .pages import DIRTY, INIT, PageStates
from .reconfig_rate import MAX_PER_LOOK, ReconfigRate
from .workload import Workload

log = logging.getLogger("fwemu.firmware")

# What reconfigurations (and images loaded) may add to a VF's configured size:
# as much again, at least 64 MiB (README, "Device state").
MIN_GROWTH = 64 * MiB


def size_limit(config: VfConfig) -> int:
    """The largest device state a VF of `config` may hold."""
    return config.size + max(config.size, MIN_GROWTH)


def _reconfig_rng(seed: int) -> random.Random:
    """The generator of what reconfigurations write (seeded from the VF's seed)."""
    return random.Random(seed ^ 0x12EC_0F16)


@dataclass(slots=True)
class ReconfigTrigger:
    trigger_id: int
    objects: list[tuple[int, int]]  # (type index, size); empty = one QP of reconfig_bytes
    at_time: float | None = None
    after_saved_bytes: int | None = None
    mode: int = ReconfigMode.ADD

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

    def __init__(
        self,
        vf_id: int,
        config: VfConfig,
        seed: int,
        uid: str,
        now: float,
        memory: MemoryBudget | None = None,
    ) -> None:
        self.vf_id = vf_id
        self.config = config
        self.seed = seed
        self.uid = uid  # firmware-unique; seeds chain ids
        self.state = DeviceState.generate(config.size, seed, memory)
        self.workload = Workload(seed, config.dirty_bytes_per_s, now)
        self.faults = FaultQueue()
        self._reconfig_rng = _reconfig_rng(seed)
        self.triggers: list[ReconfigTrigger] = []
        self.auto = ReconfigRate(seed, config.reconfig_rate_per_s, now)
        self.auto_dropped = 0  # automatic reconfigurations that did not fit
        self.last_time = now
        # PCI/firmware function state
        self.initiator_suspended = False
        self.responder_suspended = False
        # The state as it was while the VF was last suspended (what a stop-copy
        # image of it holds), for suspended_digest(): while the state has not
        # changed since, it is the state itself; its digest is kept at the
        # first change, so that no digest is taken unless the VF changes.
        self._as_suspended = False
        self._suspended_digest = ""
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
        self.page_trackers: dict[int, PageTrackObject] = {}
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

    def suspended_digest(self) -> str:
        """The digest of the state the VF had while it was last suspended (its
        state now, while it is; "" if it never was): a migration's source,
        whatever ran on it since its stop-copy, should have the digest its
        destination loaded."""
        return self.state.digest() if self._as_suspended else self._suspended_digest

    def state_changing(self) -> None:
        """Called before anything changes the state: the first change after
        the VF left suspension keeps the digest of the suspended state."""
        if self._as_suspended and self.running:
            self._suspended_digest = self.state.digest()
            self._as_suspended = False

    @property
    def size_limit(self) -> int:
        """The largest device state this VF may hold (reconfigured or loaded)."""
        return size_limit(self.config)

    def free(self) -> None:
        """The VF is removed: its state's memory goes back to the firmware."""
        self.state.arena.free()

    # --- time: workload and scheduled reconfigurations ----------------------

    def advance(self, now: float) -> None:
        """Bring the VF to `now`: run the workload, due reconfigurations and
        automatic ones, each at its time (all only while the VF runs; a due
        reconfiguration waits for it, an automatic one is void)."""
        if now < self.last_time:
            now = self.last_time
        if self.running:
            timed = sorted(
                (t for t in self.triggers if t.at_time is not None and t.at_time <= now),
                key=lambda t: (t.at_time or 0.0, t.trigger_id),
            )
            fired = 0
            while True:
                auto_at = self.auto.due(now) if fired < MAX_PER_LOOK else None
                trig_at = max(self.last_time, timed[0].at_time or 0.0) if timed else None
                if trig_at is not None and (auto_at is None or trig_at <= auto_at):
                    self._run_workload(trig_at)
                    self._fire(timed.pop(0))
                elif auto_at is not None:
                    self._run_workload(auto_at)
                    self._fire_auto()
                    fired += 1
                else:
                    break
            self._run_workload(now)
            for trig in [t for t in self.triggers if t.due(now, self.saved_bytes)]:
                self._fire(trig)
        self.auto.restart(now)  # arrivals beyond MAX_PER_LOOK, or while suspended: void
        self.last_time = now

    def _run_workload(self, until: float) -> None:
        self.last_time = max(self.last_time, until)
        writes = self.workload.due(until)
        if writes:
            self.state_changing()
            first = self.workload.counter + 1
            pages = self.workload.run(self.state, writes)
            if self.tracking:
                self.pages.mark_dirty(pages)
            for tracker in self.page_trackers.values():
                for counter, page in enumerate(pages, start=first):
                    tracker.device_wrote(page, counter)

    def _fire(self, trig: ReconfigTrigger) -> None:
        self.triggers.remove(trig)
        try:
            self.reconfigure_now(trig.objects, trig.mode)
        except OutOfMemory as e:
            # Scheduled, so no one to answer: dropped, the VF as it was.
            log.warning(
                "reconfiguration %d dropped: %s",
                trig.trigger_id,
                e,
                extra={"vhca_id": self.vhca_id},
            )

    def _fire_auto(self) -> None:
        self.auto.fired()
        try:
            self.reconfigure_now([], self.config.reconfig_mode)
        except OutOfMemory as e:
            self.auto_dropped += 1
            n = self.auto_dropped
            if n & (n - 1) == 0:  # the 1st, 2nd, 4th, ...: a steady rate does not flood the log
                log.warning(
                    "automatic reconfiguration dropped (%d so far): %s",
                    n,
                    e,
                    extra={"vhca_id": self.vhca_id},
                )

    def reconfigure_now(
        self, objects: list[tuple[int, int]], mode: int = ReconfigMode.ADD
    ) -> range:
        """The guest reconfigures the function: objects added, put in the place
        of the oldest ones, or the oldest ones removed (`mode`).  While
        tracking, the pages written are new initial data and the object table
        changed (migration_state INIT), for removals too.  Returns the pages
        written.  All or nothing: OutOfMemory (no memory, or beyond the VF's
        size limit) changes nothing (no seeded contents are drawn before it)."""
        specs = objects or [(obj_type_index("QP"), self.config.reconfig_bytes)]
        rng, limit = self._reconfig_rng, self.size_limit
        self.state_changing()
        if mode == ReconfigMode.REMOVE:
            changed = self.state.remove_objects(sum(length for _, length in specs)) > 0
            new_pages = range(0)
        elif mode == ReconfigMode.REPLACE:
            new_pages = self.state.replace_objects(specs, rng, limit=limit)
            changed = True
        else:
            new_pages = self.state.add_objects(specs, rng, limit=limit)
            changed = True
        # Partly filled first and last pages hold new bytes too.
        if self.tracking and changed:
            self.pages.mark_init(new_pages)
            self.table_dirty = True
        self.reconfigurations += 1
        return new_pages

    def reset(self, now: float) -> None:
        """ResetVf: the state, workload and automatic reconfigurations as when
        the VF was created with its config and seed; scheduled reconfigurations
        and armed faults dropped; the migration context ended as by an FLR.
        The uid, counters and DMA page trackers stay (the same device).  All
        or nothing: OutOfMemory (for the state) changes nothing.  A SAVE in
        flight is the caller's to abort."""
        if self._as_suspended:  # the reset ends the suspension and changes the state
            self._suspended_digest = self.state.digest()
            self._as_suspended = False
        self.state.regenerate(self.config.size, self.seed)
        self.reset_function(now)
        self.workload = Workload(self.seed, self.config.dirty_bytes_per_s, now)
        self._reconfig_rng = _reconfig_rng(self.seed)
        self.auto = ReconfigRate(self.seed, self.config.reconfig_rate_per_s, now)
        self.triggers.clear()
        self.faults.clear()
        self.last_time = now

    # --- migration_state ---------------------------------------------------

    def migration_state(self) -> QueryVhcaMigState:
        if self.tracking:
            if self.table_dirty or self.pages.has_init:
                return QueryVhcaMigState.OPER_MIGRATION_INIT
            if self.pages.has_dirty:
                return QueryVhcaMigState.OPER_MIGRATION_DIRTY
            return QueryVhcaMigState.OPER_MIGRATION_IDLE
        if self.fully_suspended:
            return QueryVhcaMigState.OPER_MIGRATION_READY
        return QueryVhcaMigState.UNINITIALIZED

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

    def plan_for(self, incremental: bool) -> Plan:
        # Without a tracking session everything would have to be sent.
        return self.incremental_plan() if incremental and self.tracking else self.full_plan()

    def next_piece_size(self, plan: Plan, cur: Cursor) -> int:
        """The buffer the next piece needs: a chunk, less at the end, more if
        its first record (the object table) is larger."""
        chunk = self.config.chunk_size
        return max(min(plan.pieces_size(chunk, cur), chunk), plan.min_piece(cur))

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
        """Change the function's suspend state; the workload runs only while it runs.
        A function that stops first runs what it owed up to `now` (the commands
        brought it up to their own, earlier, clock reading): writes made while
        it ran belong to the state it is suspended with, never to the next
        resume."""
        if self.running and (initiator or responder):
            self.advance(now)
        self.initiator_suspended = initiator
        self.responder_suspended = responder
        if self.running:
            self.workload.resume(now)
        else:
            self.workload.pause(now)
            self._as_suspended = True

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
