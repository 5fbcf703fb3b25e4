"""An exception in the model reaches the client as the firmware's answer, never
as UNKNOWN: a command answers with an outbox status and syndrome, a scenario
request with a gRPC status whose ErrorInfo names the condition (issue 11, item 5).

The exceptions come through a real seam: a Firmware whose command path or
scenario path raises, served by the real FirmwareServer."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from fwemu.api.v1 import firmware_pb2 as fpb
from fwemu.api.v1 import firmware_pb2_grpc as fgrpc
from fwemu.api.v1 import scenario_pb2 as spb
from fwemu.api.v1 import scenario_pb2_grpc as sgrpc
from fwemu.link.ifc import CmdStatus, Command, R, Syndrome
from fwemu.link.scenario_requests import A, ScenarioRequest
from fwemu.model import Firmware, VirtualClock
from fwemu.service.server import FirmwareServer
from grpcsvc.errors import error_info

pytestmark = pytest.mark.grpc


class RaisingFirmware(Firmware):
    """The model, except that its command and scenario paths raise `exc` once armed."""

    exc: BaseException | None = None

    def exec(self, cmd: Command[R]) -> R:
        if self.exc is not None:
            raise self.exc
        return super().exec(cmd)

    def control(self, req: ScenarioRequest[A]) -> A:
        if self.exc is not None:
            raise self.exc
        return super().control(req)


@pytest.fixture
async def served() -> AsyncIterator[tuple[RaisingFirmware, grpc.aio.Channel]]:
    fw = RaisingFirmware(VirtualClock(), seed=1)
    fw.create_vfs(1)
    srv = FirmwareServer(fw)
    port = await srv.start("127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield fw, ch
    await srv.stop()


CASES: list[Any] = [
    pytest.param(MemoryError(), CmdStatus.LIM_ERR, Syndrome.NO_MEMORY,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, "NO_MEMORY", id="MemoryError"),
    pytest.param(OSError(errno.ENOMEM, "mmap: Cannot allocate memory"), CmdStatus.LIM_ERR,
                 Syndrome.NO_MEMORY, grpc.StatusCode.RESOURCE_EXHAUSTED, "NO_MEMORY",
                 id="OSError-ENOMEM"),
    pytest.param(OSError(errno.EIO, "I/O error"), CmdStatus.INT_ERR, Syndrome.INTERNAL,
                 grpc.StatusCode.INTERNAL, "EIO", id="OSError-EIO"),
    pytest.param(RecursionError("maximum recursion depth exceeded"), CmdStatus.INT_ERR,
                 Syndrome.INTERNAL, grpc.StatusCode.INTERNAL, "RECURSION", id="RecursionError"),
    pytest.param(KeyError("bug"), CmdStatus.INT_ERR, Syndrome.INTERNAL,
                 grpc.StatusCode.INTERNAL, "INTERNAL_ERROR", id="other"),
]  # fmt: skip


@pytest.mark.parametrize(("exc", "status", "syndrome", "code", "reason"), CASES)
async def test_a_command_answers_with_a_status_and_syndrome(
    served: tuple[RaisingFirmware, grpc.aio.Channel],
    exc: BaseException,
    status: int,
    syndrome: int,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    fw, ch = served
    stub = fgrpc.FirmwareStub(ch)
    fw.exc = exc
    r = await stub.QueryVhcaMigrationState(fpb.QueryVhcaMigrationStateRequest(vhca_id=1))
    assert (r.status, r.syndrome) == (status, syndrome)
    s = await stub.SuspendVhca(fpb.SuspendVhcaRequest(vhca_id=1))
    assert (s.status, s.syndrome) == (status, syndrome) and s.diagnostic
    fw.exc = None  # the server still answers, and the VF is as it was
    r = await stub.QueryVhcaMigrationState(fpb.QueryVhcaMigrationStateRequest(vhca_id=1))
    assert r.status == CmdStatus.OK


@pytest.mark.parametrize(("exc", "status", "syndrome", "code", "reason"), CASES)
async def test_a_scenario_request_answers_with_error_info(
    served: tuple[RaisingFirmware, grpc.aio.Channel],
    exc: BaseException,
    status: int,
    syndrome: int,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    fw, ch = served
    stub = sgrpc.ScenarioStub(ch)
    fw.exc = exc
    for call in (
        stub.CreateVfs(spb.CreateVfsRequest(count=1)),
        stub.GetVf(spb.GetVfRequest(vhca_id=1)),
        stub.Reconfigure(spb.ReconfigureRequest(vhca_id=1, now=True)),
        stub.AdvanceClock(spb.AdvanceClockRequest(seconds=1.0)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        info = error_info(e.value)
        assert (info.code, info.reason, info.domain) == (code, reason, "fwemu.emulator")
    fw.exc = None
    assert (await stub.GetVf(spb.GetVfRequest(vhca_id=1))).vhca_id == 1


async def test_an_mkey_the_server_cannot_map_answers_with_a_status(
    served: tuple[RaisingFirmware, grpc.aio.Channel],
) -> None:
    """CreateMkey's allocation raising MemoryError: LIM_ERR / NO_MEMORY in the outbox."""
    fw, ch = served
    stub = fgrpc.FirmwareStub(ch)
    fw.exc = MemoryError()
    r = await stub.CreateMkey(fpb.CreateMkeyRequest(length=4096, remote=True))
    assert (r.status, r.syndrome) == (CmdStatus.LIM_ERR, Syndrome.NO_MEMORY)
    fw.exc = OSError(errno.EIO, "I/O error")
    r = await stub.CreateMkey(fpb.CreateMkeyRequest(length=4096, remote=True))
    assert (r.status, r.syndrome) == (CmdStatus.INT_ERR, Syndrome.INTERNAL)
    fw.exc = None
    r = await stub.CreateMkey(fpb.CreateMkeyRequest(length=4096, remote=True))
    assert r.status == CmdStatus.OK
