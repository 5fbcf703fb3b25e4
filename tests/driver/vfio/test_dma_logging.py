"""DMA_LOGGING_START / STOP / REPORT: vfio_ioctl_device_feature_logging_* of
drivers/vfio/vfio_main.c and the IOVA bitmap of drivers/iommu/iommufd/iova_bitmap.c."""

from __future__ import annotations

import errno

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from driver.vfio.errors import VfioError
from driver.vfio.iova_bitmap import IovaBitmap
from driver.vfio.uapi import (
    DMA_LOGGING_CONTROL,
    DMA_LOGGING_RANGE,
    DMA_LOGGING_REPORT,
    Feature,
)
from driver.vfio.usermem import UserMemory
from tests.support.vfio_fakes import GET, SET, FakeDriver, feature, open_device, raises_errno, run

START = Feature.DMA_LOGGING_START | SET
STOP = Feature.DMA_LOGGING_STOP | SET
REPORT = Feature.DMA_LOGGING_REPORT | GET
RANGES = 0x7000_0000
BITMAP = 0x5000_0000
U64 = 2**64
K4 = 4096


def ranges_memory(ranges: list[tuple[int, int]]) -> UserMemory:
    raw = b"".join(DMA_LOGGING_RANGE.pack(i, n) for i, n in ranges)
    return UserMemory({RANGES: bytearray(raw)})


async def start(
    driver: FakeDriver,
    ranges: list[tuple[int, int]],
    page_size: int = K4,
    *,
    num: int | None = None,
    mem: UserMemory | None = None,
) -> bytes:
    device = await open_device(driver)
    control = DMA_LOGGING_CONTROL.pack(page_size, len(ranges) if num is None else num, 0, RANGES)
    return await feature(device, START, control, user=mem or ranges_memory(ranges))


# -- START --------------------------------------------------------------------------------


async def test_start_hands_the_ranges_sorted_and_writes_back_the_page_size():
    """log_start gets the ranges in interval-tree order and may change page_size, which is
    copied back into the control struct (the other fields as the user gave them)."""
    driver = FakeDriver()
    driver.log_page_size = 2 * 1024 * 1024
    ranges = [(0x30000, 0x1000), (0x10000, 0x2000), (0x20000, 0x1000)]
    out = await start(driver, ranges)
    assert driver.called("log_start") == [("log_start", sorted(ranges), K4)]
    assert DMA_LOGGING_CONTROL.unpack(out) == (2 * 1024 * 1024, 3, 0, RANGES)


async def test_start_with_no_ranges_is_einval():
    """num_ranges == 0 -> -EINVAL."""
    driver = FakeDriver()
    with raises_errno(errno.EINVAL):
        await start(driver, [])
    assert driver.called("log_start") == []


@pytest.mark.parametrize("num", [257, 1000, 2**32 - 1])
async def test_more_ranges_than_fit_a_page_is_e2big(num):
    """num_ranges > PAGE_SIZE / sizeof(range) (256) -> -E2BIG, before any range is read."""
    with raises_errno(errno.E2BIG):
        await start(FakeDriver(), [], num=num, mem=UserMemory())


async def test_256_ranges_are_accepted():
    """LOG_MAX_RANGES itself is fine."""
    driver = FakeDriver()
    await start(driver, [(i * 2 * K4, K4) for i in range(256)])
    assert len(driver.called("log_start")[0][1]) == 256


@pytest.mark.parametrize("available", [0, 15, 16, 31])
async def test_unreadable_range_array_is_efault(available):
    """Each range is copy_from_user'd in turn: a range not mapped -> -EFAULT (after the earlier
    ranges passed their checks)."""
    ranges = [(0, K4), (K4, K4)]
    raw = b"".join(DMA_LOGGING_RANGE.pack(i, n) for i, n in ranges)[:available]
    driver = FakeDriver()
    with raises_errno(errno.EFAULT):
        await start(driver, ranges, mem=UserMemory({RANGES: bytearray(raw)}))
    assert driver.called("log_start") == []


