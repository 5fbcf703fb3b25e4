"""The firmware's memory (fwemu/model/memory.py): arena and object-table changes
are all or nothing when an allocation fails, and a budget bounds the VF state
and firmware-held host memory together.  A refused request changes nothing."""

from __future__ import annotations

import errno
import mmap
import os
import random

import pytest

from fwemu.link.ifc import (
    CmdStatus,
    FirmwareError,
    KiB,
    MiB,
    Syndrome,
    VfConfig,
)
from fwemu.model import Firmware, VirtualClock
from fwemu.model.device_state import Arena, DeviceState
from fwemu.model.memory import MemoryBudget, OutOfMemory, default_memory_limit
from tests.support.fwemu_model import FailingAllocator, load_bytes, save_image, suspend_fully

ERRORS = [
    pytest.param(MemoryError(), id="MemoryError"),
    pytest.param(OSError(errno.ENOMEM, "Cannot allocate memory"), id="ENOMEM"),
]


def firmware(**kw: object) -> tuple[Firmware, FailingAllocator]:
    alloc = FailingAllocator()
    return Firmware(VirtualClock(), seed=3, allocator=alloc, **kw), alloc  # type: ignore[arg-type]


def snapshot(fw: Firmware, vhca: int) -> tuple[object, ...]:
    """Everything a refusal must leave alone (the VF brought up to now first)."""
    vf = fw.touch(vhca)
    return (
        vf.digest(),
        vf.state.table_bytes(),
        vf.state.size,
        vf.state.next_obj_id,
        vf.tracking,
        vf.table_dirty,
        bytes(vf.pages._b),
        int(vf.migration_state()),
        vf.reconfigurations,
    )


@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("times", [1, 2], ids=["mremap", "mremap+mmap"])
def test_a_failed_arena_resize_keeps_the_arena(error: BaseException, times: int) -> None:
    """mremap failing: the arena moves to a new mapping.  The new mapping failing
    too: OutOfMemory, and the arena still has its bytes and a usable view."""
    alloc = FailingAllocator()
    arena = Arena(data=bytes(range(256)) * 40, memory=MemoryBudget(1 << 30, alloc))
    before = bytes(arena)
    alloc.arm(error, times)
    if times == 1:
        arena.resize(64 * MiB)
        assert len(arena) == 64 * MiB and bytes(arena[: len(before)]) == before
        assert arena.memory.used == 64 * MiB
        return
    with pytest.raises(OutOfMemory):
        arena.resize(64 * MiB)
    assert bytes(arena) == before and len(arena.view) == len(before)
    assert arena.memory.used == len(before)
    arena[0] = 7  # the view is live
    assert arena[0] == 7


def test_add_objects_is_all_or_nothing() -> None:
    """DeviceState.add_objects grows the arena before it touches the object table."""
    alloc = FailingAllocator()
    state = DeviceState.generate(64 * KiB, 5, MemoryBudget(1 << 30, alloc))
    before = (state.digest(), state.table_bytes(), state.next_obj_id)
    alloc.arm(MemoryError())
    with pytest.raises(OutOfMemory):
        state.add_objects([(0, 8 * KiB), (1, 12 * KiB)], random.Random(1))
    assert (state.digest(), state.table_bytes(), state.next_obj_id) == before


@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("tracking", [False, True], ids=["idle", "tracking"])
def test_a_reconfigure_without_memory_is_refused_and_changes_nothing(
    error: BaseException, tracking: bool
) -> None:
    fw, alloc = firmware()
    vhca, other = (v.vhca_id for v in fw.create_vfs(2, VfConfig(size=256 * KiB)))
    if tracking:
        save_image(fw, vhca)
        fw.advance_clock(0.5)
    before, other_before = snapshot(fw, vhca), fw.digest(other)
    alloc.arm(error)
    with pytest.raises(FirmwareError) as e:
        fw.reconfigure(vhca, [(0, 64 * KiB)])
    assert isinstance(e.value, OutOfMemory) and e.value.syndrome == Syndrome.NO_MEMORY
    alloc.fail = 0
    assert snapshot(fw, vhca) == before
    assert fw.digest(other) == other_before
    assert len(fw.list_vfs()) == 2  # every VF still answers
    # Nothing was used up: the next reconfiguration works and is the one it would have been.
    fw.reconfigure(vhca, [(0, 64 * KiB)])
    assert fw.vf(vhca).state.size == 320 * KiB


