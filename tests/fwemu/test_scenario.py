"""Scenario files (model level): parse_scenario, load_scenario_file,
apply_scenario."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fwemu.link.ifc import CmdStatus, FirmwareError, KiB, Opcode, VfConfig
from fwemu.model import Firmware, VirtualClock
from fwemu.scenario import (
    EXAMPLE,
    ScenarioError,
    apply_scenario,
    build_firmware,
    json_schema,
    load_scenario_file,
    parse_scenario,
)


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
