"""Sharding across real processes, configured as deploy/k8s configures it
(the overlays, with components/mtls).

Two `fwemu serve --shard 0/1` and two `vfio-driver serve --memory remote`
over both shards: driver A gets the shard map by `--firmware-shards`, driver
B from VFIO_FIRMWARE_SHARDS (as the manifests give it).  The shards listen on
127.0.0.10 and 127.0.0.11 with one port, so the client's VFIO_FIRMWARE_SHARDS
can be the template form the manifests use (`...{shard}...:PORT@2`) for the
same map.  Every connection is mutual TLS: one server certificate for every
shard's address (the cert-manager one names every shard with a wildcard), the
drivers' firmware links as "vfio-driver", the clients as a migration client
(its Scenario calls reach the VFs of the devices it holds) or as the admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from driver.shards import SHARDS_ENV, parse_shards, pci_name
from driver.vfio.uapi import MigState
from fwemu.link.ifc import VfInfo
from grpcsvc.certs import DevCa, Issued, spiffe_id
from grpcsvc.spawn import DRIVER, FWEMU, served
from grpcsvc.tls import ENV_CA, ENV_CERT, ENV_KEY, ClientTls
from vfioclient import VfioClient
from vfioclient.cli import main as vfioctl
from vfioclient.scenario import ScenarioClient

pytestmark = pytest.mark.grpc

QUIET = ("--log-level", "error", "--loop", "asyncio")
# No workload: digests read after the migration (destination RUNNING) still compare.
VFS = ("--vfs", "2", "--size", "256KiB", "--dirty-rate", "0")
HOSTS = ("127.0.0.10", "127.0.0.11")  # shard k on 127.0.0.1{k}
CLIENT, ADMIN = "orchestrator", "admin"


@dataclass(frozen=True)
class ClusterPki:
    ca: str
    server: Issued
    clients: dict[str, Issued]

    def tls(self, name: str) -> ClientTls:
        c = self.clients[name]
        return ClientTls(self.ca, str(c.cert), str(c.key))

    def server_args(self) -> tuple[str, ...]:
        return ("--tls-cert", str(self.server.cert), "--tls-key", str(self.server.key),
                "--tls-client-ca", self.ca, "--admin-principals", spiffe_id(ADMIN))  # fmt: skip

    def firmware_link_args(self) -> tuple[str, ...]:
        d = self.clients["vfio-driver"]
        return ("--firmware-tls-ca", self.ca, "--firmware-tls-cert", str(d.cert),
                "--firmware-tls-key", str(d.key))  # fmt: skip


@dataclass(frozen=True)
class Cluster:
    firmware: tuple[str, str]  # shard k's HOST:PORT
    driver_a: str  # --firmware-shards
    driver_b: str  # VFIO_FIRMWARE_SHARDS
    template_spec: str  # the same shard map, as a TEMPLATE@N
    pki: ClusterPki


def _common_free_port() -> int:
    """A port free on both shard addresses (fwemu binds without SO_REUSEPORT)."""
    with socket.socket() as a, socket.socket() as b:
        a.bind((HOSTS[0], 0))
        port: int = a.getsockname()[1]
        b.bind((HOSTS[1], port))
        return port


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """`name` set in this process, so a process started meanwhile inherits it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _shard(
    k: int, port: int, pki: ClusterPki
) -> contextlib.AbstractContextManager[tuple[object, str]]:
    return served(FWEMU, "--listen", f"{HOSTS[k]}:{port}", "--shard", str(k), *VFS, *QUIET,
                  *pki.server_args())  # fmt: skip


@pytest.fixture(name="cluster", scope="module")
def cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    assert SHARDS_ENV not in os.environ
    ca = DevCa(tmp_path_factory.mktemp("cluster-pki"))
    pki = ClusterPki(
        str(ca.cert_path),
        ca.server("server", HOSTS),
        {
            "vfio-driver": ca.client("vfio-driver", uri=False),
            CLIENT: ca.client(CLIENT),
            ADMIN: ca.client(ADMIN),
        },
    )
    with contextlib.ExitStack() as stack:
        for attempt in range(5):  # another process may take the port in between
            port = _common_free_port()
            try:
                fw = [stack.enter_context(_shard(k, port, pki))[1] for k in range(2)]
                break
            except RuntimeError:
                stack.close()
                if attempt == 4:
                    raise
        spec = ",".join(fw)
        as_deployed = ("--memory", "remote", "--firmware-wait", "10", *QUIET,
                       *pki.server_args(), *pki.firmware_link_args())  # fmt: skip
        _, a = stack.enter_context(served(DRIVER, "--firmware-shards", spec, *as_deployed))
        with _env(SHARDS_ENV, spec):
            _, b = stack.enter_context(served(DRIVER, *as_deployed))
        yield Cluster((fw[0], fw[1]), a, b, f"127.0.0.1{{shard}}:{port}@2", pki)


