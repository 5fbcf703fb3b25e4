"""Reconfigurations that replace or remove objects (issue 13): a long run keeps a
VF's state bounded, the arena and image format stay valid (free space between
objects travels in images), and while tracking a replacement or removal is new
initial data (migration_state INIT) that incremental images carry."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwemu.link.ifc import (
    PAGE_SIZE,
    KiB,
    MiB,
    QueryVhcaMigState,
    ReconfigMode,
    VfConfig,
    obj_type_index,
)
from fwemu.model import Firmware, VirtualClock
from fwemu.model.device_state import DeviceObject, DeviceState, TableError
from fwemu.model.image import IMAGE_HEADER_SIZE
from fwemu.model.memory import MemoryBudget, OutOfMemory
from tests.support.fwemu_model import FailingAllocator, load_bytes, save_image, suspend_fully

ADD, REPLACE, REMOVE = ReconfigMode.ADD, ReconfigMode.REPLACE, ReconfigMode.REMOVE
INIT = QueryVhcaMigState.OPER_MIGRATION_INIT
QUIET = VfConfig(size=256 * KiB, dirty_bytes_per_s=0, reconfig_bytes=16 * KiB)


def pair(config: VfConfig = QUIET, seed: int = 3) -> tuple[Firmware, int, int]:
    """A firmware with a source VF and a destination VF (fully suspended)."""
    fw = Firmware(VirtualClock(), seed=seed)
    src, dst = (v.vhca_id for v in fw.create_vfs(2, config))
    suspend_fully(fw, dst)
    return fw, src, dst


def send_changes(fw: Firmware, src: int, dst: int) -> None:
    """An incremental tracked SAVE of everything that changed, loaded on dst."""
    if fw.query_vhca_migration_state(src, incremental=True).required_umem_size:
        assert load_bytes(fw, dst, save_image(fw, src, incremental=True)).ok


def send_final(fw: Firmware, src: int, dst: int) -> None:
    """STOP_COPY: suspend src, its final incremental image loaded on dst."""
    suspend_fully(fw, src)
    assert load_bytes(fw, dst, final_image(fw, src, incremental=True)).ok


def final_image(fw: Firmware, vhca: int, *, incremental: bool) -> bytes:
    """An untracked SAVE of the fully suspended VF (whole, not in pieces)."""
    size = fw.query_vhca_migration_state(vhca, incremental=incremental).required_umem_size
    buf = bytearray(max(size, PAGE_SIZE))
    mkey = fw.create_mkey(memoryview(buf)).mkey
    assert fw.save_vhca_state(vhca, incremental=incremental, mkey=mkey, size=len(buf)).ok
    fw.advance_clock(0)
    fw.destroy_mkey(mkey)
    return bytes(buf[: IMAGE_HEADER_SIZE + int.from_bytes(buf[28:36], "little")])


def full_round_trip(fw: Firmware, src: int) -> str:
    """The digest a fresh VF gets by loading a full image of src."""
    [other] = fw.create_vfs(1, fw.vf(src).config)
    suspend_fully(fw, other.vhca_id)
    suspended = fw.vf(src).fully_suspended
    full = final_image(fw, src, incremental=False) if suspended else save_image(fw, src)
    assert load_bytes(fw, other.vhca_id, full).ok
    digest = fw.digest(other.vhca_id)
    fw.remove_vf(other.vhca_id)
    return digest


def test_10000_replacements_keep_the_state_bounded_and_the_images_exact() -> None:
    """10,000 replacements of 1 to 3 objects (4 to 64 KiB each) during one
    tracking session: the state stays exactly its configured size, the object
    table stays valid and small, and the incremental images sent every 500
    reconfigurations keep the destination equal to the source; a full image
    at the end reproduces it too."""
    fw, src, dst = pair()
    vf = fw.vf(src)
    assert load_bytes(fw, dst, save_image(fw, src)).ok  # the chain starts
    rng = random.Random(13)
    types = ["QP", "CQ", "MKEY", "SRQ"]
    for n in range(1, 10_001):
        objects = [
            (obj_type_index(rng.choice(types)), rng.randrange(4 * KiB, 64 * KiB))
            for _ in range(rng.randint(1, 3))
        ]
        fw.reconfigure(src, objects, mode=REPLACE)
        state = vf.state
        assert state.size == QUIET.size
        assert state.object_bytes <= state.size
        assert len(state.objects) <= QUIET.size // (4 * KiB)
        if n % 500 == 0:
            assert vf.migration_state() == INIT
            send_changes(fw, src, dst)
            assert fw.digest(dst) == fw.digest(src), n
            assert DeviceState.parse_table(state.table_bytes())[2] == state.objects
    assert vf.reconfigurations == 10_000
    assert full_round_trip(fw, src) == fw.digest(src)


def test_replace_puts_the_new_objects_in_the_place_of_the_oldest() -> None:
    """The oldest object goes; the new one starts where it started; the rest
    of its bytes are free space, unchanged; the state does not grow; the pages
    written are those of the new object."""
    s = DeviceState.generate(256 * KiB, 5)
    oldest = s.objects[0]
    assert oldest.length > 3 * PAGE_SIZE
    before = bytes(s.arena)
    pages = s.replace_objects([(obj_type_index("CQ"), 2 * PAGE_SIZE + 1)], random.Random(1))
    assert pages == range(0, 3)
    new = s.objects[0]
    assert (new.offset, new.length, new.type_name) == (0, 2 * PAGE_SIZE + 1, "CQ")
    assert new.obj_id == s.next_obj_id - 1 and oldest not in s.objects
    assert s.objects[1].offset == oldest.end  # the free space lies between them
    assert bytes(s.arena[new.end :]) == before[new.end :]
    assert s.size == 256 * KiB


def test_replace_takes_the_neighbours_it_needs_and_grows_only_beyond_the_whole_state() -> None:
    s = DeviceState.generate(256 * KiB, 5)
    a, b, c = s.objects[:3]
    s.replace_objects([(0, a.length + 1)], random.Random(1))
    assert a not in s.objects and b not in s.objects and c in s.objects
    assert s.size == 256 * KiB
    s.replace_objects([(0, 300 * KiB), (1, 10)], random.Random(1))
    assert [(o.offset, o.length) for o in s.objects] == [(0, 300 * KiB), (300 * KiB, 10)]
    assert s.size == 300 * KiB + 10


def test_replace_at_the_end_of_the_arena_takes_objects_before_the_oldest() -> None:
    """The oldest object last in the arena: the span grows backwards."""
    s = DeviceState.generate(256 * KiB, 5)
    last = s.objects[-1]
    s.objects = [DeviceObject(o.obj_type, o.obj_id + 100, o.offset, o.length) for o in s.objects]
    s.objects[-1] = DeviceObject(last.obj_type, 1, last.offset, last.length)
    s.next_obj_id = 200
    before = s.objects[-2]
    pages = s.replace_objects([(0, last.length + 1)], random.Random(1))
    assert before not in s.objects
    assert s.objects[-1].offset == before.offset and s.size == 256 * KiB
    assert pages.start == before.offset // PAGE_SIZE


def test_remove_takes_the_oldest_objects_and_keeps_their_bytes() -> None:
    """REMOVE of N bytes removes the oldest objects until N bytes are gone; only
    the object table changes (the digest does: it covers the table)."""
    s = DeviceState.generate(256 * KiB, 5)
    first, second = s.objects[:2]
    arena, digest = bytes(s.arena), s.digest()
    assert s.remove_objects(first.length + 1) == 2
    assert s.objects[0].obj_id == 3
    assert bytes(s.arena) == arena and s.size == 256 * KiB
    assert s.object_bytes == 256 * KiB - first.length - second.length
    assert s.digest() != digest
    left = len(s.objects)
    assert s.remove_objects(1 << 40) == left and s.objects == []
    assert s.remove_objects(1) == 0  # nothing left to remove


def test_tables_may_have_free_space_but_objects_never_overlap() -> None:
    s = DeviceState.generate(256 * KiB, 5)
    s.remove_objects(1)
    s.objects.pop()  # free space at the end as well
    assert DeviceState.parse_table(s.table_bytes()) == (s.size, s.next_obj_id, s.objects)
    a, b = s.objects[:2]
    overlap = DeviceState(bytes(s.arena), s.objects.copy(), s.next_obj_id)
    overlap.objects[1] = DeviceObject(b.obj_type, b.obj_id, a.end - 1, b.length)
    with pytest.raises(TableError, match="entry 1"):
        DeviceState.parse_table(overlap.table_bytes())
    past = DeviceState(bytes(s.arena), s.objects.copy(), s.next_obj_id)
    past.objects.append(DeviceObject(0, s.next_obj_id - 1, s.size - 10, 11))
    with pytest.raises(TableError, match="past the end"):
        DeviceState.parse_table(past.table_bytes())


@pytest.mark.parametrize("mode", [REPLACE, REMOVE])
def test_replace_and_remove_while_tracking_are_new_initial_data(mode: ReconfigMode) -> None:
    """Tracking and IDLE; a replacement (its pages) or a removal (the table
    only) makes migration_state INIT; the incremental image carries it and the
    destination is equal again; then IDLE."""
    fw, src, dst = pair()
    assert load_bytes(fw, dst, save_image(fw, src)).ok
    vf = fw.vf(src)
    assert vf.migration_state() == QueryVhcaMigState.OPER_MIGRATION_IDLE
    fw.reconfigure(src, [(0, 10 * KiB)], mode=mode)
    assert vf.migration_state() == INIT
    assert vf.table_dirty and vf.pages.has_init == (mode == REPLACE)
    size = fw.query_vhca_migration_state(src, incremental=True).required_umem_size
    table = vf.state.table_size()
    if mode == REMOVE:
        assert table < size < table + 200  # the object table and headers
    else:
        assert size > table + 10 * KiB
    send_changes(fw, src, dst)
    assert vf.migration_state() == QueryVhcaMigState.OPER_MIGRATION_IDLE
    assert fw.digest(dst) == fw.digest(src)


def test_dirty_pages_of_removed_objects_still_reach_the_destination() -> None:
    """The workload dirties pages, then their objects are removed and the free
    space is reused: the incremental images still make the destination equal."""
    fw, src, dst = pair(VfConfig(size=256 * KiB, dirty_bytes_per_s=512 * KiB))
    assert load_bytes(fw, dst, save_image(fw, src)).ok
    fw.advance_clock(0.25)
    fw.reconfigure(src, [(0, 96 * KiB)], mode=REMOVE)
    fw.advance_clock(0.25)
    send_changes(fw, src, dst)
    fw.reconfigure(src, [(0, 64 * KiB)], mode=REPLACE)
    fw.advance_clock(0.1)
    send_changes(fw, src, dst)
    fw.advance_clock(0.1)
    send_final(fw, src, dst)
    assert fw.digest(dst) == fw.digest(src)


def test_an_image_saved_before_a_removal_still_loads_what_it_saved() -> None:
    fw, src, dst = pair()
    image, digest = save_image(fw, src), fw.digest(src)
    fw.reconfigure(src, [(0, 64 * KiB)], mode=REMOVE)
    fw.reconfigure(src, [(0, 32 * KiB)], mode=REPLACE)
    assert load_bytes(fw, dst, image).ok
    assert fw.digest(dst) == digest != fw.digest(src)


def test_page_trackers_report_after_objects_are_removed() -> None:
    """DMA dirty tracking is of guest memory: removals do not disturb it."""
    fw, src, _ = pair(VfConfig(size=64 * KiB, dirty_bytes_per_s=64 * KiB))
    tracker = fw.create_page_tracker(src, [(0, 1 * MiB)], 12)
    assert tracker.ok
    fw.reconfigure(src, [(0, 1 << 30)], mode=REMOVE)
    assert fw.vf(src).state.objects == []
    fw.advance_clock(0.5)
    assert fw.report_page_tracker(src, tracker.obj_id, 0, 1 * MiB).dirty


def test_a_refused_replacement_changes_nothing_and_draws_nothing() -> None:
    """Beyond the size limit, or no memory to grow: OutOfMemory, the VF as it
    was (table, bytes, ids, tracking pages); the next replacement is the one
    it would have been."""
    alloc = FailingAllocator()
    fws = [Firmware(VirtualClock(), seed=3, allocator=a) for a in (alloc, None)]
    for fw in fws:
        fw.create_vfs(1, QUIET)
        save_image(fw, 1)
    fw, twin = fws
    vf = fw.vf(1)

    def snapshot() -> tuple[object, ...]:
        return vf.digest(), vf.state.next_obj_id, bytes(vf.pages._b), vf.table_dirty

    before = snapshot()
    with pytest.raises(OutOfMemory, match="size limit"):
        fw.reconfigure(1, [(0, vf.size_limit + 1)], mode=REPLACE)
    alloc.arm(MemoryError())
    with pytest.raises(OutOfMemory):
        fw.reconfigure(1, [(0, 300 * KiB)], mode=REPLACE)  # must grow the arena
    alloc.fail = 0
    assert snapshot() == before
    for f in fws:
        f.reconfigure(1, [(0, 300 * KiB)], mode=REPLACE)
    assert fw.digest(1) == twin.digest(1)


def test_remove_of_more_than_the_size_limit_is_everything() -> None:
    """What REMOVE names is how much goes, not what must fit."""
    fw, src, _ = pair()
    fw.reconfigure(src, [(0, VfConfig.MAX_SIZE)], mode=REMOVE)
    assert fw.vf(src).state.objects == [] and fw.vf(src).state.size == QUIET.size


def test_default_objects_are_one_qp_of_reconfig_bytes_in_every_mode() -> None:
    fw, src, _ = pair()
    vf = fw.vf(src)
    fw.reconfigure(src, mode=REPLACE)
    new = max(vf.state.objects, key=lambda o: o.obj_id)
    assert (new.type_name, new.length) == ("QP", QUIET.reconfig_bytes)
    n = len(vf.state.objects)
    smallest = min(o.length for o in vf.state.objects)
    fw.reconfigure(src, mode=REMOVE)
    assert len(vf.state.objects) < n
    assert smallest <= QUIET.reconfig_bytes


step = st.tuples(
    st.sampled_from([ADD, REPLACE, REMOVE, "save", "time"]),
    st.lists(st.integers(1, 48 * KiB), min_size=0, max_size=3),
)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), steps=st.lists(step, min_size=1, max_size=25))
def test_any_sequence_of_adds_replacements_and_removals_migrates_exactly(
    seed: int, steps: list[tuple[object, list[int]]]
) -> None:
    """Random reconfigurations, workload time and incremental SAVEs during one
    tracking session: after the final incremental image the destination equals
    the source, and a full image of the source reproduces it on a fresh VF."""
    cfg = VfConfig(size=64 * KiB, dirty_bytes_per_s=64 * KiB, reconfig_bytes=8 * KiB)
    fw, src, dst = pair(cfg, seed)
    assert load_bytes(fw, dst, save_image(fw, src)).ok
    for what, sizes in steps:
        if what == "save":
            send_changes(fw, src, dst)
        elif what == "time":
            fw.advance_clock(0.05)
        else:
            try:
                fw.reconfigure(src, [(0, s) for s in sizes], mode=what)  # type: ignore[arg-type]
            except OutOfMemory:  # ADD beyond the size limit
                assert what == ADD
        state = fw.vf(src).state
        assert DeviceState.parse_table(state.table_bytes())[2] == state.objects
    send_final(fw, src, dst)
    assert fw.digest(dst) == fw.digest(src)
    assert full_round_trip(fw, src) == fw.digest(src)


def test_replace_is_all_or_nothing_when_the_arena_cannot_grow() -> None:
    """DeviceState.replace_objects resizes before it touches the table."""
    alloc = FailingAllocator()
    s = DeviceState.generate(64 * KiB, 5, MemoryBudget(1 << 30, alloc))
    before = (s.digest(), s.table_bytes(), s.next_obj_id)
    alloc.arm(MemoryError())
    with pytest.raises(OutOfMemory):
        s.replace_objects([(0, 100 * KiB)], random.Random(1))
    assert (s.digest(), s.table_bytes(), s.next_obj_id) == before
