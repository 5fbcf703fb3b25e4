"""The workload's cost per look is bounded whatever its rate (issue 11): a run
owing more page writes than MAX_WRITES_PER_RUN performs that many and counts
the rest.  At ordinary rates every write is performed, in the seeded order."""

from __future__ import annotations

import random

import pytest

from fwemu.link.ifc import PAGE_SIZE, MiB
from fwemu.model.device_state import DeviceState
from fwemu.model.workload import MAX_WRITES_PER_RUN, Workload

SEED = 11
TICKS = [0.01 * i for i in range(1, 6)]  # 50 ms of virtual time, looked at every 10 ms


def run_ticks(rate: int) -> tuple[list[int], list[int], Workload]:
    """Pages written per tick (the loop's work units), all pages, the workload."""
    state = DeviceState.generate(1 * MiB, SEED)
    wl = Workload(SEED, rate, now=0.0)
    per_tick, pages = [], []
    for now in TICKS:
        written = wl.run(state, wl.due(now))
        per_tick.append(len(written))
        pages.extend(written)
    return per_tick, pages, wl


@pytest.mark.parametrize("rate", [1 * MiB, 64 << 30, 1 << 40], ids=["1MiB/s", "64GiB/s", "2^40B/s"])
def test_work_per_tick_is_bounded_independent_of_the_rate(rate: int) -> None:
    per_tick, _, wl = run_ticks(rate)
    assert max(per_tick) <= MAX_WRITES_PER_RUN
    # Every write owed is accounted, performed or not.
    assert wl.counter == int(rate * TICKS[-1] / PAGE_SIZE)


def test_ordinary_rates_write_every_page_in_the_seeded_order() -> None:
    """Below the bound nothing changes: each write owed is performed, on the page
    the workload's seeded generator picks, stamped with its counter."""
    rate = 256 * MiB  # 655 writes per 10 ms tick
    per_tick, pages, wl = run_ticks(rate)
    total = int(rate * TICKS[-1] / PAGE_SIZE)
    assert sum(per_tick) == total == wl.counter
    rng = random.Random(SEED ^ 0x5EED_D1B7)
    npages = 1 * MiB // PAGE_SIZE
    assert pages == [rng.randrange(npages) for _ in range(total)]


def test_a_saturated_run_performs_the_first_writes_of_the_sequence() -> None:
    """Beyond the bound, the writes performed are the first of the same sequence,
    and the counter moves past all those owed."""
    state = DeviceState.generate(1 * MiB, SEED)
    wl = Workload(SEED, 0, now=0.0)
    written = wl.run(state, 3 * MAX_WRITES_PER_RUN)
    rng = random.Random(SEED ^ 0x5EED_D1B7)
    assert written == [rng.randrange(256) for _ in range(MAX_WRITES_PER_RUN)]
    assert wl.counter == 3 * MAX_WRITES_PER_RUN


def test_a_list_of_some_functions_runs_only_their_workloads() -> None:
    """ListVfs(function_ids): what a driver asks when a device is opened.
    The VFs not asked about are not brought up to the current time: an open
    costs the same with 8 VFs or 1,000."""
    from fwemu.link.ifc import VfConfig
    from fwemu.model.clock import VirtualClock
    from fwemu.model.firmware import Firmware

    clock = VirtualClock()
    fw = Firmware(clock, seed=SEED)
    vfs = fw.create_vfs(8, VfConfig(size=1 * MiB, dirty_bytes_per_s=1 * MiB))
    clock.advance(0.5)
    picked = [vfs[2].function_id, vfs[5].function_id, 4000]  # and one of no VF
    assert [i.vhca_id for i in fw.list_vfs(picked)] == [vfs[2].vhca_id, vfs[5].vhca_id]
    counters = {v.vhca_id: v.workload.counter for v in vfs}
    assert [v.vhca_id for v in vfs if counters[v.vhca_id]] == [vfs[2].vhca_id, vfs[5].vhca_id]
    assert len(fw.list_vfs()) == 8 and all(v.workload.counter for v in vfs)  # all: every one
