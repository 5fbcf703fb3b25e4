"""grpcsvc.tls and grpcsvc.certs: mutual TLS between a real server and real
channels, the principal a server sees for each kind of client certificate, the
listen policy (no off-host listener without TLS unless --insecure), unix:PATH
listeners and their file mode, and where a client's TLS comes from (options,
else VFIO_TLS_*)."""

from __future__ import annotations

import argparse
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpcsvc import tls
from grpcsvc.certs import LOCAL_NAMES, DevCa, spiffe_id
from grpcsvc.server import GrpcService, ListenError, add_serve_command, listen_options
from tests.support.tls import ADMIN, DRIVER, TENANTS, Pki

pytestmark = pytest.mark.grpc

WHOAMI = "/tls.test.v1.Probe/WhoAmI"


def _whoami_service() -> GrpcService:
    """A service whose one method answers with the caller's principal."""

    async def whoami(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return tls.principal(context).encode()

    handler = grpc.method_handlers_generic_handler(
        "tls.test.v1.Probe",
        {
            "WhoAmI": grpc.unary_unary_rpc_method_handler(
                whoami, request_deserializer=None, response_serializer=None
            )
        },
    )
    return GrpcService([], lambda server: server.add_generic_rpc_handlers((handler,)))


async def _whoami(target: str, client: tls.ClientTls | None) -> str:
    async with tls.aio_channel(target, client) as ch:
        answer = await ch.unary_unary(WHOAMI)(b"", timeout=10)
    return bytes(answer).decode()


async def _served(server_tls: tls.ServerTls | None) -> AsyncIterator[str]:
    service = _whoami_service()
    port = await service.start("127.0.0.1:0", tls_config=server_tls)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await service.stop(0)


@pytest.fixture
async def mutual(pki: Pki) -> AsyncIterator[str]:
    async for target in _served(pki.server_tls()):
        yield target


@pytest.fixture
async def server_auth_only(pki: Pki) -> AsyncIterator[str]:
    async for target in _served(pki.server_tls(mutual=False)):
        yield target


# --- mutual TLS and the principal --------------------------------------------------------


@pytest.mark.parametrize("name", [*TENANTS, ADMIN])
async def test_the_principal_of_a_uri_san_certificate_is_its_spiffe_id(
    pki: Pki, mutual: str, name: str
) -> None:
    assert await _whoami(mutual, pki.client_tls(name)) == spiffe_id(name)


async def test_the_principal_of_a_cn_only_certificate_is_its_cn(pki: Pki, mutual: str) -> None:
    """The driver's certificate has no URI SAN (DevCa.client(uri=False))."""
    assert await _whoami(mutual, pki.client_tls(DRIVER)) == DRIVER == "vfio-driver"


async def test_a_client_without_a_certificate_is_refused_by_a_client_ca_server(
    pki: Pki, mutual: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _whoami(mutual, pki.client_tls(None))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_plaintext_client_is_refused_by_a_tls_server(mutual: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _whoami(mutual, None)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_of_another_ca_is_refused(
    pki: Pki, mutual: str, tmp_path: Path
) -> None:
    """The client trusts the server; the server does not trust the client's CA."""
    stranger = DevCa(tmp_path / "other").client(TENANTS[0])
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _whoami(mutual, tls.ClientTls(str(pki.ca), str(stranger.cert), str(stranger.key)))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_server_of_another_ca_is_not_trusted(pki: Pki, tmp_path: Path) -> None:
    other = DevCa(tmp_path / "other")
    server = other.server("server")
    async for target in _served(tls.ServerTls(str(server.cert), str(server.key))):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _whoami(target, pki.client_tls(TENANTS[0]))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # ... and is, to a client that trusts its CA.
        assert await _whoami(target, tls.ClientTls(str(other.cert_path))) == tls.ANONYMOUS


async def test_without_client_certificates_every_caller_is_anonymous(
    pki: Pki, server_auth_only: str
) -> None:
    assert await _whoami(server_auth_only, pki.client_tls(None)) == tls.ANONYMOUS
    async for target in _served(None):
        assert await _whoami(target, None) == tls.ANONYMOUS


async def test_a_loaded_ca_issues_certificates_the_first_one_trusts(pki: Pki, mutual: str) -> None:
    """DevCa.load (vfioctl certs --keep-ca): the same CA, new client certificates."""
    again = DevCa.load(pki.dir)
    assert again.cert_path.read_bytes() == pki.ca.read_bytes()
    issued = again.client("late-joiner")
    client = tls.ClientTls(str(pki.ca), str(issued.cert), str(issued.key))
    assert await _whoami(mutual, client) == spiffe_id("late-joiner")


def test_a_ca_directory_whose_key_is_not_the_certificates_is_refused(
    pki: Pki, tmp_path: Path
) -> None:
    mixed = tmp_path / "mixed"
    DevCa(mixed)
    (mixed / "ca.pem").write_bytes(pki.ca.read_bytes())
    with pytest.raises(ValueError, match="not the key"):
        DevCa.load(mixed)


def test_server_certificates_name_the_hosts_and_loopback(tmp_path: Path) -> None:
    issued = DevCa(tmp_path).server("server", ["fwemu", "*.fwemu.vfio.svc.cluster.local"])
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [*san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert set(names) == {"fwemu", "*.fwemu.vfio.svc.cluster.local", *LOCAL_NAMES}
    assert stat.S_IMODE(issued.key.stat().st_mode) == 0o600


# --- where a client's TLS comes from ---------------------------------------------------------


ENV = {tls.ENV_CA: "/env/ca.pem", tls.ENV_CERT: "/env/c.pem", tls.ENV_KEY: "/env/c.key"}


def test_client_tls_falls_back_to_the_environment_option_by_option() -> None:
    assert tls.client_tls(env=ENV) == tls.ClientTls("/env/ca.pem", "/env/c.pem", "/env/c.key")
    assert tls.client_tls("/o/ca.pem", env=ENV) == tls.ClientTls(
        "/o/ca.pem", "/env/c.pem", "/env/c.key"
    )
    assert tls.client_tls(env={}) is None
    assert tls.client_tls(env=None) is None
    assert tls.client_tls(env={tls.ENV_CA: ""}) is None  # set but empty: unset


def test_a_client_certificate_without_its_key_is_refused() -> None:
    with pytest.raises(tls.TlsError):
        tls.client_tls(env={tls.ENV_CERT: "/env/c.pem"})


def test_client_options_read_the_environment_only_under_the_tls_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    p = argparse.ArgumentParser()
    tls.add_client_args(p)
    tls.add_client_args(p, prefix="firmware-tls")
    args = p.parse_args(["--tls-ca", "/o/ca.pem", "--firmware-tls-ca", "/f/ca.pem"])
    assert tls.client_tls_from_args(args) == tls.ClientTls("/o/ca.pem", "/env/c.pem", "/env/c.key")
    # The driver's firmware link does not take a client's environment.
    assert tls.client_tls_from_args(args, "firmware-tls") == tls.ClientTls("/f/ca.pem")


def test_tls_files_that_cannot_work_are_refused_before_anything_listens(
    pki: Pki, tmp_path: Path
) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_serve_command(sub, help="", description="", listen="127.0.0.1:0")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    cert, key = str(pki.server.cert), str(pki.server.key)
    for argv in (
        ["--tls-client-ca", str(pki.ca)],
        ["--tls-cert", cert],
        ["--tls-cert", cert, "--tls-key", str(tmp_path / "missing.key")],
        ["--tls-cert", cert, "--tls-key", str(not_pem)],
    ):
        with pytest.raises(ListenError):
            listen_options(p.parse_args(["serve", *argv]))
    ok = listen_options(p.parse_args(["serve", "--tls-cert", cert, "--tls-key", key]))
    assert ok["tls_config"] == tls.ServerTls(cert, key)


# --- the listen policy -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen",
    ["127.0.0.1:1", "127.0.0.53:1", "[::1]:1", "localhost:1", "unix:/run/x.sock",
     "unix:///run/x.sock", "unix-abstract:x"],
)  # fmt: skip
def test_loopback_and_unix_addresses_are_local(listen: str) -> None:
    assert tls.is_local(listen)
    tls.check_listen(listen, None, insecure=False)


@pytest.mark.parametrize("listen", ["0.0.0.0:1", "[::]:1", "10.1.2.3:1", "fwemu:1", ":1"])
def test_off_host_addresses_need_tls_or_insecure(pki: Pki, listen: str) -> None:
    assert not tls.is_local(listen)
    with pytest.raises(tls.TlsError, match="without TLS"):
        tls.check_listen(listen, None, insecure=False)
    tls.check_listen(listen, None, insecure=True)
    tls.check_listen(listen, pki.server_tls(), insecure=False)


async def test_a_service_refuses_an_off_host_address_without_tls() -> None:
    service = GrpcService([], lambda server: None)
    with pytest.raises(ListenError, match="without TLS"):
        await service.start("0.0.0.0:0")
    assert service.port == 0


def test_a_serve_command_refuses_an_off_host_address_without_tls() -> None:
    """What a deployment that forgot its certificates sees: exit non-zero, why on stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "fwemu.cli", "serve", "--listen", "0.0.0.0:0", "--vfs", "1",
         "--size", "64KiB"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "without TLS" in done.stderr and "--insecure" in done.stderr
    assert "serving" not in done.stdout


# --- unix:PATH listeners ---------------------------------------------------------------------


async def _health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as ch:
        answer = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return int(answer.status)


@pytest.mark.parametrize("mode", [0o600, 0o660])
async def test_a_unix_socket_is_made_with_the_mode_asked_and_serves(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "svc.sock"
    service = GrpcService([], lambda server: None)
    old = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        await service.start(f"unix:{path}", socket_mode=mode)
    finally:
        os.umask(old)
    try:
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
        assert await _health(f"unix:{path}") == health_pb2.HealthCheckResponse.SERVING
    finally:
        await service.stop(0)


async def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "svc.sock"
    with socket.socket(socket.AF_UNIX) as stale:  # a server that died left it behind
        stale.bind(str(path))
    service = GrpcService([], lambda server: None)
    await service.start(f"unix:{path}")
    try:
        assert await _health(f"unix:{path}") == health_pb2.HealthCheckResponse.SERVING
    finally:
        await service.stop(0)


async def test_a_regular_file_is_not_replaced_by_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("keep me")
    service = GrpcService([], lambda server: None)
    with pytest.raises(ListenError, match="not a socket"):
        await service.start(f"unix:{path}")
    assert path.read_text() == "keep me"


async def test_a_symlink_is_not_followed_nor_replaced(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    link = tmp_path / "svc.sock"
    link.symlink_to(target)
    service = GrpcService([], lambda server: None)
    with pytest.raises(ListenError, match="not a socket"):
        await service.start(f"unix:{link}")
    assert link.is_symlink() and target.read_text() == "keep me"