def test_reconfigured_contents_do_not_depend_on_a_refusal_before() -> None:
    """A refused reconfiguration draws no seeded contents: the next one is what it
    would have been without the refusal."""
    fw1, _ = firmware()
    fw2, alloc = firmware()
    for fw in (fw1, fw2):
        fw.create_vfs(1, VfConfig(size=64 * KiB, dirty_bytes_per_s=0))
    alloc.arm(MemoryError())
    with pytest.raises(OutOfMemory):
        fw2.reconfigure(1, [(0, 8 * KiB)])
    alloc.fail = 0
    fw1.reconfigure(1, [(0, 8 * KiB)])
    fw2.reconfigure(1, [(0, 8 * KiB)])
    assert fw1.digest(1) == fw2.digest(1)


def test_a_scheduled_reconfigure_without_memory_is_dropped() -> None:
    """A due reconfiguration that cannot get memory is dropped (no one to answer);
    the VF keeps its state and still answers every request."""
    fw, alloc = firmware()
    [vf] = fw.create_vfs(1, VfConfig(size=64 * KiB, dirty_bytes_per_s=0))
    fw.reconfigure(vf.vhca_id, [(0, 8 * KiB)], at_time=1.0)
    before = snapshot(fw, vf.vhca_id)
    alloc.arm(OSError(errno.ENOMEM, "no"))
    fw.advance_clock(2.0)
    fw.touch(vf.vhca_id)  # the trigger is due: it fires and fails
    alloc.fail = 0
    assert snapshot(fw, vf.vhca_id) == before
    assert not vf.triggers
    assert fw.list_vfs()[0].num_objects == len(vf.state.objects)


@pytest.mark.parametrize("error", ERRORS)
@pytest.mark.parametrize("full", [True, False], ids=["full", "incremental"])
def test_a_load_without_memory_fails_with_lim_err_and_changes_nothing(
    error: BaseException, full: bool
) -> None:
    """LOAD whose arena resize fails: LIM_ERR (mlx5 turns it into ENOMEM) /
    NO_MEMORY, the target's digest, table and size as before."""
    fw, alloc = firmware()
    src, other = (v.vhca_id for v in fw.create_vfs(2, VfConfig(size=128 * KiB)))
    [dst] = (v.vhca_id for v in fw.create_vfs(1, VfConfig(size=64 * KiB)))  # loads grow it
    first = save_image(fw, src)
    fw.reconfigure(src, [(0, 64 * KiB)])  # the next image grows the target's arena
    nxt = save_image(fw, src, incremental=True)
    suspend_fully(fw, dst)
    if not full:
        assert load_bytes(fw, dst, first).ok
    before, other_before = snapshot(fw, dst), fw.digest(other)
    alloc.arm(error)
    res = load_bytes(fw, dst, first if full else nxt)
    assert (res.status, res.syndrome) == (CmdStatus.LIM_ERR, Syndrome.NO_MEMORY), res
    alloc.fail = 0
    assert snapshot(fw, dst) == before
    assert fw.digest(other) == other_before
    assert len(fw.list_vfs()) == 3
    # The chain is where it was: the same image loads now.
    assert load_bytes(fw, dst, first if full else nxt).ok


# --- the budget -----------------------------------------------------------------