def is_aligned(x: int, a: int) -> bool:
    """IS_ALIGNED(x, a) on u64: (x & (a - 1)) == 0, a - 1 wrapping for a == 0."""
    return x & ((a - 1) % U64) == 0


@settings(max_examples=300, deadline=None)
@given(
    page_shift=st.integers(0, 30),
    iova_pages=st.integers(0, 2**20),
    len_pages=st.integers(1, 2**10),
    iova_off=st.sampled_from([0, 0, 1, 512, K4 - 1]),
    len_off=st.sampled_from([0, 0, 1, 512, K4 - 1]),
)
def test_start_alignment(page_shift, iova_pages, len_pages, iova_off, len_off):
    """iova and length must be aligned to page_size -> else -EINVAL."""
    page = 1 << page_shift
    iova = iova_pages * page + iova_off
    length = len_pages * page + len_off
    assume(iova + length < U64)
    driver = FakeDriver()
    if is_aligned(iova, page) and is_aligned(length, page):
        run(start(driver, [(iova, length)], page))
        assert driver.called("log_start") == [("log_start", [(iova, length)], page)]
    else:
        with raises_errno(errno.EINVAL):
            run(start(driver, [(iova, length)], page))


@pytest.mark.parametrize(
    ("page_size", "rng", "ok"),
    [(0, (K4, K4), False), (0, (0, 0), True), (3 * K4, (4 * K4, 4 * K4), True),
     (3 * K4, (K4, K4), True), (3 * K4, (2 * K4, 4 * K4), False)],
)  # fmt: skip
async def test_start_does_not_validate_page_size(page_size, rng, ok):
    """The core never checks page_size itself: IS_ALIGNED masks with page_size - 1, so 0 only
    lets zero values through and 0x3000 (mask 0x2fff) accepts 0x1000 and 0x4000 but not
    0x2000 (the driver clamps page_size)."""
    driver = FakeDriver()
    if ok:
        await start(driver, [rng], page_size)
        assert driver.called("log_start")[0][2] == page_size
    else:
        with raises_errno(errno.EINVAL):
            await start(driver, [rng], page_size)


@pytest.mark.parametrize(
    ("rng", "code"),
    [((U64 - K4, K4), errno.EOVERFLOW), ((U64 - 2 * K4, K4), None), ((0, U64 - K4), None),
     ((K4, U64 - K4), errno.EOVERFLOW), ((U64 - K4, 2**63), errno.EOVERFLOW)],
)  # fmt: skip
async def test_start_overflow(rng, code):
    """check_add_overflow(iova, length) on u64 -> -EOVERFLOW (iova + length == 2^64 wraps)."""
    driver = FakeDriver()
    if code is None:
        await start(driver, [rng])
    else:
        with raises_errno(code):
            await start(driver, [rng])


async def test_alignment_is_checked_before_overflow():
    """Order inside one range: alignment (-EINVAL) before overflow (-EOVERFLOW)."""
    with raises_errno(errno.EINVAL):
        await start(FakeDriver(), [(U64 - K4, K4 + 1)])


@pytest.mark.parametrize(
    ("ranges", "code"),
    [([(0, K4), (K4, 1)], errno.EINVAL),  # range 1 misaligned
     ([(0, 2 * K4), (K4, K4), (U64 - K4, K4)], errno.EINVAL),  # range 1 overlaps, 2 overflows
     ([(0, K4), (U64 - K4, K4), (0, K4)], errno.EOVERFLOW)],  # range 1 overflows, 2 overlaps
)  # fmt: skip
async def test_ranges_are_checked_in_order(ranges, code):
    """Each range is fully checked before the next one is read: the first bad one decides."""
    with raises_errno(code):
        await start(FakeDriver(), ranges)


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 64), st.integers(1, 8)), min_size=1, max_size=12).map(
        lambda rs: [(i * K4, n * K4) for i, n in rs]
    )
)
def test_overlapping_ranges_are_einval(ranges):
    """A range that overlaps an earlier one -> -EINVAL (interval_tree_iter_first); touching
    ranges are fine."""
    bad = any(overlaps(ranges[i], ranges[j]) for i in range(len(ranges)) for j in range(i))
    driver = FakeDriver()
    if bad:
        with raises_errno(errno.EINVAL):
            run(start(driver, ranges))
        assert driver.called("log_start") == []
    else:
        run(start(driver, ranges))
        assert driver.called("log_start")[0][1] == sorted(ranges)


