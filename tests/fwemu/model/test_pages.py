"""PageStates (the per-page CLEAN/DIRTY/INIT bitmap) against a model built
from Python sets: the way the firmware tracked pages before it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fwemu.model.device_state import page_runs
from fwemu.model.pages import CLEAN, DIRTY, INIT, PageStates

N = 64

ops = st.lists(
    st.one_of(
        st.tuples(st.just("dirty"), st.lists(st.integers(0, N + 8), max_size=12)),
        st.tuples(st.just("init"), st.integers(0, N), st.integers(0, 16)),
        st.tuples(st.just("clean"), st.integers(0, N + 8), st.integers(0, 24)),
    ),
    max_size=30,
)


@given(st.integers(0, N), st.booleans(), ops)
def test_page_states_match_a_set_model(start: int, all_dirty: bool, steps: list) -> None:
    ps = PageStates(start, DIRTY if all_dirty else CLEAN)
    dirty: set[int] = set(range(start)) if all_dirty else set()
    init: set[int] = set()
    for op in steps:
        if op[0] == "dirty":
            ps.mark_dirty(op[1])
            dirty.update(op[1])
        elif op[0] == "init":
            pages = range(op[1], op[1] + op[2])
            ps.mark_init(pages)
            init.update(pages)
        else:
            first, last = op[1], op[1] + op[2]
            ps.clean(first, last)
            dirty.difference_update(range(first, last))
            init.difference_update(range(first, last))
    assert ps.runs(INIT) == page_runs(init)
    assert ps.runs(DIRTY) == page_runs(dirty - init)
    assert ps.has_init == bool(init)
    assert ps.has_dirty == bool(dirty - init)
    assert ps.count(INIT) == len(init)
    for p in range(N + 30):
        want = INIT if p in init else DIRTY if p in dirty else CLEAN
        assert ps.state(p) == want


def test_resize_forgets_and_adds_clean_pages() -> None:
    ps = PageStates(8, DIRTY)
    ps.resize(4)
    assert ps.runs(DIRTY) == [(0, 4)]
    ps.resize(10)
    assert ps.runs(DIRTY) == [(0, 4)] and len(ps) == 10
