"""Who may call what on fwemu (fwemu/service/access.py, issue 12 item 4),
against a real FirmwareServer with mutual TLS: the Firmware service is the
drivers' and admins'; on Scenario an admin reaches every VF and anyone else
only the VFs a driver says it holds, a VF it does not hold answering exactly
as one that does not exist; what changes the set of VFs or moves time is the
admins' alone.  Each refusal changes nothing."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import message_factory

from fwemu.api.v1 import firmware_pb2 as fpb
from fwemu.api.v1 import scenario_pb2 as spb
from fwemu.embedded import EmbeddedFirmware
from fwemu.link.ifc import CmdStatus, FaultKind, Opcode
from fwemu.model import Firmware, VirtualClock
from fwemu.service.access import SCENARIO_REACH
from fwemu.service.servicers import ScenarioServicer
from grpcsvc.errors import ErrorInfo, error_info
from tests.fwemu.service.conftest import VF, Served
from tests.support.tls import ADMIN, DRIVER, Pki

pytestmark = pytest.mark.grpc

FIRMWARE = fpb.DESCRIPTOR.services_by_name["Firmware"]
SCENARIO = spb.DESCRIPTOR.services_by_name["Scenario"]

# Requests that would do harm if they reached the firmware (the rest are sent empty).
HARMFUL: dict[str, Any] = {
    "SuspendVhca": fpb.SuspendVhcaRequest(vhca_id=1),
    "FunctionLevelReset": fpb.FunctionLevelResetRequest(vhca_id=1),
    "CreateMkey": fpb.CreateMkeyRequest(length=4096, remote=True),
    "SetVfHolders": fpb.SetVfHoldersRequest(vhca_id=1, principals=["spiffe://x/intruder"]),
    "CreatePageTracker": fpb.CreatePageTrackerRequest(
        vhca_id=1, log_page_size=12, ranges=[fpb.PageTrackRange(start_address=0, length=1 << 20)]
    ),
}


async def _call(channel: grpc.aio.Channel, service: Any, name: str, request: Any) -> Any:
    """Any RPC of `service` by name, whatever its streaming shape: its answer
    (the messages of a server stream, a list)."""
    method = service.methods_by_name[name]
    path = f"/{service.full_name}/{name}"
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    request = request if request is not None else req_cls()
    ser, de = req_cls.SerializeToString, resp_cls.FromString
    if method.client_streaming:
        call = channel.stream_unary(path, request_serializer=ser, response_deserializer=de)
        return await call(iter([request]), timeout=5)
    if method.server_streaming:
        stream = channel.unary_stream(path, request_serializer=ser, response_deserializer=de)
        out = []
        async for m in stream(request, timeout=5):
            out.append(m)
            break  # a Completions stream answers once and stays open
        return out
    return await channel.unary_unary(path, request_serializer=ser, response_deserializer=de)(
        request, timeout=5
    )


async def _refused(coro: Any) -> ErrorInfo:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    return error_info(e.value)


def _holds(mtls: Served, vhca_id: int, *names: str) -> fpb.SetVfHoldersRequest:
    return fpb.SetVfHoldersRequest(
        vhca_id=vhca_id, principals=[mtls.pki.principal(n) for n in names]
    )


@pytest.mark.parametrize("tenant", ["team-a", "team-b"])
async def test_a_tenant_is_refused_every_firmware_rpc_and_nothing_changes(
    mtls: Served, tenant: str
) -> None:
    """FLR, SUSPEND, mkeys, completions, SetVfHolders...: PERMISSION_DENIED with
    ErrorInfo PERMISSION_DENIED (a denial, not a firmware outbox)."""
    ch = mtls.channel(tenant)
    before = mtls.fw.info(1)
    for method in FIRMWARE.methods:
        info = await _refused(_call(ch, FIRMWARE, method.name, HARMFUL.get(method.name)))
        assert info.code == grpc.StatusCode.PERMISSION_DENIED, method.name
        assert (info.reason, info.domain) == ("PERMISSION_DENIED", "fwemu.emulator"), method.name
        assert info.metadata["principal"] == mtls.pki.principal(tenant)
    after = mtls.fw.info(1)
    assert after == before  # not suspended, not reset, no tracker
    assert len(mtls.fw.mkeys) == 0 and mtls.fw.holders == {}
    assert not mtls.fw.stats.commands  # no command reached the command path


@pytest.mark.parametrize("who", [DRIVER, ADMIN])
async def test_drivers_and_admins_use_the_firmware_service(mtls: Served, who: str) -> None:
    stub = mtls.firmware(who)
    q = await stub.QueryVhcaMigrationState(fpb.QueryVhcaMigrationStateRequest(vhca_id=1))
    assert q.status == CmdStatus.OK
    r = await stub.SuspendVhca(fpb.SuspendVhcaRequest(vhca_id=1, op_mod=0))
    assert r.status == CmdStatus.OK and mtls.fw.info(1).initiator_suspended
    await stub.SetVfHolders(_holds(mtls, 2, "team-a"))
    assert mtls.fw.holders == {2: frozenset({mtls.pki.principal("team-a")})}


async def test_set_vf_holders_of_an_unknown_vf_is_not_found(mtls: Served) -> None:
    info = await _refused(mtls.firmware(DRIVER).SetVfHolders(_holds(mtls, 9, "team-a")))
    assert (info.code, info.reason) == (grpc.StatusCode.NOT_FOUND, "NO_SUCH_VF")


def _per_vf_requests(vhca_id: int) -> dict[str, Any]:
    """A request of every Scenario RPC that addresses one VF."""
    fail = spb.Fault(
        kind=FaultKind.FAIL, opcode=Opcode.SAVE_VHCA_STATE, status=CmdStatus.BAD_PARAM_ERR
    )
    return {
        "ConfigureVf": spb.ConfigureVfRequest(
            vhca_id=vhca_id, config=spb.VfConfig(dirty_bytes_per_s=4096)
        ),
        "GetVf": spb.GetVfRequest(vhca_id=vhca_id),
        "Reconfigure": spb.ReconfigureRequest(vhca_id=vhca_id, now=True),
        "ResetVf": spb.ResetVfRequest(vhca_id=vhca_id),  # as Reconfigure: holders and admins
        "InjectFault": spb.InjectFaultRequest(vhca_id=vhca_id, fault=fail),
        "ClearFaults": spb.ClearFaultsRequest(vhca_id=vhca_id),
        "GetDigest": spb.GetDigestRequest(vhca_id=vhca_id),
    }


def test_every_scenario_rpc_has_a_reach_and_the_per_vf_ones_are_tested() -> None:
    assert set(SCENARIO_REACH) == {m.name for m in SCENARIO.methods}
    per_vf = {n for n, r in SCENARIO_REACH.items() if r.value == "holder"}
    assert per_vf == set(_per_vf_requests(1))


async def test_a_holder_reaches_its_vf_and_another_tenant_sees_no_such_vf(mtls: Served) -> None:
    """team-a holds VF 1: every per-VF RPC works for it.  For team-b, VF 1
    answers exactly as VF 99 (no such VF) does, and nothing changes."""
    await mtls.firmware(DRIVER).SetVfHolders(_holds(mtls, 1, "team-a"))
    a, b = mtls.channel("team-a"), mtls.channel("team-b")
    before = mtls.fw.info(1)
    for name, request in _per_vf_requests(1).items():
        info = await _refused(_call(b, SCENARIO, name, request))
        unknown = await _refused(_call(b, SCENARIO, name, _per_vf_requests(99)[name]))
        assert info.code == grpc.StatusCode.NOT_FOUND, name
        assert (info.reason, info.domain, info.metadata) == (
            unknown.reason,
            unknown.domain,
            unknown.metadata,
        )
        assert info.message == unknown.message.replace("99", "1") == "no VF with vhca_id 1"
    assert mtls.fw.info(1) == before and not mtls.fw.vf(1).faults.faults
    for name, request in _per_vf_requests(1).items():
        await _call(a, SCENARIO, name, request)  # no error
    assert mtls.fw.vf(1).config.dirty_bytes_per_s == 4096
    assert mtls.fw.info(1).reconfigurations == 1


async def test_list_vfs_shows_a_tenant_only_what_it_holds(mtls: Served) -> None:
    await mtls.firmware(DRIVER).SetVfHolders(_holds(mtls, 2, "team-a", "team-b"))
    await mtls.firmware(DRIVER).SetVfHolders(_holds(mtls, 3, "team-a"))

    async def listed(name: str) -> list[int]:
        r = await mtls.scenario(name).ListVfs(spb.ListVfsRequest())
        return [v.vhca_id for v in r.vfs]

    assert await listed("team-a") == [2, 3]
    assert await listed("team-b") == [2]
    assert await listed(DRIVER) == [1, 2, 3]  # a driver probes every VF
    assert await listed(ADMIN) == [1, 2, 3]

    # function_ids: those VFs only, still only those the caller reaches.
    fid = {v: mtls.fw.vf(v).function_id for v in (1, 2, 3)}

    async def picked(name: str, *vhcas: int) -> list[int]:
        ids = [fid[v] for v in vhcas] + [4000]  # and one of no VF
        r = await mtls.scenario(name).ListVfs(spb.ListVfsRequest(function_ids=ids))
        return [v.vhca_id for v in r.vfs]

    assert await picked(DRIVER, 3) == [3]
    assert await picked(ADMIN, 1, 3) == [1, 3]
    assert await picked("team-b", 2, 3) == [2]
    assert await picked("team-a", 1) == []


async def test_releasing_a_vf_takes_its_reach_away(mtls: Served) -> None:
    fw_stub = mtls.firmware(DRIVER)
    a = mtls.scenario("team-a")
    await fw_stub.SetVfHolders(_holds(mtls, 1, "team-a"))
    assert (await a.GetVf(spb.GetVfRequest(vhca_id=1))).vhca_id == 1
    await fw_stub.SetVfHolders(_holds(mtls, 1))  # its last close
    info = await _refused(a.GetVf(spb.GetVfRequest(vhca_id=1)))
    assert (info.code, info.reason) == (grpc.StatusCode.NOT_FOUND, "NO_SUCH_VF")


ADMIN_ONLY: dict[str, Any] = {
    "CreateVfs": spb.CreateVfsRequest(count=1),
    "RemoveVf": spb.RemoveVfRequest(vhca_id=1),
    "ApplyScenario": spb.ApplyScenarioRequest(text="vfs: [{count: 1}]"),
    "AdvanceClock": spb.AdvanceClockRequest(seconds=5),
}


@pytest.mark.parametrize("who", ["team-a", DRIVER])
async def test_admin_only_rpcs_are_denied_to_others_even_holders(mtls: Served, who: str) -> None:
    await mtls.firmware(DRIVER).SetVfHolders(_holds(mtls, 1, who))
    assert {n for n, r in SCENARIO_REACH.items() if r.value == "admin"} == set(ADMIN_ONLY)
    ch = mtls.channel(who)
    for name, request in ADMIN_ONLY.items():
        info = await _refused(_call(ch, SCENARIO, name, request))
        assert info.code == grpc.StatusCode.PERMISSION_DENIED, name
        assert (info.reason, info.domain) == ("PERMISSION_DENIED", "fwemu.emulator")
    assert sorted(mtls.fw.vfs) == [1, 2, 3] and mtls.fw.now() == 0.0


async def test_an_admin_reaches_every_vf_and_every_rpc(mtls: Served) -> None:
    ch = mtls.channel(ADMIN)
    for name, request in _per_vf_requests(2).items():  # held by nobody
        await _call(ch, SCENARIO, name, request)
    assert mtls.fw.info(2).reconfigurations == 1
    first = mtls.fw.vf(1)
    for name, request in ADMIN_ONLY.items():  # create 4, remove 1, apply: a new 1
        await _call(ch, SCENARIO, name, request)
    assert sorted(mtls.fw.vfs) == [1, 2, 3, 4] and mtls.fw.vf(1) is not first
    assert mtls.fw.now() == 5.0


async def test_anyone_reads_the_clock(mtls: Served) -> None:
    r = await mtls.scenario("team-b").GetClock(spb.ClockRequest())
    assert (r.now, r.virtual) == (0.0, True)


async def test_the_embedded_scenario_service_takes_the_same_roles(pki: Pki) -> None:
    """The driver's `serve --scenario-service`: EmbeddedFirmware's servicer with
    the driver's roles, holders told through the in-process link."""
    fw = Firmware(VirtualClock(), seed=1)
    fw.create_vfs(2, VF)
    emb = EmbeddedFirmware(fw)
    server = grpc.aio.server()
    emb.add_scenario_servicer(server, pki.roles())
    port = server.add_secure_port("127.0.0.1:0", pki.server_tls().credentials())
    await server.start()
    served = Served(fw, None, f"127.0.0.1:{port}", pki)  # type: ignore[arg-type]
    try:
        a = served.scenario("team-a")
        info = await _refused(a.GetDigest(spb.GetDigestRequest(vhca_id=2)))
        assert (info.code, info.reason) == (grpc.StatusCode.NOT_FOUND, "NO_SUCH_VF")
        await emb.link.set_vf_holders(2, frozenset({pki.principal("team-a")}))
        assert (await a.GetDigest(spb.GetDigestRequest(vhca_id=2))).digest == fw.digest(2)
        assert [v.vhca_id for v in (await a.ListVfs(spb.ListVfsRequest())).vfs] == [2]
        info = await _refused(a.CreateVfs(spb.CreateVfsRequest(count=1)))
        assert info.code == grpc.StatusCode.PERMISSION_DENIED and len(fw.vfs) == 2
        admin = served.scenario(ADMIN)
        assert len((await admin.ListVfs(spb.ListVfsRequest())).vfs) == 2
    finally:
        for ch in served.channels:
            await ch.close(None)
        await server.stop(0)
        await emb.link.close()


