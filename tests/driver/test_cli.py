"""`vfio-driver serve` as a process: health, reflection, a prompt clean
shutdown, and clear errors (no traceback) for what an operator gets wrong."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from driver.cli import main
from driver.vfio.uapi import MigState
from fwemu.link.grpc import GrpcLink
from grpcsvc.spawn import DRIVER, FWEMU, start, stop
from tests.support.driver_service import LOCAL, VfioClient

pytestmark = pytest.mark.grpc


@pytest.fixture(name="served")
def served_fixture() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """An embedded-firmware driver with three small VFs."""
    proc, target = start([*DRIVER, *LOCAL, "--vfs", "3", "--size", "64KiB"])
    yield proc, target
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def run_driver(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DRIVER, *args], capture_output=True, text=True, timeout=30)


def test_health_reports_serving_for_the_server_and_the_vfio_service(
    served: tuple[subprocess.Popen[str], str],
) -> None:
    """grpc.health.v1: SERVING for the server ("") and for vfio.v1.Vfio; the
    firmware's Scenario service is unknown unless --scenario-service."""
    _, target = served
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "vfio.v1.Vfio"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="fwemu.api.v1.Scenario"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND  # not served without the flag


def _services(target: str) -> set[str]:
    with grpc.insecure_channel(target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(stub.ServerReflectionInfo(iter([req]), timeout=5))
        return {s.name for s in resp.list_services_response.service}


def test_reflection_lists_the_vfio_service(served: tuple[subprocess.Popen[str], str]) -> None:
    """Server reflection lists vfio.v1.Vfio and health (grpcurl works unaided)."""
    _, target = served
    names = _services(target)
    assert {"vfio.v1.Vfio", "grpc.health.v1.Health"} <= names
    assert "fwemu.api.v1.Scenario" not in names


def test_scenario_service_flag_serves_the_embedded_firmwares_scenario() -> None:
    """--scenario-service: the embedded firmware's Scenario service on the same
    port (health and reflection know it)."""
    proc, target = start([*DRIVER, *LOCAL, "--vfs", "1", "--size", "64KiB", "--scenario-service"])
    try:
        assert "fwemu.api.v1.Scenario" in _services(target)
        with grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="fwemu.api.v1.Scenario"), timeout=5
            )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        rc, err = stop(proc)
    assert rc == 0, err


def test_sigterm_stops_cleanly(served: tuple[subprocess.Popen[str], str]) -> None:
    """SIGTERM: a graceful stop, exit status 0."""
    proc, _ = served
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


async def test_sigterm_with_a_client_holding_devices_stops_promptly(
    served: tuple[subprocess.Popen[str], str],
) -> None:
    """A connected client's Session stream is no call to drain: SIGTERM ends it
    at once, closes what the client had open, and the process exits 0 well
    before the 5 s grace period."""
    proc, target = served
    client = await VfioClient.connect(target)
    try:
        devices = await client.list_devices()
        fd = await client.open_device(devices[0].name)
        await client.set_state(fd, MigState.PRE_COPY)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        ended = await client.session.read()  # the server ends the Session stream
        assert ended is grpc.aio.EOF
        rc, err = stop(proc, signal_it=False)
        assert time.monotonic() - t0 < 3
    finally:
        await client.close_channel()
    assert rc == 0 and "Traceback" not in err, err