def test_the_default_limit_comes_from_the_machine() -> None:
    assert 0 < default_memory_limit() <= mmap.PAGESIZE * os.sysconf("SC_PHYS_PAGES")
    assert Firmware(VirtualClock()).memory.limit == default_memory_limit()


def test_create_vfs_beyond_the_limit_is_refused_whole() -> None:
    fw, _ = firmware(memory_limit=1 * MiB)
    fw.create_vfs(2, VfConfig(size=256 * KiB))
    with pytest.raises(OutOfMemory, match="memory limit"):
        fw.create_vfs(3, VfConfig(size=256 * KiB))
    assert len(fw.vfs) == 2 and fw.memory.used == 512 * KiB
    fw.create_vfs(2, VfConfig(size=256 * KiB))  # exactly the limit
    assert fw.memory.used == 1 * MiB


def test_an_allocation_failing_mid_create_vfs_creates_none() -> None:
    fw, alloc = firmware()
    fw.create_vfs(1, VfConfig(size=64 * KiB))
    alloc.arm(MemoryError(), 1)
    with pytest.raises(OutOfMemory):
        fw.create_vfs(3, VfConfig(size=64 * KiB))
    assert list(fw.vfs) == [1] and fw.memory.used == 64 * KiB


def test_removing_a_vf_gives_its_memory_back() -> None:
    fw, _ = firmware(memory_limit=1 * MiB)
    [a, _b] = fw.create_vfs(2, VfConfig(size=512 * KiB, dirty_bytes_per_s=0))
    fw.remove_vf(a.vhca_id)
    assert fw.memory.used == 512 * KiB
    fw.create_vfs(1, VfConfig(size=512 * KiB))


def test_reconfigure_and_load_beyond_the_limit_are_refused() -> None:
    fw, _ = firmware(memory_limit=1 * MiB)
    src, dst = (v.vhca_id for v in fw.create_vfs(2, VfConfig(size=384 * KiB)))
    before = snapshot(fw, src)
    with pytest.raises(OutOfMemory, match="memory limit"):
        fw.reconfigure(src, [(0, 300 * KiB)])
    assert snapshot(fw, src) == before
    fw.reconfigure(src, [(0, 200 * KiB)])  # 968 KiB held
    image = save_image(fw, src)
    suspend_fully(fw, dst)
    before = snapshot(fw, dst)
    res = load_bytes(fw, dst, image)  # the target would grow by 200 KiB
    assert (res.status, res.syndrome) == (CmdStatus.LIM_ERR, Syndrome.NO_MEMORY), res
    assert snapshot(fw, dst) == before
    assert fw.memory.used == 968 * KiB


def test_firmware_held_host_memory_counts_against_the_limit() -> None:
    fw, _ = firmware(memory_limit=1 * MiB)
    fw.create_vfs(1, VfConfig(size=512 * KiB))
    r = fw.create_held_mkey(256 * KiB, owner="a")
    assert r.ok and fw.memory.used == 768 * KiB
    refused = fw.create_held_mkey(512 * KiB, owner="a")
    assert (refused.status, refused.syndrome) == (CmdStatus.LIM_ERR, Syndrome.NO_MEMORY)
    assert fw.memory.used == 768 * KiB
    with pytest.raises(OutOfMemory):
        fw.create_vfs(1, VfConfig(size=512 * KiB))
    assert fw.destroy_mkey(r.mkey).ok
    assert fw.memory.used == 512 * KiB
    assert fw.create_held_mkey(512 * KiB, owner="b").ok
    assert fw.destroy_mkeys_of("b") == 1 and fw.memory.used == 512 * KiB


def test_a_lower_limit_than_what_is_held_is_refused() -> None:
    fw, _ = firmware()
    fw.create_vfs(1, VfConfig(size=512 * KiB))
    with pytest.raises(OutOfMemory):
        fw.memory.set_limit(256 * KiB)
    fw.memory.set_limit(512 * KiB)
    assert fw.memory.limit == 512 * KiB