def test_without_roles_the_scenario_servicer_lets_anonymous_do_anything() -> None:
    """No client certificates (loopback): every caller is ANONYMOUS, which
    holds every role, as before TLS."""
    servicer = ScenarioServicer(Firmware(VirtualClock()))
    assert servicer.reaches("anonymous", 12345)
    assert not servicer.reaches("spiffe://vfio-mlx5-emu/team-a", 1)


async def test_reset_vf_reaches_only_the_holders_and_admins_vfs(mtls: Served) -> None:
    """ResetVf follows Reconfigure's rule: team-b cannot undo team-a's VF (no
    such VF, and it stays as it was); team-a and an admin reset it."""
    await mtls.firmware(DRIVER).SetVfHolders(_holds(mtls, 1, "team-a"))
    fresh = mtls.fw.digest(1)
    mtls.fw.reconfigure(1, [(0, 4096)])
    changed = mtls.fw.digest(1)
    request = spb.ResetVfRequest(vhca_id=1)
    info = await _refused(mtls.scenario("team-b").ResetVf(request))
    assert (info.code, info.reason) == (grpc.StatusCode.NOT_FOUND, "NO_SUCH_VF")
    assert mtls.fw.digest(1) == changed
    reset = await mtls.scenario("team-a").ResetVf(request)
    assert (reset.vhca_id, reset.state_size) == (1, VF.size)
    assert mtls.fw.digest(1) == fresh
    mtls.fw.reconfigure(1, [(0, 4096)])
    await mtls.scenario(ADMIN).ResetVf(request)
    assert mtls.fw.digest(1) == fresh