def test_port_in_use_is_a_clear_error(served: tuple[subprocess.Popen[str], str]) -> None:
    """A taken --listen port: exit 1 and "address already in use", no traceback."""
    _, target = served
    r = run_driver("--listen", target, "--vfs", "1", "--size", "4KiB")
    assert r.returncode == 1
    assert "address already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_firmware_is_a_clear_error() -> None:
    """--firmware nobody answers on: exit 1, the address named, no traceback."""
    r = run_driver("--listen", "127.0.0.1:0", "--firmware", "127.0.0.1:1")
    assert r.returncode == 1
    assert "cannot reach the firmware at 127.0.0.1:1" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_firmware_that_goes_away_does_not_stop_the_driver_uncleanly() -> None:
    """fwemu dies while the driver has a device open: the driver still shuts
    down with exit 0 -- closing a device whose firmware is gone is logged, as
    close(2) cannot fail for it."""
    fw, fw_target = start([*FWEMU, *LOCAL, "--vfs", "1", "--size", "64KiB"])
    proc, target = start([*DRIVER, *LOCAL, "--firmware", fw_target, "--cmd-timeout", "2"])
    try:

        async def hold_a_device() -> None:
            async with await VfioClient.connect(target) as client:
                (dev,) = await client.list_devices()
                await client.open_device(dev.name)
                fw.kill()  # gone, without a goodbye
                fw.communicate()
                proc.send_signal(signal.SIGTERM)
                await client.session.read()

        asyncio.run(hold_a_device())
        rc, err = stop(proc, signal_it=False)
    finally:
        if fw.poll() is None:
            stop(fw)
    assert rc == 0 and "Traceback" not in err, err


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """driver.cli.main in this process (no interpreter start-up per case):
    the exit code and stderr.  An exception escaping main would fail the test,
    as a traceback would."""
    try:
        rc = main(["serve", "--listen", "127.0.0.1:0", *args])
    except SystemExit as e:  # argparse
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ("vfs: [{count: 0}]", "vfs.0.count"),
        ("vfs: [{size: 12XB}]", "vfs.0.size"),
        ("- just\n- a list\n", "a scenario is a mapping"),
        ("seed: [unclosed", "not valid YAML"),
        ("vfs: [{count: 1}]\nevents: [{vf: 9, reconfigure: {}}]", "no VF with vhca_id 9"),
        ("vfs: [{count: 1, size: 1}]", "size must be between"),
    ],
)
def test_bad_scenario_file_is_refused_with_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expect: str
) -> None:
    """A scenario the embedded firmware cannot apply: exit 2, naming the field."""
    f = tmp_path / "scenario.yaml"
    f.write_text(content)
    rc, err = run_main(capsys, "--scenario", str(f))
    assert rc == 2 and expect in err, err


def test_bad_scenario_file_exits_2_from_the_command(tmp_path: Path) -> None:
    """The same through the real command: exit 2, the message, no traceback."""
    f = tmp_path / "scenario.yaml"
    f.write_text("vfs: [{count: 1}]\nevents: [{vf: 9, reconfigure: {}}]")
    r = run_driver("--listen", "127.0.0.1:0", "--scenario", str(f))
    assert r.returncode == 2
    assert "no VF with vhca_id 9" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_scenario_file_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """A --scenario file that cannot be read: exit 2, saying so."""
    rc, err = run_main(capsys, "--scenario", "/nonexistent/s.yaml")
    assert rc == 2 and "cannot read scenario" in err


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--vfs", "-1"], "count must be at least 1"),
        (["--size", "0"], "size must be between"),
        (["--size", "lots"], "is not a size"),
        (["--cmd-timeout", "0"], "not a positive number of seconds"),
        (["--cmd-timeout", "nan"], "not a positive number of seconds"),
        (["--firmware", "127.0.0.1:1", "--vfs", "2"], "--vfs is for the embedded firmware"),
        (["--firmware", "127.0.0.1:1", "--scenario", "s.yaml"], "--scenario is for the"),
        (["--firmware", "127.0.0.1:1", "--scenario-service"], "--scenario-service is for"),
    ],
)
def test_bad_options_are_refused(
    capsys: pytest.CaptureFixture[str], args: list[str], expect: str
) -> None:
    """Settings the embedded firmware refuses, and embedded-firmware options
    given with --firmware (they would be ignored): exit 2 with a message."""
    rc, err = run_main(capsys, *args)
    assert rc == 2 and expect in err, err


def test_serves_the_embedded_vfs_by_pci_name() -> None:
    """One VFIO device per VF, named by PCI address: VF n at 0000:81:<n/8>.<n%8>."""
    proc, target = start([*DRIVER, *LOCAL, "--vfs", "9", "--size", "4KiB"])
    try:

        async def names() -> list[str]:
            async with await VfioClient.connect(target) as client:
                return [d.name for d in await client.list_devices()]

        got = asyncio.run(names())
    finally:
        stop(proc)
    assert got == [f"0000:81:00.{i}" for i in range(1, 8)] + ["0000:81:01.0", "0000:81:01.1"]


async def test_fwemu_stops_promptly_with_a_driver_connected() -> None:
    """SIGTERM on the firmware process with a driver's link (its completion
    stream) open: the process exits 0 promptly, as vfio-driver does."""
    fw, target = start([*FWEMU, *LOCAL, "--vfs", "1", "--size", "64KiB"])
    link = await GrpcLink.connect(target)
    try:
        fw.send_signal(signal.SIGTERM)
        try:
            rc = await asyncio.to_thread(fw.wait, 2.5)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 0, "still running 2.5 s after SIGTERM"
    finally:
        await link.close()
        stop(fw, signal_it=False)