async def test_zero_length_range_reaches_the_driver():
    """There is no length check: a zero-length range passes the core (the driver decides)."""
    driver = FakeDriver()
    await start(driver, [(2 * K4, 0), (0, K4)])
    assert driver.called("log_start")[0][1] == [(0, K4), (2 * K4, 0)]


async def test_log_start_error_is_returned_and_nothing_copied_back():
    """A log_start failure is the ioctl's result; the control struct stays as it was."""
    driver = FakeDriver()
    driver.errors["log_start"] = VfioError(errno.EOPNOTSUPP)
    driver.log_page_size = 8 * K4
    device = await open_device(driver)
    control = bytearray(DMA_LOGGING_CONTROL.pack(K4, 1, 0, RANGES))
    with raises_errno(errno.EOPNOTSUPP):
        await feature(device, START, control, user=ranges_memory([(0, K4)]))
    assert control == DMA_LOGGING_CONTROL.pack(K4, 1, 0, RANGES)
    assert driver.called("log_stop") == []


# -- STOP -----------------------------------------------------------------------------------


async def test_stop_calls_log_stop():
    """DMA_LOGGING_STOP: SET, no data (minsz 0) -> log_stop; its error is returned."""
    driver = FakeDriver()
    device = await open_device(driver)
    assert await feature(device, STOP) == b""
    assert driver.called("log_stop") == [("log_stop",)]
    driver.errors["log_stop"] = VfioError(errno.EIO)
    with raises_errno(errno.EIO):
        await feature(device, STOP)


# -- REPORT -----------------------------------------------------------------------------------


async def report(
    driver: FakeDriver, iova: int, length: int, page_size: int = K4, mem: UserMemory | None = None
) -> UserMemory:
    device = await open_device(driver)
    mem = mem or UserMemory({BITMAP: bytearray(64)})
    await feature(
        device, REPORT, DMA_LOGGING_REPORT.pack(iova, length, page_size, BITMAP), user=mem
    )
    return mem


@pytest.mark.parametrize("page_size", [0, 1, 2048, K4 - 1, 3 * K4, K4 + 1, 2**63 + 1])
async def test_report_page_size_must_be_a_power_of_two_of_4k_or_more(page_size):
    """page_size < SZ_4K or !is_power_of_2 -> -EINVAL (checked before the overflow test)."""
    driver = FakeDriver()
    with raises_errno(errno.EINVAL):
        await report(driver, U64 - K4, 2 * K4, page_size)
    assert driver.called("log_read_and_clear") == []


@pytest.mark.parametrize(("iova", "length"), [(U64 - K4, K4), (1, U64 - 1), (U64 - 1, 2**63)])
async def test_report_overflow_is_eoverflow(iova, length):
    """check_add_overflow(iova, length) -> -EOVERFLOW."""
    with raises_errno(errno.EOVERFLOW):
        await report(FakeDriver(), iova, length)


async def test_report_short_data_is_efault():
    """The 32-byte report struct is copied in: fewer bytes -> -EFAULT."""
    device = await open_device(FakeDriver())
    raw = DMA_LOGGING_REPORT.pack(0, K4, K4, BITMAP)
    with raises_errno(errno.EFAULT):
        await feature(device, REPORT, raw[:31], argsz=40)


