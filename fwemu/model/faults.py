"""Faults injected on demand into a VF's firmware commands."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .constants import CmdStatus, Opcode, Syndrome


class FaultKind(enum.IntEnum):
    FAIL = 1  # the command fails with status/syndrome
    DELAY = 2  # the command answers delay_s later
    DROP_COMPLETION = 3  # a SAVE's completion never arrives
    DELAY_COMPLETION = 4  # a SAVE's completion arrives delay_s later
    TRACKING_LOST = 5  # the tracking session is lost: the next incremental SAVE fails


COMMAND_OPCODES = frozenset(
    {
        Opcode.SUSPEND_VHCA,
        Opcode.RESUME_VHCA,
        Opcode.QUERY_VHCA_MIGRATION_STATE,
        Opcode.SAVE_VHCA_STATE,
        Opcode.LOAD_VHCA_STATE,
    }
)


@dataclass(slots=True)
class Fault:
    kind: FaultKind
    opcode: int = Opcode.SAVE_VHCA_STATE
    status: int = CmdStatus.INT_ERR
    syndrome: int = Syndrome.INJECTED
    delay_s: float = 0.0
    count: int = 1
    in_completion: bool = False
    fault_id: int = 0

    def validate(self) -> None:
        if self.count < 1:
            raise ValueError("a fault must hit at least one command")
        if self.kind in (FaultKind.FAIL, FaultKind.DELAY) and self.opcode not in COMMAND_OPCODES:
            raise ValueError(
                f"opcode {self.opcode:#x} is not a migration command "
                f"(one of {', '.join(f'{o:#x}' for o in sorted(COMMAND_OPCODES))})"
            )
        if self.kind == FaultKind.FAIL and not 0 < self.status <= 0xFF:
            raise ValueError("a FAIL fault needs a non-zero 8-bit firmware status")
        if not 0 <= self.syndrome <= 0xFFFFFFFF:
            raise ValueError("syndrome is a 32-bit value")
        if self.kind in (FaultKind.DELAY, FaultKind.DELAY_COMPLETION) and self.delay_s <= 0:
            raise ValueError("a delay fault needs delay_s > 0")
        if self.in_completion and not (
            self.kind == FaultKind.FAIL and self.opcode == Opcode.SAVE_VHCA_STATE
        ):
            raise ValueError("in_completion applies to SAVE_VHCA_STATE FAIL faults only")
        if self.kind in (FaultKind.DROP_COMPLETION, FaultKind.DELAY_COMPLETION):
            self.opcode = Opcode.SAVE_VHCA_STATE


class FaultQueue:
    """A VF's armed faults, consumed in the order they were injected."""

    __slots__ = ("faults",)

    def __init__(self) -> None:
        self.faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        fault.validate()
        self.faults.append(fault)

    def take(self, kind: FaultKind, opcode: int | None = None) -> Fault | None:
        for f in self.faults:
            if f.kind == kind and (opcode is None or f.opcode == opcode):
                f.count -= 1
                if f.count <= 0:
                    self.faults.remove(f)
                return f
        return None

    def has(self, kind: FaultKind) -> bool:
        return any(f.kind == kind for f in self.faults)

    def clear(self) -> int:
        n = len(self.faults)
        self.faults.clear()
        return n
