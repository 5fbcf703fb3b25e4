"""Automatic reconfigurations (VfConfig.reconfig_rate_per_s, issue 13): a
Poisson process on the firmware clock, seeded from the VF's seed, counted in
the VF's running time, at most MAX_PER_LOOK per look at the VF whatever the
rate and the clock step."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import pytest

from fwemu.link.ifc import FirmwareError, KiB, QueryVhcaMigState, ReconfigMode, VfConfig
from fwemu.model import Firmware, VirtualClock
from fwemu.model.reconfig_rate import MAX_PER_LOOK
from tests.support.fwemu_model import save_image

SMALL = VfConfig(size=64 * KiB, dirty_bytes_per_s=0, reconfig_bytes=1 * KiB)


def firmware(config: VfConfig, seed: int = 3) -> tuple[Firmware, int]:
    fw = Firmware(VirtualClock(), seed=seed)
    return fw, fw.create_vfs(1, config)[0].vhca_id


def run(config: VfConfig, steps: list[float], seed: int = 3) -> tuple[int, str]:
    """Reconfigurations fired and the digest after looking at the VF after each step."""
    fw, vhca = firmware(config, seed)
    for s in steps:
        fw.advance_clock(s)
        fw.touch(vhca)
    return fw.vf(vhca).reconfigurations, fw.digest(vhca)


def test_the_count_over_a_long_time_is_close_to_rate_times_time() -> None:
    """10/s for 1000 s looked at every 50 ms: Poisson(10,000) arrivals, so
    within 5 standard deviations (500) of 10,000."""
    n, _ = run(replace(SMALL, reconfig_rate_per_s=10.0), [0.05] * 20_000)
    assert abs(n - 10_000) < 5 * math.sqrt(10_000), n


def test_the_same_seed_and_steps_give_the_same_reconfigurations() -> None:
    cfg = replace(SMALL, reconfig_rate_per_s=20.0, dirty_bytes_per_s=16 * KiB)
    steps = [0.013, 0.5, 0.2, 1.7, 0.01] * 20
    first = run(cfg, steps)
    assert first[0] > 0
    assert run(cfg, steps) == first
    assert run(replace(cfg, seed=12345), steps) != first


def test_looking_more_often_does_not_change_what_fires() -> None:
    """Below MAX_PER_LOOK per look, arrivals run at their own times: the same
    state whether the VF is looked at every 1/64 s or every second (steps
    that add up exactly)."""
    cfg = replace(SMALL, reconfig_rate_per_s=20.0, dirty_bytes_per_s=16 * KiB)
    assert run(cfg, [1 / 64] * 320) == run(cfg, [1.0] * 5)


def test_one_look_fires_a_bounded_number_whatever_the_step() -> None:
    """1000/s and a year in one step: one look fires at most MAX_PER_LOOK,
    quickly; the process then goes on at its rate."""
    fw, vhca = firmware(replace(SMALL, reconfig_rate_per_s=VfConfig.MAX_RECONFIG_RATE))
    started = time.perf_counter()
    fw.advance_clock(365 * 86400.0)
    fw.touch(vhca)
    assert fw.vf(vhca).reconfigurations == MAX_PER_LOOK
    assert time.perf_counter() - started < 2.0
    fw.advance_clock(0.02)  # about 20 more
    fw.touch(vhca)
    assert MAX_PER_LOOK < fw.vf(vhca).reconfigurations < MAX_PER_LOOK + 50


def test_nothing_fires_while_the_vf_is_suspended() -> None:
    fw, vhca = firmware(replace(SMALL, reconfig_rate_per_s=50.0))
    assert fw.suspend_vhca(vhca, 0).ok  # the initiator is enough
    fw.advance_clock(100.0)
    fw.touch(vhca)
    assert fw.vf(vhca).reconfigurations == 0
    assert fw.resume_vhca(vhca, 1).ok
    fw.advance_clock(0.1)
    assert fw.info(vhca).reconfigurations < 20  # about 5: what fell while suspended is void
    for _ in range(99):
        fw.advance_clock(0.1)
        fw.touch(vhca)
    assert 250 < fw.vf(vhca).reconfigurations < 750  # 10 s at 50/s, not 110 s


def test_configure_starts_changes_and_stops_the_process() -> None:
    fw, vhca = firmware(SMALL)
    fw.advance_clock(10.0)
    assert fw.info(vhca).reconfigurations == 0  # the default: off
    fw.configure_vf(vhca, reconfig_rate_per_s=100.0)
    fw.advance_clock(0.5)
    n = fw.info(vhca).reconfigurations
    assert 20 < n < 90
    fw.configure_vf(vhca, reconfig_rate_per_s=0.0)
    fw.advance_clock(10.0)
    assert fw.info(vhca).reconfigurations == n


def test_automatic_reconfigurations_replace_by_default_and_keep_the_state_bounded() -> None:
    fw, vhca = firmware(replace(SMALL, reconfig_rate_per_s=100.0, reconfig_bytes=8 * KiB))
    for _ in range(100):
        fw.advance_clock(0.1)
        assert fw.info(vhca).state_size == SMALL.size
    assert fw.info(vhca).reconfigurations > 500


def test_automatic_adds_beyond_the_size_limit_are_dropped_and_logged_sparingly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """reconfig_mode ADD grows the VF up to its size limit; the ones after it
    are dropped (the VF unchanged), logged at the 1st, 2nd, 4th, ... drop."""
    cfg = replace(SMALL, reconfig_rate_per_s=100.0, reconfig_bytes=4 << 20)
    cfg.reconfig_mode = ReconfigMode.ADD
    fw, vhca = firmware(cfg)
    vf = fw.vf(vhca)
    with caplog.at_level(logging.WARNING, "fwemu.firmware"):
        for _ in range(50):
            fw.advance_clock(0.1)
            fw.touch(vhca)
    assert vf.state.size <= vf.size_limit < vf.state.size + cfg.reconfig_bytes
    assert vf.auto_dropped > 100
    logged = [r for r in caplog.records if "automatic reconfiguration dropped" in r.message]
    assert len(logged) == vf.auto_dropped.bit_length()


def test_an_automatic_reconfiguration_while_tracking_is_init() -> None:
    fw, vhca = firmware(replace(SMALL, reconfig_rate_per_s=5.0))
    save_image(fw, vhca)
    assert fw.vf(vhca).migration_state() == QueryVhcaMigState.OPER_MIGRATION_IDLE
    fw.advance_clock(5.0)
    fw.touch(vhca)
    assert fw.vf(vhca).migration_state() == QueryVhcaMigState.OPER_MIGRATION_INIT


BAD = [
    ("reconfig_rate_per_s", math.nan),
    ("reconfig_rate_per_s", math.inf),
    ("reconfig_rate_per_s", -0.5),
    ("reconfig_rate_per_s", 1000.5),
    ("reconfig_rate_per_s", "5"),
    ("reconfig_mode", 0),
    ("reconfig_mode", 4),
    ("reconfig_mode", True),
    ("reconfig_mode", 2.0),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_rates_and_modes_are_refused_naming_the_field_and_change_nothing(
    field: str, value: object
) -> None:
    fw, vhca = firmware(SMALL)
    with pytest.raises(ValueError, match=f"^{field} must be between"):
        replace(SMALL, **{field: value}).validate()
    with pytest.raises(ValueError, match=field):
        fw.create_vfs(1, replace(SMALL, **{field: value}))
    before = fw.info(vhca)
    with pytest.raises((ValueError, FirmwareError), match=field):
        fw.configure_vf(vhca, **{field: value})
    assert fw.info(vhca) == before and len(fw.vfs) == 1
    fw.advance_clock(1.0)
    assert fw.info(vhca).reconfigurations == 0
