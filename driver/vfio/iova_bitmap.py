"""struct iova_bitmap (drivers/iommu/iommufd/iova_bitmap.c): the user's dirty
bitmap of a DMA_LOGGING_REPORT, written by the driver's log_read_and_clear.

The bitmap is an array of little-endian u64 words at a user address; bit n
stands for the page_size page at iova + n * page_size.  Bits are only ever set.

As in the kernel since the bitmap is pinned lazily from iova_bitmap_set(), a
part of the bitmap the caller did not map is skipped silently: the report
still succeeds (iova_bitmap_set has no way to return -EFAULT).
"""

from __future__ import annotations

from .usermem import UserMemory

BITS_PER_WORD = 64


class IovaBitmap:
    """Implements ops.IovaBitmap over the caller's memory."""

    def __init__(
        self, user: UserMemory, bitmap_addr: int, iova: int, length: int, page_size: int
    ) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of 2")
        self.iova = iova
        self.length = length
        self.page_size = page_size
        self.bitmap_addr = bitmap_addr
        self._user = user
        self._pgshift = page_size.bit_length() - 1

    @property
    def nbits(self) -> int:
        """Bits the bitmap covers: one per page_size page of [iova, iova + length)."""
        return -(-self.length // self.page_size)

    @property
    def nbytes(self) -> int:
        """Size of the user bitmap: nbits rounded up to whole u64 words."""
        return -(-self.nbits // BITS_PER_WORD) * (BITS_PER_WORD // 8)

    def set(self, iova: int, length: int) -> None:
        """Mark the pages covering [iova, iova + length) dirty.

        Only the part inside the bitmap's own range is marked; the kernel writes
        whatever bits a misbehaving driver asks for within the pinned pages, a
        driver bug we do not reproduce.
        """
        start = max(iova, self.iova)
        end = min(iova + length, self.iova + self.length)
        if start >= end:
            return
        first = (start - self.iova) >> self._pgshift
        last = (end - 1 - self.iova) >> self._pgshift
        self._set_bits(first, last)

    def _set_bits(self, first: int, last: int) -> None:
        lo, hi = first // 8, last // 8  # byte indexes inside the bitmap
        lo_mask = (0xFF << (first % 8)) & 0xFF
        hi_mask = 0xFF >> (7 - last % 8)
        for base, buf in self._user.buffers.items():
            # the bitmap bytes [lo, hi] that this buffer holds
            b0 = max(lo, base - self.bitmap_addr)
            b1 = min(hi + 1, base + len(buf) - self.bitmap_addr)
            if b0 >= b1:
                continue
            off = self.bitmap_addr - base
            if lo == hi:
                buf[off + lo] |= lo_mask & hi_mask
                continue
            if b0 == lo:
                buf[off + lo] |= lo_mask
            if b1 == hi + 1:
                buf[off + hi] |= hi_mask
            full0, full1 = max(b0, lo + 1), min(b1, hi)
            if full0 < full1:
                buf[off + full0 : off + full1] = b"\xff" * (full1 - full0)
