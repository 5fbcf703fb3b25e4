"""Scenario control through the link: scenario files, VFs, reconfigurations,
the workload, digests and the virtual clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fwemu.link import LinkError
from fwemu.link.ifc import Fault, FaultKind, KiB, MiB, Opcode, VfCaps, VfConfig
from fwemu.scenario import EXAMPLE as SCENARIO  # the documented example


async def test_apply_scenario_creates_its_vfs(h):
    """ApplyScenario creates the VFs (vhca_id 1, 2, ... in order) with defaults, per-group settings
    and caps, and arms the faults."""
    infos = await h.link.apply_scenario(SCENARIO)
    assert [i.vhca_id for i in infos] == [1, 2, 3]
    assert [i.config.size for i in infos] == [256 * KiB, 256 * KiB, 128 * KiB]
    assert [i.config.caps.migration_state for i in infos] == [True, True, False]
    assert all(i.config.dirty_bytes_per_s == 64 * KiB for i in infos)
    assert all(i.config.reconfig_bytes == 16 * KiB for i in infos)
    assert [i.vhca_id for i in await h.link.list_vfs()] == [1, 2, 3]
    # The fault of VF 3 is armed.
    q = await h.query(3)
    assert (q.status, q.syndrome) == (0x4, 0x1234)
    assert (await h.query(3)).ok


async def test_scenario_reconfiguration_at_a_time_fires_when_the_clock_passes_it(h):
    """A reconfiguration `at` a time fires when the clock passes it, not before."""
    await h.link.apply_scenario(SCENARIO)
    objects = (await h.info(1)).num_objects
    await h.advance(0.49)
    assert (await h.info(1)).reconfigurations == 0
    await h.advance(0.02)
    info = await h.info(1)
    assert info.reconfigurations == 1
    assert info.num_objects == objects + 1
    assert (await h.info(2)).reconfigurations == 0


async def test_scenario_reconfiguration_after_saved_bytes_fires_after_a_save(h):
    """A reconfiguration `after_saved_bytes` fires once that many image bytes were saved; during
    tracking it is INIT."""
    await h.link.apply_scenario(SCENARIO)
    assert (await h.info(2)).reconfigurations == 0
    await h.save_ok(2, (await h.query(2)).required_umem_size, set_track=True)
    assert (await h.info(2)).reconfigurations == 1
    assert (await h.query(2, incremental=True)).migration_state == 4  # INIT


async def test_reconfiguration_due_while_suspended_waits_until_resumed(h):
    """A reconfiguration due while the VF is suspended (initiator only, too)
    waits until it runs again."""
    vhca = await h.vf(size=64 * KiB)
    assert (await h.suspend(vhca, 0)).ok
    t = await h.link.now()
    await h.link.reconfigure(vhca, at_time=t + 0.5)
    await h.advance(1.0)
    assert (await h.info(vhca)).reconfigurations == 0
    assert (await h.suspend(vhca, 1)).ok
    await h.advance(1.0)
    assert (await h.resume(vhca, 0)).ok
    assert (await h.info(vhca)).reconfigurations == 0  # initiator still suspended
    assert (await h.resume(vhca, 1)).ok
    assert (await h.info(vhca)).reconfigurations == 1


async def test_reconfigure_now_adds_the_objects(h):
    """A reconfiguration adds its objects (default: one QP of reconfig_bytes)."""
    vhca = await h.vf(size=64 * KiB, reconfig_bytes=12 * KiB)
    before = await h.info(vhca)
    size = (await h.query(vhca)).required_umem_size
    trig = await h.link.reconfigure(vhca, [("CQ", 8 * KiB), ("tis", 100)])
    assert trig > 0
    after = await h.info(vhca)
    assert after.num_objects == before.num_objects + 2
    assert (await h.query(vhca)).required_umem_size >= size + 8 * KiB + 100
    await h.link.reconfigure(vhca)  # default: one QP of reconfig_bytes
    assert (await h.query(vhca)).required_umem_size >= size + 20 * KiB + 100


@pytest.mark.parametrize(
    ("objects", "kw"),
    [
        ([("XQ", 4096)], {}),
        ([("QP", 0)], {}),
        (None, {"at_time": 1.0, "after_saved_bytes": 5}),
    ],
    ids=["unknown-type", "size-0", "time-and-bytes"],
)
async def test_bad_reconfiguration_is_link_error(h, objects, kw, request):
    """A reconfiguration the firmware cannot honour raises LinkError and changes nothing."""
    vhca = await h.vf(size=64 * KiB)
    with pytest.raises(LinkError):
        await h.link.reconfigure(vhca, objects, **kw)
    assert (await h.info(vhca)).reconfigurations == 0


async def test_workload_changes_the_state_only_while_running(h):
    """The workload writes pages while the VF runs (neither initiator nor
    responder suspended), and not otherwise."""
    vhca = await h.vf(size=64 * KiB, dirty_bytes_per_s=64 * KiB)
    d0 = await h.digest(vhca)
    await h.advance(0.5)
    d1 = await h.digest(vhca)
    assert d1 != d0
    assert (await h.suspend(vhca, 0)).ok
    await h.advance(0.5)
    assert await h.digest(vhca) == d1
    assert (await h.suspend(vhca, 1)).ok
    await h.advance(0.5)
    assert await h.digest(vhca) == d1
    await h.resume_fully(vhca)
    await h.advance(0.5)
    assert await h.digest(vhca) != d1


async def test_the_suspended_digest_is_the_state_while_last_suspended(h):
    """GetDigest(suspended=True): "" before any suspension, the state now while
    suspended, and that state still once the VF resumed and its workload ran."""
    vhca = await h.vf(size=64 * KiB, dirty_bytes_per_s=64 * KiB)
    assert await h.link.digest(vhca, suspended=True) == ""
    assert (await h.suspend(vhca, 0)).ok
    assert (await h.suspend(vhca, 1)).ok
    frozen = await h.digest(vhca)
    assert await h.link.digest(vhca, suspended=True) == frozen
    await h.resume_fully(vhca)
    await h.advance(0.5)
    assert await h.digest(vhca) != frozen
    assert await h.link.digest(vhca, suspended=True) == frozen


async def test_vf_without_workload_keeps_its_digest(h):
    """dirty_bytes_per_s 0: time passes, the state stays."""
    vhca = await h.vf(size=64 * KiB, dirty_bytes_per_s=0)
    d0 = await h.digest(vhca)
    await h.advance(10)
    assert await h.digest(vhca) == d0


async def test_same_seed_and_scenario_give_the_same_digests(make_harness):
    """Two separate firmwares with the same seed, scenario and clock advances
    end in the same states; another scenario seed gives other states."""

    async def run(seed_line: str) -> list[str]:
        h = await make_harness(seed=7)
        await h.link.apply_scenario(SCENARIO.replace("seed: 42", seed_line))
        for step in (0.25, 0.25, 0.3):
            await h.advance(step)
        await h.save_ok(2, (await h.query(2)).required_umem_size, set_track=True)
        await h.advance(0.4)
        return [await h.digest(v) for v in (1, 2, 3)]

    first = await run("seed: 42")
    assert await run("seed: 42") == first
    other = await run("seed: 43")
    assert all(a != b for a, b in zip(first, other, strict=True))


async def test_same_firmware_seed_gives_the_same_vfs(make_harness):
    """Without a scenario, VF contents derive from the firmware seed and the VF number."""
    digests = []
    for seed in (5, 5, 6):
        h = await make_harness(seed=seed)
        await h.vfs(2, size=64 * KiB)
        digests.append([await h.digest(1), await h.digest(2)])
    assert digests[0] == digests[1]
    assert digests[0][0] != digests[0][1]
    assert digests[0] != digests[2]


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[1, 2, 3]", "mapping"),
        ("flavour: vanilla", "flavour"),
        ("defaults: {size: 12XB}", "defaults.size"),
        ("vfs: [{count: -1}]", "vfs.0.count"),
        ("vfs: [{count: 1, colour: red}]", "vfs.0.colour"),
        ("seed: [", "YAML"),
        ("events: [{vf: 1, fault: {kind: explode}}]", "events.0.fault.kind"),
        ("events: [{vf: 1, fault: {kind: fail, opcode: NOPE}}]", "events.0.fault.opcode"),
        ("\x00\x01\x02\xfe\xff binary", "YAML"),
        ("vfs: [{size: 0}]", "size"),
        ("vfs: [{count: 1}]\nevents: [{vf: 5, reconfigure: {}}]", "events.0"),
    ],
    ids=[
        "not-a-mapping",
        "unknown-key",
        "bad-size",
        "negative-count",
        "unknown-vf-key",
        "invalid-yaml",
        "unknown-fault-kind",
        "unknown-opcode",
        "binary-junk",
        "size-0",
        "unknown-event-vf",
    ],
)
async def test_garbage_scenario_is_link_error_naming_the_field(h, text, names):
    """A bad scenario is refused with LinkError naming the field, and creates nothing."""
    with pytest.raises(LinkError) as e:
        await h.link.apply_scenario(text)
    assert names in str(e.value)
    assert await h.link.list_vfs() == []  # nothing was created


async def test_refused_scenario_removes_the_vfs_it_created(h):
    """A refused scenario leaves no VF of its own behind."""
    await h.vf(size=64 * KiB)
    with pytest.raises(LinkError, match=r"events\.0"):
        await h.link.apply_scenario("vfs: [{count: 2}]\nevents: [{vf: 9, reconfigure: {}}]")
    assert [i.vhca_id for i in await h.link.list_vfs()] == [1]


async def test_refused_scenario_changes_nothing(h):
    """apply_scenario checks everything it can before changing the firmware."""
    vhca = await h.vf(size=64 * KiB)
    text = """
