"""Per-page tracking state of a VF while a tracked SAVE session runs.

Each arena page is CLEAN (captured by the last tracked SAVE), DIRTY (written
since) or INIT (new initial data from a reconfiguration, which an incremental
image carries before any dirty page).  One byte per page, so the questions a
QUERY asks (is anything INIT? which runs are DIRTY?) are answered by C-speed
scans instead of sorting Python sets: a 256 MiB VF has 65,536 pages and the
driver queries once per precopy iteration.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

CLEAN, DIRTY, INIT = 0, 1, 2

_RUNS = {DIRTY: re.compile(rb"\x01+"), INIT: re.compile(rb"\x02+")}


class PageStates:
    __slots__ = ("_b",)

    def __init__(self, num_pages: int = 0, value: int = CLEAN) -> None:
        self._b = bytearray([value]) * num_pages

    def __len__(self) -> int:
        return len(self._b)

    def resize(self, num_pages: int) -> None:
        """Pages added are CLEAN; pages beyond `num_pages` are forgotten."""
        if num_pages > len(self._b):
            self._b.extend(bytes(num_pages - len(self._b)))
        else:
            del self._b[num_pages:]

    def state(self, page: int) -> int:
        return self._b[page] if page < len(self._b) else CLEAN

    def mark_dirty(self, pages: Iterable[int]) -> None:
        """Written pages become DIRTY unless they are INIT already."""
        b = self._b
        for p in pages:
            if p >= len(b):
                self.resize(p + 1)
            if b[p] == CLEAN:
                b[p] = DIRTY

    def mark_init(self, pages: range) -> None:
        if pages.stop > len(self._b):
            self.resize(pages.stop)
        self._b[pages.start : pages.stop] = bytes([INIT]) * len(pages)

    def clean(self, first: int, last: int) -> None:
        """Pages [first, last) were captured."""
        last = min(last, len(self._b))
        if last > first:
            self._b[first:last] = bytes(last - first)

    @property
    def has_init(self) -> bool:
        return self._b.find(INIT) >= 0

    @property
    def has_dirty(self) -> bool:
        return self._b.find(DIRTY) >= 0

    def count(self, value: int) -> int:
        return self._b.count(value)

    def runs(self, value: int) -> list[tuple[int, int]]:
        """Sorted (first page, count) runs of pages in state `value`."""
        return [(m.start(), m.end() - m.start()) for m in _RUNS[value].finditer(self._b)]
