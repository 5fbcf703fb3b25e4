"""Device state, digest and workload (model level)."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwemu.link.ifc import OBJ_TYPES, PAGE_SIZE, KiB, MiB, VfConfig, obj_type_index
from fwemu.model import Firmware, VirtualClock
from fwemu.model.device_state import Arena, DeviceState, TableError, page_runs
from fwemu.model.workload import Workload

sys.path.insert(0, str(Path(__file__).parents[3] / "benchmarks"))
from fwemu_bench import plain_writes  # the oracle: Workload.run as first written

sizes = st.integers(1 * KiB, 256 * KiB)
seeds = st.integers(0, 2**64 - 1)


def clone(s: DeviceState) -> DeviceState:
    return DeviceState(bytearray(s.arena), list(s.objects), s.next_obj_id)


@settings(max_examples=30, deadline=None)
@given(size=sizes, seed=seeds)
def test_generate_is_deterministic_per_seed(size, seed):
    """Contents and layout are a function of (size, seed)."""
    a = DeviceState.generate(size, seed)
    b = DeviceState.generate(size, seed)
    assert a.digest() == b.digest()
    assert a.arena == b.arena
    assert a.objects == b.objects
    assert a.size == size


@settings(max_examples=30, deadline=None)
@given(size=sizes, seed=st.integers(0, 2**63))
def test_other_seed_gives_another_state(size, seed):
    """Different seeds give different contents."""
    assert (
        DeviceState.generate(size, seed).digest() != DeviceState.generate(size, seed + 1).digest()
    )


@settings(max_examples=30, deadline=None)
@given(size=sizes, seed=seeds)
def test_objects_cover_the_arena_and_the_table_round_trips(size, seed):
    """Objects partition the arena in order; the serialized object table parses back to the same
    objects."""
    s = DeviceState.generate(size, seed)
    end = 0
    for o in s.objects:
        assert o.offset == end and o.length > 0
        assert 0 <= o.obj_type < len(OBJ_TYPES)
        end += o.length
    assert end == size
    arena_size, next_id, objects = DeviceState.parse_table(s.table_bytes())
    assert (arena_size, next_id, objects) == (size, s.next_obj_id, s.objects)
    assert len(s.table_bytes()) == s.table_size()


@settings(max_examples=60, deadline=None)
@given(data=st.data(), size=st.integers(1 * KiB, 64 * KiB), seed=seeds)
def test_digest_is_equal_iff_the_state_is_equal(data, size, seed):
    """README: the digest is equal for two VFs exactly when their states are:
    any arena byte, object or next id that differs changes it."""
    a = DeviceState.generate(size, seed)
    b = clone(a)
    assert a.digest() == b.digest()
    what = data.draw(st.sampled_from(["byte", "object", "next_id", "grow"]))
    if what == "byte":
        at = data.draw(st.integers(0, size - 1))
        b.arena[at] ^= data.draw(st.integers(1, 255))
    elif what == "object":
        i = data.draw(st.integers(0, len(b.objects) - 1))
        o = b.objects[i]
        b.objects[i] = type(o)((o.obj_type + 1) % len(OBJ_TYPES), o.obj_id, o.offset, o.length)
    elif what == "next_id":
        b.next_obj_id += 1
    else:
        b.add_objects([(0, data.draw(st.integers(1, 5000)))], random.Random(1))
    assert a.digest() != b.digest()


def test_digest_covers_the_object_table_not_only_the_bytes():
    """Same arena bytes, different object boundaries: different digests."""
    a = DeviceState.generate(128 * KiB, 5)
    assert len(a.objects) >= 2
    b = clone(a)
    o0, o1 = b.objects[0], b.objects[1]
    b.objects[0] = type(o0)(o0.obj_type, o0.obj_id, 0, o0.length + 1)
    b.objects[1] = type(o1)(o1.obj_type, o1.obj_id, o1.offset + 1, o1.length - 1)
    assert a.arena == b.arena
    assert a.digest() != b.digest()


def test_add_objects_appends_and_reports_the_new_pages():
    """A reconfiguration appends objects after the arena and reports every page holding new bytes
    (the partly filled last page included)."""
    s = DeviceState.generate(10 * KiB, 1)  # ends inside page 2
    pages = s.add_objects([(obj_type_index("cq"), 5000)], random.Random(0))
    assert pages == range(2, 4)  # the partly filled page 2 holds new bytes too
    assert s.size == 15000 + 240
    assert s.objects[-1].type_name == "CQ"
    assert s.objects[-1].offset == 10 * KiB


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:-1],
        lambda t: t[:8],
        lambda t: t + b"\0",
    ],
    ids=["short-entry", "short-head", "extra-byte"],
)
def test_malformed_table_is_table_error(mutate):
    """A serialized object table of the wrong length is refused."""
    table = DeviceState.generate(128 * KiB, 1).table_bytes()
    with pytest.raises(TableError):
        DeviceState.parse_table(mutate(table))


def test_unknown_object_type_is_refused():
    """Object types are QP, CQ, MKEY, EQ, SRQ, RQ, SQ, TIR, TIS (empty = QP)."""
    with pytest.raises(ValueError, match="unknown object type"):
        obj_type_index("QQ")
    assert obj_type_index("") == obj_type_index("QP")


@given(st.sets(st.integers(0, 300)))
def test_page_runs_cover_exactly_the_pages(pages):
    """page_runs() turns a page set into maximal sorted runs covering exactly it."""
    runs = page_runs(pages)
    got = [p for first, count in runs for p in range(first, first + count)]
    assert got == sorted(pages)
    # Runs are maximal: no two touch.
    for (f1, c1), (f2, _) in itertools.pairwise(runs):
        assert f1 + c1 < f2


def test_workload_writes_at_its_rate_and_is_deterministic():
    """A workload writes dirty_bytes_per_s in 4 KiB pages, each write a counter
    stamp; the same seed gives the same writes."""
    a, b = DeviceState.generate(1 * MiB, 3), DeviceState.generate(1 * MiB, 3)
    wa, wb = Workload(9, 64 * KiB, now=0.0), Workload(9, 64 * KiB, now=0.0)
    n = wa.due(1.0)
    assert n == 64 * KiB // PAGE_SIZE
    pages_a = wa.run(a, n)
    pages_b = wb.run(b, wb.due(1.0))
    assert pages_a == pages_b
    assert a.digest() == b.digest()
    assert a.digest() != DeviceState.generate(1 * MiB, 3).digest()
    assert wa.counter == n
    assert wa.due(1.0) == 0  # done


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    size=st.one_of(
        st.integers(1, 3 * PAGE_SIZE + 9),
        st.integers(1, 64).map(lambda n: n * PAGE_SIZE),
        st.integers(1, 64).map(lambda n: n * PAGE_SIZE + 7),
    ),
    writes=st.integers(0, 600),
)
def test_workload_writes_what_the_reference_loop_writes(seed: int, size: int, writes: int) -> None:
    """The fast loop (randrange inlined) draws the same pages and stamps the
    same bytes as the plain one, short last pages included: a seed's
    workload, and so every digest a scenario pins, stays what it was."""
    state = DeviceState(bytearray(size), [], 0)
    wl = Workload(seed, 1 * MiB, now=0.0)
    pages = wl.run(state, writes)
    plain = bytearray(size)
    assert pages == plain_writes(seed, plain, writes)
    assert bytes(state.arena.view) == plain
    assert wl.counter == writes


def test_workload_without_rate_or_while_paused_writes_nothing():
    """No rate, no elapsed time, or a paused workload: no page writes."""
    assert Workload(1, 0, now=0.0).due(100.0) == 0
    assert Workload(1, 1 * MiB, now=5.0).due(5.0) == 0
    w = Workload(1, 1 * MiB, now=0.0)
    w.pause(1.0)
    assert w.due(100.0) == 256  # only the second it ran
    w.resume(100.0)
    assert w.due(101.0) == 512


def vf_digest_after(steps: list[float], rate: int = 1 * MiB) -> str:
    fw = Firmware(VirtualClock(), seed=3)
    vhca = fw.create_vfs(1, VfConfig(size=64 * KiB, dirty_bytes_per_s=rate))[0].vhca_id
    for s in steps:
        fw.clock.advance(s)
        fw.digest(vhca)  # looking at the VF
    return fw.digest(vhca)


def test_same_steps_give_the_same_state():
    """The same seed and clock steps give the same state; more running time, another."""
    assert vf_digest_after([0.25, 0.5, 1.0]) == vf_digest_after([0.25, 0.5, 1.0])
    assert vf_digest_after([0.25], 64 * KiB) != vf_digest_after([0.5], 64 * KiB)


def test_looking_at_a_vf_does_not_change_its_state():
    """How far the workload is depends only on the running time that passed, not on how often the VF
    was looked at (Workload docstring; repeatable runs)."""
    assert vf_digest_after([10.0]) == vf_digest_after([5.0, 5.0])


@pytest.mark.parametrize("hold_a_view", [False, True])
def test_arena_resize_keeps_the_prefix_and_zeroes_what_it_adds(hold_a_view: bool) -> None:
    """In place (mremap) normally; into new memory while a view is held."""
    a = Arena(data=bytes(range(256)) * 64)
    held = a[0:16] if hold_a_view else None
    a.resize(5 * PAGE_SIZE + 5)
    assert bytes(a[: 256 * 64]) == bytes(range(256)) * 64
    assert bytes(a[256 * 64 :]) == bytes(5 * PAGE_SIZE + 5 - 256 * 64)
    a.resize(100)
    assert bytes(a) == bytes(range(100))
    a.resize(PAGE_SIZE)
    assert bytes(a[100:]) == bytes(PAGE_SIZE - 100)
    if held is not None:
        assert bytes(held) == bytes(range(16))


_arena_ops = st.lists(
    st.one_of(
        st.tuples(st.just("clear"), st.integers(0, 6 * PAGE_SIZE)),
        st.tuples(st.just("resize"), st.integers(0, 6 * PAGE_SIZE)),
        st.tuples(
            st.just("write"), st.integers(0, 6 * PAGE_SIZE), st.integers(0, 2 * PAGE_SIZE + 9)
        ),
        st.tuples(st.just("byte"), st.integers(0, 6 * PAGE_SIZE)),
        st.tuples(st.just("read"), st.integers(0, 6 * PAGE_SIZE), st.integers(0, PAGE_SIZE)),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 5 * PAGE_SIZE), ops=_arena_ops)
def test_arena_lazy_clear_reads_as_an_eager_one(size: int, ops: list[tuple]) -> None:
    """clear() zeroes lazily (only the pages no write covers, when someone
    looks); every read, whatever the order of clears, resizes and partial
    writes, sees what an eager memset would have left."""
    rng = random.Random(size)
    a = Arena(data=rng.randbytes(size))
    model = bytearray(bytes(a))
    for op in ops:
        if op[0] == "clear":
            a.clear(op[1])
            model[:] = bytes(op[1])
        elif op[0] == "resize":
            a.resize(op[1])
            model[:] = model[: op[1]] + bytes(max(0, op[1] - len(model)))
        elif op[0] == "write":
            start = min(op[1], len(model))
            stop = min(start + op[2], len(model))
            data = rng.randbytes(stop - start)
            a[start:stop] = data
            model[start:stop] = data
        elif op[0] == "byte" and op[1] < len(model):
            a[op[1]] = 0x5A
            model[op[1]] = 0x5A
        elif op[0] == "read":
            start = min(op[1], len(model))
            assert bytes(a[start : start + op[2]]) == bytes(model[start : start + op[2]])
        assert len(a) == len(model)
    assert a.stale_pages <= -(-len(model) // PAGE_SIZE)
    assert bytes(a.view) == bytes(model)
    assert a.stale_pages == 0


def test_arena_clear_then_a_whole_write_zeroes_nothing() -> None:
    """A full image written over a cleared state leaves nothing to zero: the
    memset the destination's first LOAD used to make is gone."""
    a = Arena(data=b"\xff" * (8 * PAGE_SIZE))
    a.clear(8 * PAGE_SIZE)
    assert a.stale_pages == 8
    a[PAGE_SIZE : 3 * PAGE_SIZE] = b"\x01" * (2 * PAGE_SIZE)
    a[100:PAGE_SIZE] = b"\x02" * (PAGE_SIZE - 100)  # page 0 in part: zeroed first
    assert a.stale_pages == 5
    assert bytes(a[:100]) == bytes(100)  # a read zeroes what is stale
    assert a.stale_pages == 0


def test_arena_clear_zeroes_in_place_at_any_size() -> None:
    a = Arena(data=b"\xff" * (3 * PAGE_SIZE + 7))
    a.clear(2 * PAGE_SIZE + 3)
    assert bytes(a) == bytes(2 * PAGE_SIZE + 3)
    a[0:4] = b"abcd"
    a.clear(5 * PAGE_SIZE)
    assert bytes(a) == bytes(5 * PAGE_SIZE)
    a.clear(0)
    assert len(a) == 0
    a.clear(PAGE_SIZE)
    assert bytes(a) == bytes(PAGE_SIZE)
