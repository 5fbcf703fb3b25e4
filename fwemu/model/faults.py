"""Faults injected on demand into a VF's firmware commands."""

from __future__ import annotations

from ..link.ifc import Fault, FaultKind


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
