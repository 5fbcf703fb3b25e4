"""What the firmware's commands act on: its VFs, host memory (mkeys), completion
EQ, clock, counters and id spaces.  The command modules take it as their first
argument; `Firmware` (firmware.py) is this state with the public methods on top."""

from __future__ import annotations

import itertools
import secrets

from ..link.ifc import MAX_U16, NoSuchVf, VfConfig
from .clock import Clock
from .events import CompletionQueue
from .memory import Allocator, MemoryBudget
from .mkeys import MkeyTable
from .stats import FirmwareStats
from .vf import Vf


class FirmwareState:
    MAX_VFS = MAX_U16 - 1

    def __init__(
        self,
        clock: Clock,
        *,
        seed: int = 0,
        defaults: VfConfig | None = None,
        memory_limit: int | None = None,
        allocator: Allocator | None = None,
    ) -> None:
        """`memory_limit`: bytes of VF state and firmware-held host memory
        (default: from the machine's memory, memory.default_memory_limit);
        `allocator`: where VF state gets its memory (tests make it fail)."""
        self.clock = clock
        self.seed = seed
        self.defaults = defaults or VfConfig()
        self.vfs: dict[int, Vf] = {}  # by vhca_id
        # Principals holding each VF's device open, as drivers say (SetVfHoldersIn).
        self.holders: dict[int, frozenset[str]] = {}
        self.memory = MemoryBudget(memory_limit, allocator or Allocator())
        self.mkeys = MkeyTable(self.memory)
        self.events = CompletionQueue()
        self.stats = FirmwareStats()
        self.tokens = itertools.count(1)  # SAVE tokens the firmware picks
        self.ids = itertools.count(1)  # fault, trigger and general object ids
        self.vf_serial = itertools.count(1)
        # Image chains of two firmware instances never match, even with one seed.
        self.instance = secrets.randbits(64)

    def vf(self, vhca_id: int) -> Vf:
        try:
            return self.vfs[vhca_id]
        except KeyError:
            raise NoSuchVf(vhca_id) from None
