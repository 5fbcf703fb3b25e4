"""The exam end to end: a driver with its embedded firmware's Scenario
service in process, the exam runner arming each trap, and an orchestrator
under test migrating the devices the exam names, as a task of the same loop.

The project's orchestrator (`vfioclient.migration.migrate`, QEMU 11.1's
algorithm) passes every trap; one that ignores REINIT (no re-armed
switchover-ack, no final check) fails exactly the three REINIT traps and
passes the others as the project's does."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.vfioclient.exam.rig import (
    Migrate,
    Orchestrator,
    exam_driver,
    migrate_without_final_check,
    naive_migrate,
)
from vfioclient import VfioClient
from vfioclient.exam import TRAPS, Trap, Verdict, run_exam
from vfioclient.migration import migrate
from vfioclient.scenario import ScenarioClient

pytestmark = pytest.mark.grpc

REINIT_TRAPS = {name for name, t in TRAPS.items() if t.reinit}
# vfioclient/migration/device.py _set_state: after a failed change and a failed
# recovery it resets the device with its data fd still open (audit rule
# reset-with-open-stream); reported to the lead.  Drop it here once fixed.
TRAP_TIMEOUT = 10.0  # a migration here takes well under a second


async def exam(
    run: Migrate, traps: list[Trap], scenario_client: type[ScenarioClient] = ScenarioClient
) -> tuple[list[Verdict], Orchestrator]:
    """The verdicts, and the orchestrator; the exam leaves no VF behind."""
    async with exam_driver() as target:
        client = await VfioClient.connect(target)
        scenario = await scenario_client.connect(target)
        orch = Orchestrator(target, run)
        try:
            verdicts = await run_exam(
                client, scenario, traps, timeout=TRAP_TIMEOUT, on_ready=orch.ready
            )
            await asyncio.gather(*orch.tasks)
            left = [d.name for d in await client.list_devices()]
            assert left == [], f"the exam left VFs {left} on the firmware"
        finally:
            await scenario.aclose()
            await client.aclose()
    return verdicts, orch


@pytest.mark.parametrize("name", list(TRAPS))
async def test_the_project_orchestrator_passes_the_trap(name: str) -> None:
    (v,), orch = await exam(migrate, [TRAPS[name]])
    assert v.passed, (v.reasons, orch.results)
    assert v.fired, "the trap's moment never came"


async def test_an_orchestrator_ignoring_reinit_fails_exactly_the_reinit_traps() -> None:
    verdicts, orch = await exam(naive_migrate, list(TRAPS.values()))
    failed = {v.trap for v in verdicts if not v.passed}
    assert failed == REINIT_TRAPS, [(v.trap, v.reasons) for v in verdicts]
    for v in verdicts:
        if v.trap in REINIT_TRAPS:
            assert v.fired and v.reasons[0].startswith("switched over with initial bytes unread")
            assert v.reasons[0].endswith("(audit rule stop-copy-with-initial-bytes)")
            # It believed it migrated: only the audit tells.
            assert orch.results[v.trap] == "ok"


async def test_a_reinit_after_the_decision_meets_the_final_check() -> None:
    """The trap's REINIT is seen by no readiness check but by QEMU 11.1's
    final one after the decision: the project's orchestrator fails the
    migration there, the source RUNNING, and passes."""
    (v,), orch = await exam(migrate, [TRAPS["reinit-after-switchover-decision"]])
    assert v.passed and v.outcome == "aborted" and v.attempts == 1, v.reasons
    assert "REINIT after the switchover decision" in orch.results[v.trap]


async def test_a_reinit_after_the_ack_is_met_in_precopy_with_a_new_ack() -> None:
    (v,), orch = await exam(migrate, [TRAPS["reinit-after-ack"]])
    assert v.passed and v.outcome == "completed", v.reasons
    assert orch.results[v.trap] == "ok"
    assert orch.reinits[v.trap] and set(orch.reinits[v.trap]) == {"precopy"}


async def test_an_orchestrator_without_the_final_check_does_not_pass_by_avoiding_the_trap() -> None:
    """No PRECOPY_INFO after the decision: the trap's REINIT never comes (its
    SAVE is the stop-copy one, so the data is whole), and a trap that never
    fired shows nothing: not passed."""
    (v,), _ = await exam(migrate_without_final_check, [TRAPS["reinit-after-switchover-decision"]])
    assert not v.fired and not v.passed
    assert v.reasons[0].startswith("not shown: the trap's moment never came in 3 run(s)")


class LateDigests(ScenarioClient):
    """Digests read late, as a loaded exam's may be (its events, and its calls
    on them, come when they come): only once the VF runs again (its
    orchestrator closed it: the FLR) and its workload ran a while."""

    async def digest(self, vhca_id: int, *, suspended: bool = False) -> str:
        deadline = time.monotonic() + TRAP_TIMEOUT
        while (await self.get_vf(vhca_id)).initiator_suspended and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # a 2 MiB/s workload writes a hundred pages
        return await super().digest(vhca_id, suspended=suspended)


async def test_the_source_digest_is_its_stop_copy_state_however_late_the_exam_reads_it() -> None:
    """A completed migration's source runs its workload again once its
    orchestrator closes it; the exam compares the destination with the state
    the source had while suspended (its stop-copy), not with whatever state
    it has by the time the exam gets to ask."""
    (v,), orch = await exam(migrate, [TRAPS["completion-delayed"]], LateDigests)
    assert orch.results[v.trap] == "ok"
    assert v.passed and v.outcome == "completed", v.reasons
