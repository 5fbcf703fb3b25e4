"""The suite's two passes are what they claim (tests/support/tls_mode.py):
with VFIO_TEST_TLS=1 the servers the harness starts require a client
certificate, and its clients present the admin's; without it everything is
plaintext on loopback and every caller `anonymous`.  So an mTLS pass that
quietly ran in plaintext fails here."""

from __future__ import annotations

import os

import grpc
import pytest

from driver.api import CLIENT_KEY
from driver.api.v1 import vfio_pb2 as pb
from driver.api.v1 import vfio_pb2_grpc as pbg
from fwemu.link.inproc import InProcessLink
from fwemu.model.clock import LoopClock
from fwemu.model.firmware import Firmware
from grpcsvc.spawn import FWEMU
from grpcsvc.tls import ANONYMOUS, ENV_CERT, ClientTls, aio_channel
from tests.support import tls_mode
from tests.support.driver_service import DriverUnderTest, VfioClient
from tests.support.tls import ADMIN

pytestmark = pytest.mark.grpc


async def _lists_devices(target: str, tls: ClientTls | None) -> bool:
    """Whether a ListDevices over `tls` (None: plaintext) is answered."""
    channel = aio_channel(target, tls)
    try:
        await pbg.VfioStub(channel).ListDevices(
            pb.ListDevicesRequest(), metadata=((CLIENT_KEY, "probe"),), timeout=5
        )
        return True
    except grpc.aio.AioRpcError:
        return False
    finally:
        await channel.close(None)


async def test_the_harness_serves_this_passs_transport() -> None:
    d = await DriverUnderTest.start(InProcessLink(Firmware(LoopClock(), seed=1)), "inproc")
    try:
        async with await VfioClient.connect(d.target, "who") as c:
            await c.list_devices()
        principals = {p for p, client in d.server.servicer.processes if client == "who"}
        pki = tls_mode.session_pki()
        if tls_mode.enabled():
            assert principals == {pki.principal(ADMIN)} == {tls_mode.client_principal()}
            assert not await _lists_devices(d.target, None)  # plaintext
            assert not await _lists_devices(d.target, pki.client_tls(None))  # no certificate
            assert os.environ[ENV_CERT] == str(pki.clients[ADMIN].cert)
        else:
            assert principals == {ANONYMOUS} == {tls_mode.client_principal()}
            assert await _lists_devices(d.target, None)
            assert ENV_CERT not in os.environ
    finally:
        await d.stop()
    assert tls_mode.client_tls(d.target) is None  # forgotten once stopped


def test_a_spawned_service_takes_this_passs_options() -> None:
    """tls_mode.served: the same command line in both passes, mutual TLS in one."""
    with tls_mode.served(FWEMU, "--vfs", "0", "--log-level", "error") as (proc, target):
        args = proc.args
        assert isinstance(args, list)
        assert ("--tls-client-ca" in args) == tls_mode.enabled()
        assert (tls_mode.client_tls(target) is not None) == tls_mode.enabled()
