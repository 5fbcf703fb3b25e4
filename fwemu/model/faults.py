"""Faults injected on demand into a VF's firmware commands."""

from __future__ import annotations

from collections.abc import Iterator

from ..link.ifc import Fault, FaultKind
from .limits import MAX_ARMED_FAULTS, LimitReached


class FaultQueue:
    """A VF's armed faults, consumed in the order they were injected."""

    __slots__ = ("faults",)

    def __init__(self) -> None:
        self.faults: list[Fault] = []

    def add(self, fault: Fault, ids: Iterator[int]) -> None:
        """Arm `fault` with the next of `ids`: ValueError (bad fields) or
        LimitReached (MAX_ARMED_FAULTS armed) before anything changes, the id
        drawn only once it is accepted."""
        fault.validate()
        if len(self.faults) >= MAX_ARMED_FAULTS:
            raise LimitReached(f"a VF holds at most {MAX_ARMED_FAULTS} armed faults")
        fault.fault_id = next(ids)
        self.faults.append(fault)

    def take(self, kind: FaultKind, opcode: int | None = None) -> Fault | None:
        for f in self.faults:
            if f.kind == kind and (opcode is None or f.opcode == opcode):
                f.count -= 1
                if f.count <= 0:
                    self.faults.remove(f)
                return f
        return None

    def remove(self, fault_id: int) -> bool:
        """Drop the armed fault `fault_id`: whether it was armed."""
        for f in self.faults:
            if f.fault_id == fault_id:
                self.faults.remove(f)
                return True
        return False

    def has(self, kind: FaultKind) -> bool:
        return any(f.kind == kind for f in self.faults)

    def clear(self) -> int:
        n = len(self.faults)
        self.faults.clear()
        return n
