"""The shipped scenario files keep their promise: examples/reinit.yaml (the
README's and the compose file's fwemu) and deploy/k8s/base/scenario.yaml (each
Kubernetes firmware shard) say VF 2's first migration reports a REINIT.  Its
reconfiguration fires after 8 MiB saved: inside the first SAVE of a 16 MiB VF,
so the first PRECOPY_INFO answers REINIT (an after_saved_bytes past what one
migration saves would never fire: the bug these files had at 32 MiB)."""

from __future__ import annotations

from pathlib import Path

import pytest

from driver.registry import DeviceRegistry
from driver.service.server import DriverServer
from driver.shards import pci_name
from fwemu.link.inproc import InProcessLink
from fwemu.model.clock import LoopClock
from fwemu.model.firmware import Firmware
from fwemu.scenario import apply_scenario, load_scenario_file
from tests.support import tls_mode
from tests.support.vfioclient_migration import options
from vfioclient import VfioClient
from vfioclient.migration import DevicePair, migrate

ROOT = Path(__file__).resolve().parents[2]
FILES = ["examples/reinit.yaml", "deploy/k8s/base/scenario.yaml"]

pytestmark = pytest.mark.grpc


@pytest.mark.parametrize("path", FILES)
async def test_vf_2s_first_migration_reports_a_reinit(path: str) -> None:
    fw = Firmware(LoopClock(), seed=1)
    vfs = {vf.vhca_id: vf for vf in apply_scenario(fw, load_scenario_file(str(ROOT / path)))}
    server = DriverServer(DeviceRegistry(InProcessLink(fw)), roles=tls_mode.roles())
    target = await tls_mode.start(server)
    client = await VfioClient.connect(target)
    try:
        src, dst = pci_name(vfs[2].function_id), pci_name(vfs[5].function_id)
        sfd, dfd = await client.open_device(src), await client.open_device(dst)
        o = options(bandwidth_estimate=1 << 30)  # 16 MiB fits 0.3 s: converges once acked
        report = await migrate([DevicePair(client, sfd, client, dfd, name=src)], o)
        assert report.status == "completed"
        assert len(report.reinits) == 1, report.to_dict()
        assert report.reinits[0].device == src
        # The second migration of the same VF: the reconfiguration is done, no REINIT.
        await client.close(sfd)
        await client.close(dfd)
        sfd, dfd = await client.open_device(src), await client.open_device(dst)
        again = await migrate([DevicePair(client, sfd, client, dfd, name=src)], o)
        assert again.status == "completed" and again.reinits == []
    finally:
        await client.aclose()
        tls_mode.stopped(target)
        await server.stop(0)