events:
  - {vf: 1, fault: {kind: fail, opcode: SUSPEND_VHCA, status: 0x4}}
  - {vf: 1, reconfigure: {}}
  - {vf: 9, reconfigure: {}}
"""
    with pytest.raises(LinkError, match=r"events\.2"):
        await h.link.apply_scenario(text)
    assert (await h.info(vhca)).reconfigurations == 0
    assert (await h.suspend(vhca, 0)).ok


async def test_create_configure_remove(h):
    """VFs are created with their config, reconfigured (not in size) and removed; a removed VF is
    unknown to scenario requests and commands."""
    [a, b] = await h.link.create_vfs(2, VfConfig(size=64 * KiB, caps=VfCaps(migration_state=False)))
    assert (a.vhca_id, b.vhca_id) == (1, 2)
    assert (a.function_id, a.vf_id) == (1, 0)
    info = await h.link.configure_vf(1, dirty_bytes_per_s=2 * MiB, save_latency_s=0.25)
    assert (info.config.dirty_bytes_per_s, info.config.save_latency_s) == (2 * MiB, 0.25)
    assert info.config.size == 64 * KiB
    with pytest.raises(LinkError, match="size"):
        await h.link.configure_vf(1, size=128 * KiB)
    await h.link.remove_vf(1)
    assert [i.vhca_id for i in await h.link.list_vfs()] == [2]
    with pytest.raises(LinkError):
        await h.link.get_vf(1)
    with pytest.raises(LinkError):
        await h.link.digest(1)
    with pytest.raises(LinkError):
        await h.link.remove_vf(1)
    q = await h.query(1)
    assert q.status == 0x3  # the firmware no longer knows it


@pytest.mark.parametrize(
    "config",
    [VfConfig(size=100), VfConfig(size=64 * KiB, chunk_size=100)],
    ids=["size-below-1KiB", "chunk-below-a-page"],
)
async def test_bad_vf_config_is_link_error(h, config):
    """A VfConfig outside its bounds is refused with LinkError."""
    with pytest.raises(LinkError):
        await h.link.create_vfs(1, config)
    assert await h.link.list_vfs() == []


async def test_removing_a_vf_aborts_its_save(h):
    """Removing a VF completes its in-flight SAVE with INT_ERR / ABORTED."""
    vhca = await h.vf(size=64 * KiB, save_latency_s=1.0)
    pending = await h.save(vhca, (await h.query(vhca)).required_umem_size, set_track=True)
    assert pending.accepted.ok
    await h.link.remove_vf(vhca)
    c = await h.completion(pending)
    assert (c.status, c.syndrome) == (0x1, 0x46570028)  # INT_ERR / ABORTED


async def test_clock_moves_only_when_advanced(h):
    """The virtual clock moves only through advance_clock."""
    t0 = await h.link.now()
    assert await h.link.now() == t0
    assert await h.link.advance_clock(1.5) == pytest.approx(t0 + 1.5)
    assert await h.link.now() == pytest.approx(t0 + 1.5)


async def test_negative_clock_advance_is_link_error(h, request):
    """A refused scenario request raises LinkError on every link."""
    with pytest.raises(LinkError):
        await h.link.advance_clock(-1)


async def test_fault_from_scenario_and_link_agree(h):
    """A fault armed by a scenario event behaves as one injected by the link."""
    await h.link.apply_scenario(
        "vfs: [{size: 64KiB}]\n"
        "events: [{vf: 1, fault: {kind: fail, opcode: 0x115, status: 5, syndrome: 77}}]"
    )
    await h.link.inject_fault(
        1, Fault(FaultKind.FAIL, opcode=Opcode.SUSPEND_VHCA, status=6, syndrome=78)
    )
    assert [((r := await h.suspend(1, 0)).status, r.syndrome) for _ in range(3)] == [
        (5, 77),
        (6, 78),
        (0, 0),
    ]


async def test_vf_info_reports_the_config_as_given(h, request):
    """Both links return the same VfInfo for the same request: the VfConfig as
    given, with the seed in effect filled in (derived when given as None)."""
    config = VfConfig(size=64 * KiB, caps=VfCaps(migration_state=False))
    [info] = await h.link.create_vfs(1, config)
    assert info.seed != 0
    assert info.config == replace(config, seed=info.seed)
    assert (await h.info(info.vhca_id)).config == info.config
