"""No certificate, no service (issue 12, items 1 and 2): against the
mutual-TLS services a plaintext client, a TLS client without a certificate,
and one whose certificate another CA signed (claiming the admin's name) are
all turned away at the handshake, by the driver and by the firmware alike;
the lab's certificate is answered.  A stranger turned away leaves the
service's JSON log JSON."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from driver.api import CLIENT_KEY
from driver.api.v1 import vfio_pb2 as pb
from driver.api.v1 import vfio_pb2_grpc as pbg
from fwemu.api.v1 import scenario_pb2 as spb
from fwemu.api.v1 import scenario_pb2_grpc as sgrpc
from fwemu.link.base import LinkError
from fwemu.link.grpc import GrpcLink
from grpcsvc import spawn
from grpcsvc.certs import DevCa
from grpcsvc.tls import ClientTls, aio_channel
from tests.security.rig import ADMIN, Parties
from tests.support.tls import Pki

pytestmark = pytest.mark.grpc


async def _answered(target: str, tls: ClientTls | None, service: str) -> bool:
    channel = aio_channel(target, tls)
    try:
        if service == "driver":
            await pbg.VfioStub(channel).ListDevices(
                pb.ListDevicesRequest(), metadata=((CLIENT_KEY, "probe"),), timeout=5
            )
        else:
            await sgrpc.ScenarioStub(channel).GetClock(spb.ClockRequest(), timeout=5)
        return True
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e  # refused at the handshake
        return False
    finally:
        await channel.close(None)


async def test_only_the_labs_certificates_reach_the_services(mtls: Parties, tmp_path: Path) -> None:
    pki = mtls.stack.pki
    assert pki is not None
    rogue_ca = DevCa(tmp_path / "rogue")
    forged = rogue_ca.client(ADMIN)  # the admin's name, another CA's signature
    strangers = {
        "plaintext": None,
        "no certificate": pki.client_tls(None),
        "another CA's certificate": ClientTls(str(pki.ca), str(forged.cert), str(forged.key)),
    }
    for service, target in (("driver", mtls.stack.driver), ("firmware", mtls.stack.firmware)):
        for who, tls in strangers.items():
            assert not await _answered(target, tls, service), (service, who)
        assert await _answered(target, pki.client_tls(ADMIN), service), service


async def test_a_refused_handshake_leaves_the_json_log_json(pki: Pki) -> None:
    """README "Metrics and logs": with --log-format json every stderr line is
    a JSON object; a port scanner's plaintext connection must not change that."""
    argv = [*spawn.FWEMU, "--listen", "127.0.0.1:0", "--vfs", "0", "--log-format", "json"]
    proc, target = spawn.start([*argv, "--log-level", "error", *pki.server_args()], "fwemu")
    try:
        with pytest.raises(LinkError):
            await GrpcLink.connect(target, timeout=1)  # plaintext: refused
    finally:
        rc, err = spawn.stop(proc)
    assert rc == 0
    for line in err.splitlines():
        if line.strip():
            json.loads(line)
