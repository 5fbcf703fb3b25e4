"""`fwemu serve --memory-limit` and the embedded mode's memory_limit: the
firmware's memory budget (README, "Device state")."""

from __future__ import annotations

import pytest

from fwemu.cli import _parser
from fwemu.embedded import EmbeddedFirmware, ScenarioError
from fwemu.link.ifc import KiB, MiB
from fwemu.model.memory import default_memory_limit, machine_memory


def test_serve_takes_a_memory_limit() -> None:
    args = _parser().parse_args(["serve", "--memory-limit", "2GiB"])
    assert args.memory_limit == 2 << 30
    assert _parser().parse_args(["serve"]).memory_limit is None
    whole = str(machine_memory())  # the most it takes (its RAM, or its cgroup's limit)
    assert _parser().parse_args(["serve", "--memory-limit", whole]).memory_limit == int(whole)


def build(memory_limit: int | None) -> EmbeddedFirmware:
    return EmbeddedFirmware.build(
        size=256 * KiB, dirty_rate=0, seed=1, scenario=None, vfs=2, memory_limit=memory_limit
    )


async def test_the_embedded_firmware_has_the_limit_or_the_machine_default() -> None:
    assert build(None)._fw.memory.limit == default_memory_limit()
    fw = build(1 * MiB)._fw
    assert (fw.memory.limit, fw.memory.used) == (1 * MiB, 512 * KiB)


async def test_a_limit_below_the_vfs_at_start_is_a_scenario_error() -> None:
    with pytest.raises(ScenarioError, match="memory limit"):
        build(256 * KiB)
