"""A full per-VF cap answers RESOURCE_EXHAUSTED with ErrorInfo LIMIT_REACHED
over the real FirmwareServer (README, "Faults")."""

from __future__ import annotations

import grpc
import pytest

from fwemu.api.v1 import scenario_pb2 as spb
from fwemu.api.v1 import scenario_pb2_grpc as sgrpc
from fwemu.link.ifc import Fault, FaultKind, Opcode
from fwemu.model import Firmware, VirtualClock
from fwemu.model.limits import MAX_ARMED_FAULTS, MAX_PENDING_TRIGGERS
from fwemu.service.server import FirmwareServer
from grpcsvc.errors import error_info

pytestmark = pytest.mark.grpc


async def test_full_caps_answer_resource_exhausted() -> None:
    fw = Firmware(VirtualClock(), seed=1)
    fw.create_vfs(1)
    for _ in range(MAX_ARMED_FAULTS):
        fw.inject_fault(1, Fault(FaultKind.FAIL, Opcode.SUSPEND_VHCA, status=3))
    for _ in range(MAX_PENDING_TRIGGERS):
        fw.reconfigure(1, [], after_saved_bytes=1 << 40)
    srv = FirmwareServer(fw)
    port = await srv.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = sgrpc.ScenarioStub(ch)
            fault = spb.Fault(kind=spb.FAULT_KIND_FAIL, opcode=Opcode.SUSPEND_VHCA, status=3)
            for call in (
                stub.InjectFault(spb.InjectFaultRequest(vhca_id=1, fault=fault)),
                stub.Reconfigure(spb.ReconfigureRequest(vhca_id=1, after_saved_bytes=1 << 40)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                info = error_info(e.value)
                assert (info.code, info.reason) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "LIMIT_REACHED",
                )
                assert "at most" in info.message
    finally:
        await srv.stop()
    assert len(fw.vf(1).faults.faults) == MAX_ARMED_FAULTS
    assert len(fw.vf(1).triggers) == MAX_PENDING_TRIGGERS


async def test_a_scenario_past_the_caps_is_resource_exhausted_and_applies_nothing() -> None:
    """ApplyScenario whose faults would go past the cap is refused whole with
    the cap's status: the faults of the events before it are not armed, the
    VF it would have created does not exist."""
    fw = Firmware(VirtualClock(), seed=1)
    fw.create_vfs(1)
    events = "".join(
        "  - {vf: 1, fault: {kind: fail, opcode: SUSPEND_VHCA, status: 3}}\n"
        for _ in range(MAX_ARMED_FAULTS + 1)
    )
    srv = FirmwareServer(fw)
    port = await srv.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = sgrpc.ScenarioStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ApplyScenario(
                    spb.ApplyScenarioRequest(text="vfs: [{count: 1}]\nevents:\n" + events)
                )
            info = error_info(e.value)
            assert (info.code, info.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_REACHED")
    finally:
        await srv.stop()
    assert sorted(fw.vfs) == [1]
    assert fw.vf(1).faults.faults == []
