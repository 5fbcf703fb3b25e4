"""Scenario files (model level): parse_scenario, load_scenario_file,
apply_scenario."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from fwemu.link.ifc import (
    CmdStatus,
    Fault,
    FaultKind,
    FirmwareError,
    KiB,
    Opcode,
    ReconfigMode,
    VfConfig,
)
from fwemu.model import Firmware, VirtualClock
from fwemu.model.limits import MAX_ARMED_FAULTS, MAX_PENDING_TRIGGERS, LimitReached
from fwemu.model.memory import OutOfMemory
from fwemu.scenario import (
    EXAMPLE,
    ScenarioError,
    apply_scenario,
    build_firmware,
    json_schema,
    load_scenario_file,
    parse_scenario,
)
from tests.support.fwemu_model import FailingAllocator


def firmware(seed: int = 0) -> Firmware:
    return Firmware(VirtualClock(), seed=seed)


def test_parse_reads_sizes_names_and_defaults():
    """Sizes take KiB/MiB/GiB, opcodes and statuses their mlx5 names."""
    doc = parse_scenario(EXAMPLE)
    assert doc.seed == 42
    assert doc.defaults.size == 256 * KiB
    assert doc.defaults.dirty_bytes_per_s == 64 * KiB
    assert parse_scenario("defaults: {save_bandwidth: 2GiB}").defaults.save_bandwidth == 2 << 30
    assert [g.count for g in doc.vfs] == [2, 1]
    assert doc.vfs[1].caps.migration_state is False
    fault = doc.events[2].fault
    assert fault is not None
    assert (fault.opcode, fault.status) == (
        Opcode.QUERY_VHCA_MIGRATION_STATE,
        CmdStatus.BAD_SYS_STATE_ERR,
    )
    assert doc.events[1].after_saved_bytes == 1 * KiB


def test_json_is_accepted_too():
    """A scenario may be JSON."""
    doc = parse_scenario(json.dumps({"seed": 1, "vfs": [{"count": 2, "size": "64KiB"}]}))
    assert doc.vfs[0].size == 64 * KiB


def test_empty_scenario_is_nothing_to_do():
    """An empty file is an empty scenario."""
    fw = firmware()
    assert apply_scenario(fw, parse_scenario("")) == []
    assert apply_scenario(fw, parse_scenario("# only a comment\n")) == []


def test_apply_creates_vfs_schedules_events_and_arms_faults():
    """apply_scenario creates the VFs in order, schedules reconfigurations, arms faults."""
    fw = firmware()
    vfs = apply_scenario(fw, parse_scenario(EXAMPLE))
    assert [v.vhca_id for v in vfs] == [1, 2, 3]
    assert [v.config.caps.migration_state for v in vfs] == [True, True, False]
    assert [v.config.size for v in vfs] == [256 * KiB, 256 * KiB, 128 * KiB]
    assert len(fw.vf(1).triggers) == 2  # at 0.5 and after 1 KiB saved
    assert len(fw.vf(3).faults.faults) == 1
    fw.clock.advance(0.6)
    assert fw.touch(1).reconfigurations == 1
    assert fw.touch(2).reconfigurations == 0


def test_at_is_relative_to_when_the_scenario_is_applied():
    """`at` is seconds after the scenario is applied, on the firmware clock."""
    fw = firmware()
    fw.clock.advance(100.0)
    apply_scenario(
        fw, parse_scenario("vfs: [{size: 4KiB}]\nevents: [{vf: 1, at: 1, reconfigure: {}}]")
    )
    fw.clock.advance(0.9)
    assert fw.touch(1).reconfigurations == 0
    fw.clock.advance(0.2)
    assert fw.touch(1).reconfigurations == 1


def test_same_seed_and_scenario_give_the_same_digests():
    """Two firmwares, the same seed, scenario and clock advances: same digests."""

    def run(text: str) -> list[str]:
        fw = firmware(seed=9)
        apply_scenario(fw, parse_scenario(text))
        for step in (0.1, 0.45, 0.3):
            fw.clock.advance(step)
        return [fw.digest(v) for v in sorted(fw.vfs)]

    assert run(EXAMPLE) == run(EXAMPLE)
    assert run(EXAMPLE) != run(EXAMPLE.replace("seed: 42", "seed: 41"))


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("- a\n- b", "mapping"),
        ("42", "mapping"),
        ("seeds: 1", "seeds"),
        ("defaults: {size: 12XB}", "defaults.size"),
        ("vfs: [{size: 12XB}]", "vfs.0.size"),
        ("vfs: [{count: -1}]", "vfs.0.count"),
        ("vfs: [{count: 0}]", "vfs.0.count"),
        ("vfs: [{caps: {teleport: true}}]", "vfs.0.caps.teleport"),
        ("seed: -5", "seed"),
        ("defaults: {save_latency_s: -1}", "defaults.save_latency_s"),
        ("{{{", "YAML"),
        ("events: [{vf: 1, fault: {kind: explode}}]", "events.0.fault.kind"),
        ("events: [{vf: 1, fault: {kind: fail, status: NOPE}}]", "events.0.fault.status"),
        ("events: [{vf: 1, fault: {kind: fail, status: 0}}]", "events.0.fault.status"),
        ("events: [{vf: 1}]", "events.0"),
        ("events: [{vf: 1, reconfigure: {}, fault: {kind: tracking_lost}}]", "events.0"),
        ("events: [{vf: 1, at: 1, after_saved_bytes: 5, reconfigure: {}}]", "events.0"),
        ("events: [{vf: 1, at: 1, fault: {kind: tracking_lost}}]", "events.0"),
        ("events: [{vf: 1, reconfigure: {objects: [{type: XX, size: 1}]}}]", "events.0"),
        ("events: [{vf: one, reconfigure: {}}]", "events.0.vf"),
        ("\x00\x01\x02binary\xfe\xff", "YAML"),
    ],
)
def test_garbage_is_scenario_error_naming_the_field(text, names):
    """A bad file is refused with ScenarioError naming the file, the field and the rule."""
    with pytest.raises(ScenarioError) as e:
        parse_scenario(text, source="bad.yaml")
    assert names in str(e.value)
    assert str(e.value).startswith("bad.yaml:")


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("vfs: [{size: 100}]", "size"),
        ("vfs: [{size: 64KiB, chunk_size: 100}]", "chunk_size"),
        ("vfs: [{count: 1}]\nevents: [{vf: 2, reconfigure: {}}]", "events.0"),
    ],
)
def test_apply_refuses_what_parse_cannot_see_and_creates_nothing(text, names):
    """What only apply can check (VF settings, event targets) is refused too, and no VF is left
    behind."""
    fw = firmware()
    with pytest.raises(ScenarioError) as e:
        apply_scenario(fw, parse_scenario(text))
    assert names in str(e.value)
    assert fw.vfs == {}


def test_binary_file_is_refused(tmp_path: Path):
    """A binary file is refused: a scenario file is UTF-8 text."""
    p = tmp_path / "junk.yaml"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ScenarioError, match="UTF-8"):
        load_scenario_file(str(p))


def test_missing_file_is_refused(tmp_path: Path):
    """A file that cannot be read is a ScenarioError, not an OSError."""
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario_file(str(tmp_path / "nope.yaml"))


def test_file_round_trip(tmp_path: Path):
    """load_scenario_file reads what parse_scenario reads."""
    p = tmp_path / "ok.yaml"
    p.write_text(EXAMPLE, encoding="utf-8")
    assert load_scenario_file(str(p)) == parse_scenario(EXAMPLE)


def test_json_schema_describes_the_file():
    """The JSON schema names the top-level fields."""
    schema = json.loads(json_schema())
    assert {"seed", "defaults", "vfs", "events"} <= set(schema["properties"])


def test_firmware_refuses_bad_scenario_requests():
    """Firmware scenario requests that cannot be honoured raise FirmwareError / ValueError."""
    fw = firmware()
    with pytest.raises(FirmwareError):
        fw.create_vfs(0)
    with pytest.raises(ValueError):
        fw.create_vfs(1, VfConfig(size=1))
    fw.create_vfs(1, VfConfig(size=4 * KiB))
    with pytest.raises(FirmwareError):
        fw.configure_vf(1, size=8 * KiB)
    with pytest.raises(FirmwareError):
        fw.vf(2)


@pytest.mark.parametrize("scenario_seed", [None, 42])
def test_a_seed_offset_gives_shards_different_vfs(tmp_path, scenario_seed) -> None:
    """fwemu serve --shard K: the seed in force (the scenario's, else --seed) + K."""
    f = tmp_path / "s.yaml"
    f.write_text(
        ("" if scenario_seed is None else f"seed: {scenario_seed}\n") + "vfs: [{count: 2}]\n"
    )
    built = [
        build_firmware(VirtualClock(), VfConfig(size=16 << 10), seed=7, scenario=str(f), vfs=0,
                       seed_offset=k)
        for k in (0, 1, 1)
    ]  # fmt: skip
    digests = [[vf.digest() for vf in fw.vfs.values()] for fw in built]
    assert digests[0] != digests[1] and digests[1] == digests[2]
    assert built[1].seed == (scenario_seed if scenario_seed is not None else 7) + 1


# --- all or nothing ------------------------------------------------------------------


def _held(fw: Firmware) -> tuple[object, ...]:
    """What a refused scenario must leave as it was."""
    return (
        sorted(fw.vfs),
        fw.memory.used,
        {v: [f.fault_id for f in vf.faults.faults] for v, vf in fw.vfs.items()},
        {v: [t.trigger_id for t in vf.triggers] for v, vf in fw.vfs.items()},
        {v: fw.digest(v) for v in fw.vfs},
    )


def _faults(vf: int | str, n: int) -> str:
    return "".join(f"  - {{vf: {vf}, fault: {{kind: delay, delay_s: 0.1}}}}\n" for _ in range(n))


def _waits(vf: int | str, n: int) -> str:
    return "".join(f"  - {{vf: {vf}, at: 5, reconfigure: {{}}}}\n" for _ in range(n))


@pytest.mark.parametrize(
    ("events", "kind", "match"),
    [
        # Faults past the per-VF cap, after events that would have applied.
        (_waits(1, 3) + _faults(1, MAX_ARMED_FAULTS + 1), LimitReached, "armed"),
        # Pending reconfigurations past the cap, after faults that would have armed.
        (_faults("all", 2) + _waits(1, MAX_PENDING_TRIGGERS + 1), LimitReached, "pending"),
        # A reconfiguration now beyond the VF's size limit, after the rest.
        (
            _faults(1, 2)
            + _waits(2, 2)
            + "  - {vf: 1, reconfigure: {objects: [{type: QP, size: 64MiB}]}}\n"
            + "  - {vf: 1, reconfigure: {objects: [{type: QP, size: 64MiB}]}}\n",
            OutOfMemory,
            "size limit",
        ),
    ],
    ids=["faults", "pending", "size-limit"],
)
def test_a_refused_scenario_applies_nothing(events, kind, match):
    """A scenario whose events go past a per-VF cap or the memory of the VF is
    refused whole, as RESOURCE_EXHAUSTED's kinds: no VF of it is created, no
    fault armed, no reconfiguration scheduled or run, and the memory it took is
    given back."""
    fw = firmware()
    apply_scenario(fw, parse_scenario("vfs: [{count: 2, size: 64KiB}]"))
    fw.inject_fault(1, Fault(FaultKind.DELAY, delay_s=0.2))
    before = _held(fw)
    with pytest.raises(kind, match=match):
        apply_scenario(fw, parse_scenario("vfs: [{count: 3, size: 1MiB}]\nevents:\n" + events))
    assert _held(fw) == before


def test_caps_count_what_a_vf_already_holds():
    """The caps count the faults a VF holds already, so a scenario cannot top
    a VF up past them."""
    fw = firmware()
    apply_scenario(fw, parse_scenario("vfs: [{count: 1}]\nevents:\n" + _faults(1, 1000)))
    before = _held(fw)
    with pytest.raises(LimitReached, match="1000 armed"):
        apply_scenario(fw, parse_scenario("events:\n" + _faults(1, MAX_ARMED_FAULTS - 999)))
    assert _held(fw) == before
    apply_scenario(fw, parse_scenario("events:\n" + _faults(1, MAX_ARMED_FAULTS - 1000)))
    assert len(fw.vf(1).faults.faults) == MAX_ARMED_FAULTS


def test_reconfigurations_now_beyond_the_memory_limit_apply_nothing():
    """Reconfigurations that would run at once are checked together against
    the firmware's memory limit before anything changes."""
    fw = Firmware(VirtualClock(), seed=0, memory_limit=3 << 20)
    apply_scenario(fw, parse_scenario("vfs: [{count: 2, size: 1MiB}]"))
    before = _held(fw)
    now = "  - {vf: all, reconfigure: {objects: [{type: QP, size: 1MiB}]}}\n"
    with pytest.raises(OutOfMemory, match="memory limit"):
        apply_scenario(fw, parse_scenario("events:\n" + _faults(2, 1) + now))
    assert _held(fw) == before


@pytest.mark.parametrize(
    "error", [MemoryError(), OSError(errno.ENOMEM, "Cannot allocate memory")], ids=repr
)
def test_an_allocation_failing_mid_scenario_takes_back_what_it_can(error):
    """When the kernel refuses memory for a reconfiguration that runs at once
    (after every check passed), the faults armed, reconfigurations scheduled
    and VFs created by the scenario are taken back; the reconfigurations that
    had already run stay, and the error says how many."""
    alloc = FailingAllocator()
    fw = Firmware(VirtualClock(), seed=0, allocator=alloc)
    apply_scenario(fw, parse_scenario("vfs: [{count: 2, size: 64KiB}]"))
    before = _held(fw)
    text = (
        "vfs: [{count: 1, size: 64KiB}]\nevents:\n"
        + _faults("all", 2)
        + _waits(1, 2)
        + "  - {vf: 1, reconfigure: {}}\n"
        + "  - {vf: 2, reconfigure: {}}\n"
    )
    # The new VF's arena and VF 1's reconfiguration get memory; VF 2's does not.
    alloc.arm(error, after=2)
    with pytest.raises(OutOfMemory, match="1 reconfiguration"):
        apply_scenario(fw, parse_scenario(text))
    assert sorted(fw.vfs) == before[0]
    assert {v: [f.fault_id for f in vf.faults.faults] for v, vf in fw.vfs.items()} == before[2]
    assert {v: [t.trigger_id for t in vf.triggers] for v, vf in fw.vfs.items()} == before[3]
    assert fw.vf(1).reconfigurations == 1 and fw.vf(2).reconfigurations == 0


LOAD_TEST = """\
seed: 5
defaults: {size: 256KiB, dirty_bytes_per_s: 0, reconfig_bytes: 16KiB,
           reconfig_rate_per_s: 8, reconfig_mode: replace}
vfs:
  - count: 1
  - count: 1
    reconfig_mode: ADD
    reconfig_rate_per_s: 0.5
events:
  - {vf: 1, reconfigure: {mode: replace, objects: [{type: CQ, size: 100KiB}]}}
  - {vf: 2, reconfigure: {mode: remove}}
  - {vf: 2, at: 1, reconfigure: {mode: Replace}}
"""


def test_reconfiguration_modes_and_rates_in_a_scenario_file():
    """Issue 13's keys: reconfig_rate_per_s and reconfig_mode in defaults and
    VF groups, `mode` in a reconfigure event (names in any case)."""
    fw = firmware()
    vfs = apply_scenario(fw, parse_scenario(LOAD_TEST))
    assert [(v.config.reconfig_rate_per_s, v.config.reconfig_mode) for v in vfs] == [
        (8.0, ReconfigMode.REPLACE),
        (0.5, ReconfigMode.ADD),
    ]
    one, two = fw.vf(1), fw.vf(2)
    assert one.state.size == two.state.size == 256 * KiB  # replaced, removed: no growth
    assert one.reconfigurations == two.reconfigurations == 1
    assert len(two.state.objects) == 3 and two.triggers[0].mode == ReconfigMode.REPLACE
    assert parse_scenario("events: [{vf: 1, reconfigure: {}}]").events[0].reconfigure.mode == 1


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("defaults: {reconfig_mode: shuffle}", "defaults.reconfig_mode"),
        ("vfs: [{reconfig_rate_per_s: .inf}]", "vfs.0.reconfig_rate_per_s"),
        ("vfs: [{reconfig_rate_per_s: 1e4}]", "vfs.0.reconfig_rate_per_s"),
        ("events: [{vf: 1, reconfigure: {mode: 0}}]", "events.0.reconfigure.mode"),
    ],
    ids=["unknown-mode", "infinite-rate", "absurd-rate", "mode-0"],
)
def test_bad_modes_and_rates_are_refused_naming_the_field(text, names):
    with pytest.raises(ScenarioError, match=names):
        parse_scenario(text)


def test_replacements_and_removals_now_need_no_memory_to_grow():
    """The memory check counts what a reconfiguration that runs at once can
    grow: ADD its objects, REPLACE only beyond the whole state, REMOVE nothing.
    A firmware with no room to spare takes replacements and removals; the same
    objects added are refused and nothing is applied."""
    fw = Firmware(VirtualClock(), seed=0, memory_limit=512 * KiB)
    apply_scenario(fw, parse_scenario("vfs: [{count: 2, size: 256KiB}]"))
    events = (
        "events:\n"
        "  - {vf: all, reconfigure: {mode: replace, objects: [{type: QP, size: 200KiB}]}}\n"
        "  - {vf: 1, reconfigure: {mode: remove, objects: [{type: QP, size: 1GiB}]}}\n"
    )
    apply_scenario(fw, parse_scenario(events))
    assert fw.memory.used == 512 * KiB and fw.vf(1).state.objects == []
    before = _held(fw)
    with pytest.raises(OutOfMemory, match="memory limit"):
        apply_scenario(fw, parse_scenario(events.replace("replace", "add", 1)))
    assert _held(fw) == before
