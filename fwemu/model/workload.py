"""The guest workload of a running VF: page writes at a rate, each stamping a
counter into the page, in a sequence fixed by the seed (fwemu.model.vf runs
it up to the time a VF is looked at)."""

from __future__ import annotations

import random
import struct

from ..link.ifc import PAGE_SIZE
from .device_state import DeviceState

_STAMP = struct.Struct("<Q")

# Page writes one run performs one by one; more are counted, not performed, so
# that a tick costs bounded CPU whatever the rate (128 MiB of writes per look).
MAX_WRITES_PER_RUN = 1 << 15


class Workload:
    """A guest workload that dirties device state at a rate while the VF runs.

    The sequence of writes is fixed by the seed, and how far along it the VF
    is depends only on how long it has run: never on how often anyone looked
    (writes due = rate x running time / page size, counted from absolute times).
    Each write stamps a counter into one page, so every write changes the state.
    A run owing more than MAX_WRITES_PER_RUN writes performs that many and
    counts the rest as done: at such rates the VF is dirty throughout anyway,
    and its contents then depend on how often it is looked at.
    """

    __slots__ = ("_acc", "_done", "_rng", "_start", "counter", "dirty_bytes_per_s")

    def __init__(self, seed: int, dirty_bytes_per_s: int, now: float) -> None:
        self._rng = random.Random(seed ^ 0x5EED_D1B7)
        self.dirty_bytes_per_s = dirty_bytes_per_s
        self._acc = 0.0  # page writes owed by running intervals that ended
        self._start: float | None = now  # start of the current running interval
        self._done = 0
        self.counter = 0

    def due(self, now: float) -> int:
        """Page writes owed up to `now` and not yet performed."""
        owed = self._acc
        if self._start is not None and now > self._start:
            owed += self.dirty_bytes_per_s * (now - self._start) / PAGE_SIZE
        return max(0, int(owed) - self._done)

    def pause(self, now: float) -> None:
        if self._start is not None:
            self._acc += self.dirty_bytes_per_s * max(0.0, now - self._start) / PAGE_SIZE
            self._start = None

    def resume(self, now: float) -> None:
        if self._start is None:
            self._start = now

    def set_rate(self, dirty_bytes_per_s: int, now: float) -> None:
        running = self._start is not None
        self.pause(now)
        self.dirty_bytes_per_s = dirty_bytes_per_s
        if running:
            self.resume(now)

    def run(self, state: DeviceState, writes: int) -> list[int]:
        """Perform `writes` page writes (at most MAX_WRITES_PER_RUN of them one
        by one); returns the pages written, in order."""
        arena = state.arena.view
        size = len(arena)
        npages = state.num_pages
        self._done += writes
        if npages == 0:
            return []
        # rng.randrange(npages), inlined: the same draws (Random._randbelow's
        # getrandbits(k) until one is below npages), so the same pages for a
        # seed, at a third of the cost: this loop is what an idle VF's first
        # look costs the firmware's one thread.
        getrandbits = self._rng.getrandbits
        k = npages.bit_length()
        stamp = _STAMP.size
        pack_into = _STAMP.pack_into
        full = size - size % PAGE_SIZE  # pages below it hold PAGE_SIZE bytes
        whole_slots = PAGE_SIZE - PAGE_SIZE % stamp
        counter = self.counter
        written: list[int] = []
        append = written.append
        for _ in range(min(writes, MAX_WRITES_PER_RUN)):
            page = getrandbits(k)
            while page >= npages:
                page = getrandbits(k)
            base = page * PAGE_SIZE
            counter += 1
            if base < full:
                pack_into(arena, base + (counter * stamp) % whole_slots, counter)
            else:  # the last page, shorter than the others
                room = size - base
                if room >= stamp:
                    pack_into(arena, base + (counter * stamp) % (room - room % stamp), counter)
                else:
                    arena[base] = counter & 0xFF
            append(page)
        # Counted after the performed ones, which keep counters first, first + 1, ...
        self.counter = counter + max(0, writes - MAX_WRITES_PER_RUN)
        return written
