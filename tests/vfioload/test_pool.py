"""The device pool: a new VF is named by the driver's device of the same
vhca id and function id in the Scenario firmware's PCI domain (shards
number their VFs alike), leases are exclusive, and close removes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vfioload.pool import DevicePool
from vfioload.scenario import Vf


@dataclass
class Listed:
    name: str
    vhca_id: int
    function_id: int


@dataclass
class FakeScenario:
    target: str = "fw:50051"
    next_id: int = 1
    removed: list[int] = field(default_factory=list)

    def create_vfs(self, count: int, **config: Any) -> list[Vf]:
        vfs = [Vf(self.next_id + i, self.next_id + i) for i in range(count)]
        self.next_id += count
        return vfs

    def remove_vf(self, vhca_id: int) -> None:
        self.removed.append(vhca_id)


class FakeLister:
    def list_devices(self) -> list[Listed]:
        # Both shards have VFs 1..4, with the same ids: only the domain differs.
        return [Listed(f"{shard:04x}:81:00.{n}", n, n) for shard in (0, 1) for n in range(1, 5)]


def test_new_vfs_are_named_in_the_scenario_shards_domain() -> None:
    scenario = FakeScenario()
    lister = FakeLister()
    pool = DevicePool(scenario, lambda: lister, {}, shard=0, sleep=lambda s: None)  # type: ignore[arg-type,return-value]
    a, b = pool.lease(2)
    assert (a.name, b.name) == ("0000:81:00.1", "0000:81:00.2")
    pool.give_back([a])
    (c,) = pool.lease(1)
    assert c == a  # a free device is leased again before another is made
    (d,) = pool.lease(1)
    assert d.name == "0000:81:00.3"
    pool.close()
    assert sorted(scenario.removed) == [1, 2, 3]
