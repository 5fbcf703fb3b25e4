"""The exam's traps: one classic orchestrator mistake each, a scenario preset
(examples/exam/NAME.yaml) that sets it up, and, where a static file cannot
time it, a trigger the runner fires when the driver's Events stream shows
the moment.  Pure data (no gRPC).

Presets are plain scenario files (`fwemu serve --scenario`, ApplyScenario):
VF 1 is the source, VF 2 the destination; the runner renumbers them to the
VFs it creates.  The destination has no workload (dirty rate 0), so its
digest after the migration is the state it loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from driver.api.events import Event, PrecopyAnswered, StateChanged

PRESETS = Path(__file__).resolve().parents[2] / "examples" / "exam"


class Expect(Enum):
    """What a correct orchestrator ends the trap with."""

    COMPLETE = "complete"  # migrated, digests equal
    COMPLETE_OR_ABORT = "complete-or-abort"  # either; an abort leaves the source RUNNING
    ABORT = "abort"  # the migration must fail, the source back in RUNNING
    REFUSE = "refuse"  # the device must not be migrated (no state change at all)


Predicate = Callable[[Event, str], bool]  # (event, source device name) -> fire now


def _source_drained(ev: Event, source: str) -> bool:
    """The source's PRECOPY_INFO answers initial_bytes 0 without REINIT: the
    orchestrator checks readiness; the switchover decision is next."""
    p = ev.payload
    return (
        ev.device == source
        and isinstance(p, PrecopyAnswered)
        and p.initial_bytes == 0
        and not p.reinit
    )


def _source_quiesced(ev: Event, source: str) -> bool:
    """The source went PRE_COPY -> PRE_COPY_P2P: the VM stopped, stop-copy is next."""
    p = ev.payload
    return ev.device == source and isinstance(p, StateChanged) and p.to_state == "PRE_COPY_P2P"


@dataclass(frozen=True)
class Trigger:
    """Act on VF 1 (the source) or 2 when `when` holds the `nth` time: a
    reconfiguration (`reconfigure`: object (type, size) pairs) or a fault
    (`fault`: ScenarioClient.inject_fault arguments, "kind" included)."""

    when: Predicate
    nth: int = 1  # fire on the nth event `when` holds for
    vf: int = 1
    reconfigure: tuple[tuple[str, int], ...] | None = None
    # Reconfigure by the VF's next SAVE (after_saved_bytes: one more than it
    # saved so far) rather than now: the state flips inside the firmware, after
    # the PRECOPY_INFO that starts that SAVE has read it.
    on_next_save: bool = False
    fault: dict[str, Any] | None = None


@dataclass(frozen=True)
class Trap:
    name: str
    what: str  # the trap, in one line
    correct: str  # what a correct orchestrator does (QEMU 11.1)
    expect: Expect
    reinit: bool = False  # a REINIT trap: it fired once the source answered REINIT
    trigger: Trigger | None = None
    preset_file: str = ""

    @property
    def preset(self) -> Path:
        return PRESETS / (self.preset_file or f"{self.name}.yaml")


MiB = 1 << 20

TRAPS: dict[str, Trap] = {
    t.name: t
    for t in (
        Trap(
            "reinit-after-ack",
            "the source is reconfigured as soon as its PRECOPY_INFO answers initial_bytes 0: "
            "INIT_DATA_SENT is sent, the switchover-ack given or on its way; the next "
            "PRECOPY_INFO answers REINIT",
            "request a new switchover-ack (QEMU 11.1's re-usable ack) and leave PRE_COPY only "
            "after the new initial bytes reached 0 and the destination acked them again",
            Expect.COMPLETE_OR_ABORT,
            reinit=True,
            trigger=Trigger(_source_drained, reconfigure=(("QP", 2 * MiB),)),
        ),
        Trap(
            "reinit-after-switchover-decision",
            "when the source's PRECOPY_INFO first answers initial_bytes 0, it is set to be "
            "reconfigured by its next SAVE, which the next PRECOPY_INFO (the readiness check an "
            "orchestrator holding the ack decides on) starts: the PRECOPY_INFO after the "
            "decision answers REINIT",
            "check PRECOPY_INFO once more after the decision (QEMU 11.1's final "
            "save_query_pending): a REINIT there fails the migration, the source back in "
            "RUNNING (or re-arms the ack and goes back to precopy); never switch over with the "
            "new initial bytes unread",
            Expect.COMPLETE_OR_ABORT,
            reinit=True,
            trigger=Trigger(_source_drained, reconfigure=(("QP", 2 * MiB),), on_next_save=True),
        ),
        Trap(
            "reinit-first-precopy-info",
            "the source is reconfigured on its first SAVE: the first PRECOPY_INFO answers REINIT",
            "take initial_bytes as the new absolute value, reset dirty, send INIT_DATA_SENT only "
            "once the new initial bytes are read, switch over after the ack",
            Expect.COMPLETE,
            reinit=True,
        ),
        Trap(
            "tracking-lost",
            "the firmware loses dirty tracking on the source's next incremental SAVE "
            "(PRE_COPY_ERROR: reads fail)",
            "never switch over on a broken stream: a read error fails the migration, the source "
            "back in RUNNING (recovery state, else reset); a stream that stayed whole may "
            "complete, digests equal",
            Expect.COMPLETE_OR_ABORT,
        ),
        Trap(
            "save-fails-in-stop-copy",
            "the source's SAVE fails once the VM stopped (PRE_COPY_P2P -> STOP_COPY)",
            "the STOP_COPY change fails: try its recovery state, else reset; the migration "
            "fails and the source runs again (RUNNING)",
            Expect.ABORT,
            trigger=Trigger(
                _source_quiesced, fault={"kind": "fail", "opcode": "SAVE_VHCA_STATE", "count": 8}
            ),
        ),
        Trap(
            "completion-delayed",
            "the stop-copy SAVE completes 0.5 s late, past a 0.3 s downtime limit",
            "keep reading (the read waits for the SAVE in flight); a slow completion is not the "
            "end of the stream nor a failure: the migration completes, digests equal",
            Expect.COMPLETE,
            trigger=Trigger(
                _source_quiesced,
                fault={"kind": "delay-completion", "opcode": "SAVE_VHCA_STATE", "delay_s": 0.5},
            ),
        ),
        Trap(
            "load-refused",
            "the destination's LOAD fails (RESUMING -> STOP refused)",
            "fail the migration: close the destination's data fd, reset it, and put the source "
            "back in RUNNING so the VM runs on where it was",
            Expect.ABORT,
        ),
        Trap(
            "not-migratable",
            "the source VF lacks a capability mlx5vf requires (migration_tracking_state): the "
            "driver offers no VFIO_DEVICE_FEATURE_MIGRATION",
            "refuse at discovery (QEMU: no STOP_COPY bit, a migration blocker) without changing "
            "any device's state",
            Expect.REFUSE,
        ),
    )
}