async def test_report_marks_the_pages_the_driver_reports():
    """log_read_and_clear gets [iova, iova + length) in one call; bit n of the u64 array is
    the page at iova + n * page_size; marks outside the range are not written."""
    driver = FakeDriver()
    iova = 0x100000
    driver.dirty = [(iova, 1), (iova + 5 * K4 + 7, K4), (iova + 64 * K4, 3 * K4),
                    (iova - K4, K4), (iova + 200 * K4, K4)]  # fmt: skip
    mem = await report(driver, iova, 128 * K4)
    assert driver.called("log_read_and_clear") == [("log_read_and_clear", iova, 128 * K4)]
    bits = int.from_bytes(mem.buffers[BITMAP][:16], "little")
    assert bits == (1 << 0) | (1 << 5) | (1 << 6) | (0b111 << 64)
    assert mem.buffers[BITMAP][16:] == bytes(48)


async def test_report_only_sets_bits():
    """Bits already set in the user's bitmap stay set: the bitmap is only ORed into."""
    driver = FakeDriver()
    driver.dirty = [(K4, K4)]
    mem = UserMemory({BITMAP: bytearray(b"\x81" + bytes(7))})
    await report(driver, 0, 64 * K4, mem=mem)
    assert mem.buffers[BITMAP] == b"\x83" + bytes(7)


async def test_report_with_an_unmapped_bitmap_still_succeeds():
    """iova_bitmap_set pins the user bitmap lazily and has no error return: bits it cannot
    reach are dropped and the ioctl returns the driver's result."""
    driver = FakeDriver()
    driver.dirty = [(0, 8 * K4)]
    mem = await report(driver, 0, 64 * K4, mem=UserMemory({0x1000: bytearray(8)}))
    assert driver.called("log_read_and_clear")
    assert mem.buffers[0x1000] == bytes(8)


async def test_report_zero_length_reaches_the_driver():
    """No length check in the core: a zero-length report calls the driver."""
    driver = FakeDriver()
    await report(driver, K4, 0)
    assert driver.called("log_read_and_clear") == [("log_read_and_clear", K4, 0)]


async def test_report_driver_error_is_returned():
    """The driver's read_and_clear result is the ioctl's."""
    driver = FakeDriver()
    driver.errors["log_read_and_clear"] = VfioError(errno.EIO)
    with raises_errno(errno.EIO):
        await report(driver, 0, K4)


# -- the bitmap itself --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    shift=st.integers(12, 21),
    iova=st.integers(0, 2**40),
    npages=st.integers(1, 300),
    marks=st.lists(st.tuples(st.integers(-50, 350), st.integers(0, 5000)), max_size=8),
    split=st.integers(0, 48),
    gap=st.integers(0, 8),
)
def test_bitmap_sets_exactly_the_pages_covering_each_mark(shift, iova, npages, marks, split, gap):
    """IovaBitmap.set(a, n) sets the bits of the pages overlapping [a, a + n) inside
    [iova, iova + length), nothing else; bytes of the bitmap that are not mapped (a gap
    between two user buffers) are skipped."""
    page = 1 << shift
    length = npages * page - page // 2  # the last page is partly covered
    nbytes = -(-npages // 64) * 8
    split = min(split, nbytes)
    first = bytearray(split)
    second = bytearray(max(nbytes - split - gap, 0))
    mem = UserMemory({BITMAP: first, BITMAP + split + gap: second})
    bitmap = IovaBitmap(mem, BITMAP, iova, length, page)
    assert (bitmap.nbits, bitmap.nbytes) == (npages, nbytes)
    want = 0
    for start_page, nbytes_marked in marks:
        a = iova + start_page * page // 3
        bitmap.set(a, nbytes_marked)
        lo, hi = max(a, iova), min(a + nbytes_marked, iova + length)
        for p in range(npages):
            if lo < hi and lo < iova + (p + 1) * page and iova + p * page < hi:
                want |= 1 << p
    full = want.to_bytes(nbytes, "little")
    assert first == full[:split]
    assert second == full[split + gap :][: len(second)]
