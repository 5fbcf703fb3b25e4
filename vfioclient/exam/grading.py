"""Grading one exam run: a pure function from what the driver saw (the two
devices' events and audit findings), the firmware digests and how the run
ended, to a verdict with its reasons.  No gRPC: the runner gathers a `Run`,
tests build one by hand."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

from driver.api.events import (
    ErrorAnswered,
    Event,
    Finding,
    PrecopyAnswered,
    SaveFailed,
    StateChanged,
)

from .traps import Expect, Trap

# audit rule id -> the mistake, in the grader's words (driver/audit.py RULES has the references)
MISTAKES: dict[str, str] = {
    "stop-copy-with-initial-bytes": "switched over with initial bytes unread (after a REINIT: "
    "without re-arming the switchover-ack)",
    "reinit-without-v2": "trusted a REINIT flag without the MIG_PRECOPY_INFOv2 opt-in",
    "read-after-eof": "read the saving data fd after its end of stream",
    "stream-left-open": "kept a data fd open after its state was left",
    "reset-with-open-stream": "reset a device with its data fd open",
}

SAVING = ("PRE_COPY", "PRE_COPY_P2P", "STOP_COPY")


@dataclass
class Run:
    """What the runner saw of one trap's migration."""

    source: str  # PCI names
    destination: str
    events: list[Event] = field(default_factory=list)  # of both devices, in order
    findings: list[Finding] = field(default_factory=list)  # of both devices
    source_digest: str = ""  # of the state the source had while last suspended (stop-copy)
    destination_digest: str = ""  # at the end
    finished: bool = True  # the orchestrator let go of both devices in time


@dataclass
class Verdict:
    trap: str
    passed: bool
    outcome: str  # completed, aborted, refused, incomplete, timeout
    fired: bool  # the trap's moment came (a REINIT answered, a fault hit, ...)
    reasons: list[str]
    attempts: int = 1  # runs on fresh pairs until the trap fired (runner.run_exam)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _states(events: list[Event], device: str) -> list[str]:
    """The device's states in order (each arc's target; a reset is RUNNING)."""
    return [
        e.payload.to_state
        for e in events
        if e.device == device and isinstance(e.payload, StateChanged)
    ]


def outcome(run: Run) -> str:
    """How the migration ended, from the state changes."""
    if not run.finished:
        return "timeout"
    src, dst = _states(run.events, run.source), _states(run.events, run.destination)
    if not src and not dst:
        return "refused"
    loaded = any(a == "RESUMING" and b == "STOP" for a, b in itertools.pairwise(dst))
    if loaded and dst[-1] == "RUNNING" and "STOP_COPY" in src:
        return "completed"
    if not src or src[-1] == "RUNNING":
        return "aborted"
    return "incomplete"


def fired(trap: Trap, run: Run) -> bool:
    """Whether the trap's moment came."""
    evs = run.events
    if trap.reinit:
        return any(
            e.device == run.source and isinstance(e.payload, PrecopyAnswered) and e.payload.reinit
            for e in evs
        ) or any(f.rule == "stop-copy-with-initial-bytes" for f in run.findings)
    if trap.expect is Expect.REFUSE:
        return True
    if trap.trigger is not None:
        when = trap.trigger.when
        return sum(when(e, run.source) for e in evs) >= trap.trigger.nth
    return any(isinstance(e.payload, SaveFailed | ErrorAnswered) for e in evs)


def grade(trap: Trap, run: Run) -> Verdict:
    """The verdict on `run` of `trap`, with every reason it failed (or why it passed)."""
    how = outcome(run)
    reasons: list[str] = []
    for f in run.findings:
        what = MISTAKES.get(f.rule, f.rule)
        side = "source" if f.device == run.source else "destination"
        reason = f"{what} on the {side} (audit rule {f.rule})"
        if reason not in reasons:
            reasons.append(reason)
    src = _states(run.events, run.source)
    dst = _states(run.events, run.destination)
    if how == "timeout":
        reasons.append("the orchestrator did not finish with the devices in time")
    elif how == "incomplete":
        reasons.append(
            f"the migration ended with the source in {src[-1]} and the destination in "
            f"{dst[-1] if dst else 'RUNNING (untouched)'}: neither migrated nor rolled back"
        )
    if how == "completed" and (
        not run.source_digest or run.source_digest != run.destination_digest
    ):
        reasons.append(
            f"destination digest differs ({run.destination_digest or 'none'} != source "
            f"{run.source_digest or 'none'})"
        )
    if how == "aborted" and dst and dst[-1] == "RESUMING":
        reasons.append("the destination was left in RESUMING (abort it with a reset)")
    if trap.expect is Expect.REFUSE and (src or dst):
        reasons.append(
            "changed the state of a device that offers no migration (refuse at discovery)"
        )
    elif trap.expect is Expect.COMPLETE and how == "aborted":
        reasons.append(f"gave up: a correct orchestrator completes here ({trap.correct})")
    elif trap.expect is Expect.ABORT and how == "completed":
        reasons.append("reported a migration that cannot have succeeded")
    if trap.expect is not Expect.REFUSE and how == "refused":
        reasons.append("did not migrate the devices")
    errors = [
        e.payload
        for e in run.events
        if isinstance(e.payload, ErrorAnswered) and e.payload.operation == "set_state"
    ]
    if trap.expect is Expect.REFUSE and errors:
        reasons.append(f"asked for a state change the device refused ({errors[0].errno_name})")
    passed = not reasons
    if passed:
        reasons.append(f"{how}; a correct orchestrator: {trap.correct}")
    return Verdict(trap.name, passed, how, fired(trap, run), reasons)


def summary(verdicts: list[Verdict]) -> dict[str, Any]:
    """The result document (`vfioctl exam --json`)."""
    passed = sum(v.passed for v in verdicts)
    return {
        "passed": passed,
        "failed": len(verdicts) - passed,
        "all_passed": passed == len(verdicts),
        "traps": [v.to_dict() for v in verdicts],
    }
