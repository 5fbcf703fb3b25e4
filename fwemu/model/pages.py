"""Per-page tracking state of a VF while a tracked SAVE session runs.

Each arena page is CLEAN (captured by the last tracked SAVE), DIRTY (written
since) or INIT (new initial data from a reconfiguration, which an incremental
image carries before any dirty page).  One byte per page, so the questions a
QUERY asks (is anything INIT? which runs are DIRTY?) are answered by C-speed
scans instead of sorting Python sets: a 256 MiB VF has 65,536 pages and the
driver queries once per precopy iteration.
"""

from __future__ import annotations

from collections.abc import Iterable

CLEAN, DIRTY, INIT = 0, 1, 2

# Per state: a bytes.translate table mapping that state to 1, the others to 0.
_MASKS = {v: bytes(int(i == v) for i in range(256)) for v in (CLEAN, DIRTY, INIT)}


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
        """Sorted (first page, count) runs of pages in state `value`.

        By memchr: the first page of a run is found in the states, its end in
        a mask of them (1 where the state is `value`, else 0).  A regular
        expression walks a long run a byte at a time: right after a chunked
        tracked SAVE most of a 256 MiB VF is one DIRTY run, and every
        PRECOPY_INFO's incremental QUERY asks for it."""
        b = self._b
        start = b.find(value)
        if start < 0:
            return []
        mask = b.translate(_MASKS[value])
        out: list[tuple[int, int]] = []
        while start >= 0:
            end = mask.find(0, start)
            if end < 0:
                end = len(b)
            out.append((start, end - start))
            start = mask.find(1, end)
        return out
