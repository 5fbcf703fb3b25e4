"""The migration image format (model level): write_piece / parse_image /
apply_image round trips, and every corruption refused before any byte of the
target changes."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from fwemu.link.ifc import PAGE_SIZE, KiB, Syndrome
from fwemu.model.device_state import Arena, DeviceState, page_runs
from fwemu.model.image import (
    IMAGE_HEADER_SIZE,
    Cursor,
    ImageError,
    ImageKind,
    Plan,
    apply_image,
    parse_image,
    write_piece,
)

CHAIN = 0xC0FFEE


def whole_image(plan: Plan, arena: Arena, kind: ImageKind, seq: int) -> bytes:
    """`plan` written as one image (piece 0) of chain CHAIN."""
    dest = bytearray(plan.image_size())
    res = write_piece(
        memoryview(dest),
        plan,
        Cursor(),
        arena,
        kind=kind,
        chain_id=CHAIN,
        seq=seq,
        piece=0,
        whole=True,
    )
    return bytes(dest[: res.size])


def full_image(state: DeviceState, *, seq: int = 0) -> bytes:
    return whole_image(Plan.full(state), state.arena, ImageKind.FULL, seq)


def copy_state(state: DeviceState) -> DeviceState:
    return DeviceState(bytearray(state.arena), list(state.objects), state.next_obj_id)


@pytest.fixture(scope="module")
def state() -> DeviceState:
    return DeviceState.generate(96 * KiB + 123, seed=11)


@pytest.fixture(scope="module")
def image(state) -> bytes:
    return full_image(state)


def test_full_image_round_trip(state, image):
    """A whole full image parses back to its header fields and rebuilds the
    state exactly (equal digests) on an empty target."""
    parsed = parse_image(memoryview(image))
    h = parsed.header
    assert (h.kind, h.chain_id, h.seq, h.piece, h.last_piece) == (
        ImageKind.FULL,
        CHAIN,
        0,
        0,
        True,
    )
    assert h.payload_len == len(image) - IMAGE_HEADER_SIZE
    assert image[:4] == b"VHCA"
    rebuilt = apply_image(DeviceState.empty(), parsed, starts_chain=True)
    assert rebuilt.digest() == state.digest()
    assert rebuilt.size == state.size


def test_a_large_image_carries_the_sum_of_its_whole_payload():
    """write_piece sums a large DATA body block by block as it copies it; the
    header's checksum is still xxh3-64 of the whole payload, so the image is
    the same bytes as ever (and it loads)."""
    big = DeviceState.generate(1536 * KiB + 4321, seed=3)  # bodies of several blocks
    image = full_image(big)
    payload_len, checksum = struct.unpack_from("<QQ", image, IMAGE_HEADER_SIZE - 24)
    assert payload_len == len(image) - IMAGE_HEADER_SIZE
    assert checksum == xxhash.xxh3_64_intdigest(image[IMAGE_HEADER_SIZE:])
    rebuilt = apply_image(DeviceState.empty(), parse_image(memoryview(image)), starts_chain=True)
    assert rebuilt.digest() == big.digest()


def test_header_is_52_bytes():
    """README: an image is a 52-byte header and records."""
    assert IMAGE_HEADER_SIZE == 52


def test_whole_image_that_does_not_fit_writes_nothing(state):
    """With `whole`, everything must fit or nothing is written (BUFFER_TOO_SMALL)."""
    plan = Plan.full(state)
    dest = bytearray(plan.image_size() - 1)
    with pytest.raises(ImageError) as e:
        write_piece(
            memoryview(dest),
            plan,
            Cursor(),
            state.arena,
            kind=ImageKind.FULL,
            chain_id=CHAIN,
            seq=0,
            piece=0,
            whole=True,
        )
    assert e.value.syndrome == Syndrome.BUFFER_TOO_SMALL
    assert dest == bytearray(len(dest))


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(PAGE_SIZE + 256, 40 * KiB), size=st.integers(1 * KiB, 64 * KiB))
def test_pieces_round_trip(capacity, size):
    """Property: an image written as pieces of any capacity that holds a page
    (each piece <= capacity, numbered in order, LAST only on the last) rebuilds
    the state when applied in order."""
    state = DeviceState.generate(size, seed=size)
    plan = Plan.full(state)
    cur = Cursor()
    target = DeviceState.empty()
    piece = 0
    while True:
        dest = bytearray(capacity)
        res = write_piece(
            memoryview(dest),
            plan,
            cur,
            state.arena,
            kind=ImageKind.FULL,
            chain_id=CHAIN,
            seq=0,
            piece=piece,
            whole=False,
        )
        assert IMAGE_HEADER_SIZE < res.size <= capacity
        parsed = parse_image(memoryview(dest)[: res.size])
        assert parsed.header.piece == piece
        done = plan.finished(res.cursor)
        assert parsed.header.last_piece == done
        target = apply_image(target, parsed, starts_chain=piece == 0)
        if done:
            break
        cur = res.cursor
        piece += 1
        assert piece < 10_000
    assert target.digest() == state.digest()


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(4 * KiB, 64 * KiB),
    dirty=st.sets(st.integers(0, 15), max_size=16),
    seed=st.integers(0, 2**32),
)
def test_incremental_image_round_trip(size, dirty, seed):
    """Property: an incremental image of changed pages brings a copy of the old
    state to the new one."""
    old = DeviceState.generate(size, seed=seed)
    new = copy_state(old)
    rng = random.Random(seed)
    pages = {p for p in dirty if p < new.num_pages}
    for p in pages:
        base = p * PAGE_SIZE
        n = min(PAGE_SIZE, new.size - base)
        new.arena[base : base + n] = rng.randbytes(n)
    plan = Plan()
    plan.add_pages(page_runs(pages), new.size)
    parsed = parse_image(memoryview(whole_image(plan, new.arena, ImageKind.INCREMENTAL, 1)))
    assert parsed.header.kind == ImageKind.INCREMENTAL
    got = apply_image(copy_state(old), parsed, starts_chain=False)
    assert got.digest() == new.digest()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_single_byte_corruption_is_refused(image, data):
    """Property: changing any one byte anywhere in an image (header, record
    headers, object table, arena bytes) makes parse_image refuse it."""
    at = data.draw(st.integers(0, len(image) - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor")
    bad = bytearray(image)
    bad[at] ^= mask
    with pytest.raises(ImageError) as e:
        parse_image(memoryview(bad))
    assert e.value.syndrome in (
        Syndrome.IMAGE_CHECKSUM,
        Syndrome.IMAGE_BAD_MAGIC,
        Syndrome.IMAGE_TRUNCATED,  # a corrupted length field may claim more bytes
        Syndrome.IMAGE_FOREIGN,
    )


def test_every_header_byte_is_covered(image):
    """Every one of the 52 header bytes is checked (magic or header checksum)."""
    for at in range(IMAGE_HEADER_SIZE):
        bad = bytearray(image)
        bad[at] ^= 0x01
        with pytest.raises(ImageError):
            parse_image(memoryview(bad))


@given(keep=st.integers(0, 10_000))
def test_any_truncation_is_image_truncated(image, keep):
    """Property: any prefix of an image is IMAGE_TRUNCATED."""
    keep = keep % len(image)
    with pytest.raises(ImageError) as e:
        parse_image(memoryview(image[:keep]))
    assert e.value.syndrome == Syndrome.IMAGE_TRUNCATED


def test_refused_apply_leaves_the_target_unchanged(state):
    """An image whose data lies outside the target's state is refused by
    apply_image before any byte changes."""
    small = DeviceState.generate(8 * KiB, seed=3)
    plan = Plan()
    plan.add_pages([(4, 2)], state.size)  # arena bytes 16 KiB..24 KiB of the big state
    parsed = parse_image(memoryview(whole_image(plan, state.arena, ImageKind.INCREMENTAL, 1)))
    before = small.digest()
    with pytest.raises(ImageError) as e:
        apply_image(small, parsed, starts_chain=False)
    assert e.value.syndrome == Syndrome.IMAGE_MALFORMED
    assert small.digest() == before


def test_full_image_must_carry_the_object_table(state):
    """A full image that starts a chain without an object table is IMAGE_MALFORMED."""
    plan = Plan()
    plan.add_pages([(0, 1)], state.size)
    image = whole_image(plan, state.arena, ImageKind.FULL, 0)
    with pytest.raises(ImageError) as e:
        apply_image(DeviceState.empty(), parse_image(memoryview(image)), starts_chain=True)
    assert e.value.syndrome == Syndrome.IMAGE_MALFORMED


def _next_piece(plan: Plan, arena: Arena, capacity: int, cur: Cursor) -> tuple[int, Cursor]:
    """One piece as the firmware writes it (into a buffer of `capacity`, or of
    the next piece's minimum): its size and the cursor after it."""
    dest = bytearray(max(capacity, plan.min_piece(cur)))
    res = write_piece(
        memoryview(dest),
        plan,
        cur,
        arena,
        kind=ImageKind.FULL,
        chain_id=CHAIN,
        seq=0,
        piece=0,
        whole=False,
    )
    return res.size, res.cursor


def _written_pieces_total(plan: Plan, arena: Arena, capacity: int, cur: Cursor) -> int:
    """What write_piece really writes from `cur` on, piece after piece."""
    total = 0
    while not plan.finished(cur):
        size, cur = _next_piece(plan, arena, capacity, cur)
        total += size
    return total


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(PAGE_SIZE + 68, 1536 * KiB),
    size=st.integers(1, 3 * 1024 * KiB),
    runs=st.lists(st.tuples(st.integers(0, 760), st.integers(1, 400)), max_size=4),
    skip=st.integers(0, 3),
)
def test_pieces_size_is_what_the_pieces_write(
    capacity: int, size: int, runs: list[tuple[int, int]], skip: int
) -> None:
    """Property: pieces_size (which counts the repeating pieces of a long
    record instead of cutting each) is exactly the total write_piece writes,
    from the start or from a later piece, for full and page-run plans with
    large (padded) and small records."""
    state = DeviceState.generate(size, seed=size)
    for plan in (Plan.full(state), Plan()):
        if not plan.items:
            plan.add_pages(runs, state.size)
            plan.add_table(state)
        cur = Cursor()
        for _ in range(skip):
            if plan.finished(cur):
                break
            cur = _next_piece(plan, state.arena, capacity, cur)[1]
        assert plan.pieces_size(capacity, cur) == _written_pieces_total(
            plan, state.arena, capacity, cur
        )


def test_pieces_size_of_a_long_record_cuts_few_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunked image's QUERY and SAVE ask for the size of what is left:
    for 64 GiB in 8 MiB pieces that is a few cuts, not 8192."""
    from fwemu.model import image as image_module

    cuts = 0
    real_cut = image_module._cut

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal cuts
        cuts += 1
        return real_cut(*args, **kwargs)

    monkeypatch.setattr(image_module, "_cut", counted)
    plan = Plan([image_module.PlanItem(image_module.REC_DATA, 0, 64 << 30)])
    total = plan.pieces_size(8 << 20)
    assert cuts <= 4
    assert total > 64 << 30
