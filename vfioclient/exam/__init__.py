"""The exam for orchestrators (`vfioctl exam`): scenario presets that each put
a classic trap in a migration's way (traps.py, examples/exam/), a runner that
arms them one at a time and follows the driver while the orchestrator under
test migrates (runner.py), and a pure grader (grading.py) that says pass or
fail, and why, from the audit, the events and the digests."""

from .grading import MISTAKES, Run, Verdict, grade, outcome, summary
from .runner import Pair, run_exam, run_trap
from .traps import TRAPS, Expect, Trap, Trigger

__all__ = [
    "MISTAKES",
    "TRAPS",
    "Expect",
    "Pair",
    "Run",
    "Trap",
    "Trigger",
    "Verdict",
    "grade",
    "outcome",
    "run_exam",
    "run_trap",
    "summary",
]