@pytest.fixture(autouse=True)
def as_the_migration_client(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """VFIO_TLS_* name the migration client's certificate (as a client pod mounts it)."""
    c = cluster.pki.clients[CLIENT]
    monkeypatch.setenv(ENV_CA, cluster.pki.ca)
    monkeypatch.setenv(ENV_CERT, str(c.cert))
    monkeypatch.setenv(ENV_KEY, str(c.key))


async def _vfs(cluster: Cluster, firmware: str) -> list[VfInfo]:
    async with await ScenarioClient.connect(firmware, tls=cluster.pki.tls(ADMIN)) as s:
        return await s.list_vfs()


async def _digest(cluster: Cluster, firmware: str, vhca_id: int) -> str:
    async with await ScenarioClient.connect(firmware, tls=cluster.pki.tls(ADMIN)) as s:
        return await s.digest(vhca_id)


def test_the_template_spec_is_the_same_shard_map(cluster: Cluster) -> None:
    assert parse_shards(cluster.template_spec).addresses == cluster.firmware


async def test_shards_hold_different_vfs(cluster: Cluster) -> None:
    """--shard K: seed --seed + K, so shard 0's VF 1 is not shard 1's VF 1."""
    assert await _digest(cluster, cluster.firmware[0], 1) != await _digest(
        cluster, cluster.firmware[1], 1
    )


@pytest.mark.parametrize("driver", ["driver_a", "driver_b"])
async def test_both_drivers_list_both_shards_devices_by_domain(
    cluster: Cluster, driver: str
) -> None:
    c = await VfioClient.connect(getattr(cluster, driver))
    try:
        devices = await c.list_devices()
    finally:
        await c.aclose()
    assert [(d.name, d.vhca_id, d.function_id) for d in devices] == [
        (pci_name(fn, k), fn, fn) for k in (0, 1) for fn in (1, 2)
    ]
    assert all(d.migratable for d in devices)


async def test_a_shard_1_device_through_driver_a_reaches_shard_1s_firmware(
    cluster: Cluster,
) -> None:
    """STOP on 0001:81:00.2 suspends VF 2 of shard 1, not VF 2 of shard 0."""
    c = await VfioClient.connect(cluster.driver_a)
    try:
        fd = await c.open_device(pci_name(2, 1))
        await c.set_state(fd, MigState.STOP)
        shard0, shard1 = [await _vfs(cluster, fw) for fw in cluster.firmware]
        assert [(v.vhca_id, v.initiator_suspended, v.responder_suspended) for v in shard1] == [
            (1, False, False),
            (2, True, True),
        ]
        assert not any(v.initiator_suspended or v.responder_suspended for v in shard0)
        await c.set_state(fd, MigState.RUNNING)
    finally:
        await c.aclose()  # closing the device resets it (FLR)


def test_vfioctl_migrates_across_shards_and_drivers_verifying_digests(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shard 0's 0000:81:00.1 (driver A) to shard 1's 0001:81:00.2 (driver B):
    `--verify yes` finds each device's Scenario service through
    VFIO_FIRMWARE_SHARDS alone and reads the digests there as the migration
    client (it holds both devices), and the shards' digests end equal."""
    src, dst = pci_name(1, 0), pci_name(2, 1)
    before = (
        asyncio.run(_digest(cluster, cluster.firmware[0], 1)),
        asyncio.run(_digest(cluster, cluster.firmware[1], 2)),
    )
    assert before[0] != before[1]
    monkeypatch.setenv(SHARDS_ENV, cluster.template_spec)
    rc = vfioctl(["--driver", cluster.driver_a, "--json", "migrate", src, dst,
                  "--dst-driver", cluster.driver_b, "--verify", "yes"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["status"] == "completed" and doc["verified"] is True
    after = (
        asyncio.run(_digest(cluster, cluster.firmware[0], 1)),
        asyncio.run(_digest(cluster, cluster.firmware[1], 2)),
    )
    assert after[0] == after[1] == before[0]


def test_vfioctl_refuses_a_device_outside_the_shard_map(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SHARDS_ENV, cluster.firmware[0])  # shard 0 only
    rc = vfioctl(["--driver", cluster.driver_a, "migrate", pci_name(2, 0), pci_name(1, 1),
                  "--dst-driver", cluster.driver_b, "--verify", "yes"])  # fmt: skip
    _, err = capsys.readouterr()
    assert rc == 1
    assert "EINVAL" in err and "0001:81:00.1 is on shard 1" in err
