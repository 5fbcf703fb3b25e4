"""The firmware's Prometheus metrics (fwemu/service/metrics.py) count what the
model did, whichever link drove it."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from fwemu.link.ifc import CmdStatus, Fault, FaultKind, KiB, MiB
from fwemu.model.stats import Histogram
from fwemu.service.metrics import FirmwareCollector
from tests.support.exposition import Samples, get, samples


def scrape(h, per_vf_limit: int = 0) -> Samples:
    reg = CollectorRegistry()
    reg.register(FirmwareCollector(h.fw, per_vf_limit=per_vf_limit))
    return samples(reg)


async def test_save_and_load_are_counted_with_their_bytes_and_duration(h):
    src = await h.vf(size=128 * KiB, dirty_bytes_per_s=0, save_latency_s=0.25, save_bandwidth=MiB)
    dst = await h.vf(size=128 * KiB, dirty_bytes_per_s=0)
    await h.suspend_fully(src)
    size = (await h.query(src)).required_umem_size
    pending = await h.save(src, size)
    m = scrape(h)
    assert get(m, "fwemu_saves_in_flight") == 1
    assert get(m, "fwemu_image_saved_bytes_total") == 0  # counted when it completes OK
    await h.advance(1.0)
    c = await h.completion(pending)
    image = await h.image(pending, c)
    await h.suspend_fully(dst)
    assert (await h.load(dst, image)).status == CmdStatus.OK
    m = scrape(h)
    assert get(m, "fwemu_saves_in_flight") == 0
    assert get(m, "fwemu_commands_total", opcode="SAVE_VHCA_STATE", status="OK") == 1
    assert get(m, "fwemu_commands_total", opcode="LOAD_VHCA_STATE", status="OK") == 1
    assert get(m, "fwemu_commands_total", opcode="SUSPEND_VHCA", status="OK") == 4
    assert get(m, "fwemu_image_saved_bytes_total") == c.actual_image_size
    assert get(m, "fwemu_image_loaded_bytes_total") == c.actual_image_size
    assert get(m, "fwemu_save_duration_seconds_count") == 1
    # the virtual clock: latency + size / bandwidth exactly
    assert get(m, "fwemu_save_duration_seconds_sum") == pytest.approx(0.25 + size / MiB)
    assert get(m, "fwemu_save_duration_seconds_bucket", le="0.25") == 0
    assert get(m, "fwemu_save_duration_seconds_bucket", le="0.5") == 1
    assert get(m, "fwemu_save_duration_seconds_bucket", le="+Inf") == 1


async def test_failed_commands_faults_and_vf_states(h):
    a, b, _ = await h.vfs(3, size=64 * KiB, dirty_bytes_per_s=0)
    assert (await h.resume(a, 0)).status == CmdStatus.BAD_RES_STATE_ERR  # not suspended
    await h.link.inject_fault(b, Fault(FaultKind.DELAY, delay_s=0.1))
    await h.link.inject_fault(b, Fault(FaultKind.DROP_COMPLETION))
    await h.suspend_fully(a)
    m = scrape(h)
    assert get(m, "fwemu_commands_total", opcode="RESUME_VHCA", status="BAD_RES_STATE_ERR") == 1
    assert get(m, "fwemu_faults_injected_total", kind="delay") == 1
    assert get(m, "fwemu_faults_injected_total", kind="drop_completion") == 1
    assert get(m, "fwemu_faults_injected_total", kind="tracking_lost") == 0
    assert (
        get(m, "fwemu_vfs", migration_state="OPER_MIGRATION_READY") == 1
    )  # a: suspended, not tracked
    assert get(m, "fwemu_vfs", migration_state="UNINITIALIZED") == 2
    assert sum(v for (n, _), v in m.items() if n == "fwemu_vfs") == 3


async def test_per_vf_series_only_when_asked_and_capped(h):
    await h.vfs(3, size=64 * KiB, dirty_bytes_per_s=0)
    assert not any(n.startswith("fwemu_vf_") for n, _ in scrape(h))
    m = scrape(h, per_vf_limit=2)
    assert sorted(dict(ls)["vhca_id"] for n, ls in m if n == "fwemu_vf_migration_state") == [
        "1",
        "2",
    ]


async def test_reconfigurations_stay_counted_after_the_vf_goes(h):
    a = await h.vf(size=64 * KiB, dirty_bytes_per_s=0)
    await h.link.reconfigure(a)
    assert get(scrape(h), "fwemu_reconfigurations_total") == 1
    await h.link.remove_vf(a)
    assert get(scrape(h), "fwemu_reconfigurations_total") == 1


def test_histogram_buckets_are_cumulative_with_inf_last() -> None:
    hist = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 3.0):
        hist.observe(v)
    assert hist.cumulative() == [(1.0, 2), (2.0, 3), (float("inf"), 4)]
    assert hist.count == 4 and hist.total == 6.0
