"""The load test's flows without Locust: each user class's flow against a
`vfio-driver serve --scenario-service` process, its calls and measures
recorded in a list.  No failure, no missed or spurious REINIT, every fault
case meets its errno and recovery, and the pool leaves no VF behind."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.vfioctl_driver import Driver
from vfioclient.sync import SyncVfioClient
from vfioclient.transport import FROM_ENV, resolve_tls
from vfioload.flows import FAULT_CASES, FLOWS, Flow
from vfioload.pool import DevicePool
from vfioload.scenario import SyncScenario

pytestmark = pytest.mark.grpc

VF = {"size": 256 << 10, "dirty_bytes_per_s": 0}


@dataclass
class Record:
    kind: str
    name: str
    seconds: float
    length: int
    error: BaseException | None


class Recorded(list[Record]):
    def __call__(
        self,
        kind: str,
        name: str,
        seconds: float,
        *,
        length: int = 0,
        error: BaseException | None = None,
    ) -> None:
        self.append(Record(kind, name, seconds, length, error))

    def failures(self) -> list[str]:
        return [f"{r.name}: {r.error}" for r in self if r.error is not None]

    def count(self, name: str) -> int:  # type: ignore[override]
        return sum(r.name == name and r.error is None for r in self)


@pytest.fixture(name="driver", scope="module")
def driver_fixture() -> Iterator[Driver]:
    d = Driver.start(vfs=0)
    yield d
    d.stop()


def run(driver: Driver, kind: str, steps: int) -> Recorded:
    recorded = Recorded()
    scenario = SyncScenario(driver.target, resolve_tls(FROM_ENV))
    with SyncVfioClient.connect(driver.target) as client:
        pool = DevicePool(scenario, lambda: client, VF)
        flow: Flow = FLOWS[kind](kind, client, scenario, pool, recorded)
        flow.start()
        try:
            for _ in range(steps):
                flow.step()
        finally:
            flow.stop()
        pool.close()
        assert client.list_devices() == [], "the pool left VFs behind"
    scenario.close()
    return recorded


def test_reinit_loop_detects_every_reconfiguration(driver: Driver) -> None:
    r = run(driver, "reinit-loop", 20)
    assert r.failures() == []
    assert r.count("REINIT detection") == r.count("re-arm") == 20
    assert r.count("Reconfigure") == 20
    assert all(x.seconds > 0 for x in r if x.name == "REINIT detection")


def test_migrations_verify_with_reconfigurations_at_every_moment(driver: Driver) -> None:
    r = run(driver, "migration", 12)
    assert r.failures() == []
    assert r.count("migration") == r.count("downtime") == 12
    assert r.count("Reconfigure") > 0  # some of the 12 reconfigured (random moments)


def test_precopy_hammer_only_asks(driver: Driver) -> None:
    r = run(driver, "precopy-hammer", 200)
    assert r.failures() == []
    assert r.count("PrecopyInfo") == 200


def test_every_fault_case_meets_its_errno_and_recovers(driver: Driver) -> None:
    r = run(driver, "faults", 2 * len(FAULT_CASES))
    assert r.failures() == []
    for case in FAULT_CASES:
        assert r.count(case.name) == 2, case.name
