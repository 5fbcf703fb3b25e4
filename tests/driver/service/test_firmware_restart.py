"""A firmware restart under a running driver, across real processes: `fwemu
serve` is killed and started again on the same address while `vfio-driver
serve --firmware` keeps running.

What was in flight fails at once with an errno (not after --cmd-timeout), the
Vfio service's health is NOT_SERVING while the firmware is away and SERVING
again once the driver re-subscribed to its completions, and then a whole
migration through the driver succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from driver.registry import pci_name
from driver.service.server import VFIO_SERVICE
from driver.vfio.uapi import MigState
from fwemu.link.grpc import GrpcLink
from grpcsvc.spawn import DRIVER, FWEMU, start, stop
from tests.driver.service.test_migration import check, migrate
from tests.support import tls_mode
from tests.support.driver_service import LOCAL, Vf, VfioCallError, VfioClient, eventually

pytestmark = pytest.mark.grpc

CMD_TIMEOUT = 30.0  # far above every wait below: a failure "at once" is not this timeout
# The VFs of test_migration's WORKLOAD, made by fwemu at its start (and again after a restart).
FWEMU_ARGS = ["--log-level", "warning", "--vfs", "2", "--size", "1MiB", "--dirty-rate", "8MiB"]
Status = health_pb2.HealthCheckResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """fwemu on a fixed address, and a driver over it."""

    fw_address: str
    fwemu: subprocess.Popen[str]
    driver: subprocess.Popen[str]
    target: str  # the driver's

    def start_fwemu(self) -> None:
        self.fwemu, address = start([*FWEMU, "--listen", self.fw_address, *FWEMU_ARGS], "fwemu")
        assert address == self.fw_address

    def kill_fwemu(self) -> None:
        self.fwemu.kill()
        self.fwemu.communicate()


@pytest.fixture(name="stack")
def stack_fixture() -> Iterator[Stack]:
    address = f"127.0.0.1:{free_port()}"
    fwemu, _ = start([*FWEMU, "--listen", address, *FWEMU_ARGS], "fwemu")
    driver, target = start(
        [*DRIVER, *LOCAL, "--firmware", address, "--cmd-timeout", str(CMD_TIMEOUT)]
    )
    s = Stack(address, fwemu, driver, target)
    yield s
    rc, err = stop(s.driver)
    with contextlib.suppress(subprocess.TimeoutExpired):
        stop(s.fwemu)
    assert rc == 0 and "Traceback" not in err, err


async def vfio_health(target: str) -> int:
    async with tls_mode.channel(target) as ch:
        req = health_pb2.HealthCheckRequest(service=VFIO_SERVICE)
        return int((await health_pb2_grpc.HealthStub(ch).Check(req, timeout=5)).status)


async def server_health(target: str) -> int:
    async with tls_mode.channel(target) as ch:
        req = health_pb2.HealthCheckRequest(service="")
        return int((await health_pb2_grpc.HealthStub(ch).Check(req, timeout=5)).status)


@contextlib.asynccontextmanager
async def scenario(address: str) -> AsyncIterator[GrpcLink]:
    """The firmware's Scenario side (its completions are not needed here)."""
    link = GrpcLink(address)
    try:
        yield link
    finally:
        await link.close()


async def vfs(address: str) -> tuple[Vf, Vf]:
    async with scenario(address) as fw:
        a, b = await fw.list_vfs()
    return Vf(pci_name(a.function_id), a.vhca_id), Vf(pci_name(b.function_id), b.vhca_id)


async def test_a_firmware_restart_fails_a_save_in_flight_at_once_and_the_driver_recovers(
    stack: Stack,
) -> None:
    src, dst = await vfs(stack.fw_address)
    async with scenario(stack.fw_address) as fw:
        # A SAVE that stays in flight: the firmware takes 20 s to complete it.
        await fw.configure_vf(src.vhca_id, save_latency_s=20.0)
    async with await VfioClient.connect(stack.target) as client:
        assert await vfio_health(stack.target) == Status.SERVING
        fd = await client.open_device(src.name)
        await client.set_state(fd, MigState.STOP)
        saving = await client.set_state(fd, MigState.STOP_COPY)
        assert len(await client.read(saving, 1 << 20)) == 24  # the STOP_COPY_SIZE record
        reading = asyncio.ensure_future(client.read(saving, 1 << 20))
        await asyncio.sleep(0.3)
        assert not reading.done()  # waiting for the SAVE's completion

        killed = time.monotonic()
        stack.kill_fwemu()
        with pytest.raises(VfioCallError) as e:
            await asyncio.wait_for(reading, CMD_TIMEOUT)
        failed_after = time.monotonic() - killed
        assert e.value.errno in (errno.EIO, errno.ENODEV), e.value
        assert failed_after < 2.0, f"the read failed after {failed_after:.2f} s"

        async def not_serving() -> bool:
            return await vfio_health(stack.target) == Status.NOT_SERVING

        assert await eventually(not_serving, 5)
        # The process is well: a liveness probe of the server must not restart it.
        assert await server_health(stack.target) == Status.SERVING
        for f in (saving, fd):
            await client.close(f)

        stack.start_fwemu()
        restarted = time.monotonic()

        async def serving() -> bool:
            return await vfio_health(stack.target) == Status.SERVING

        assert await eventually(serving, 10)
        serving_after = time.monotonic() - restarted
        async with scenario(stack.fw_address) as fw:  # a new firmware: VFs as at its start
            m = await migrate(client, src, dst, fw)
        migrated_after = time.monotonic() - restarted
        check(m, reconfigured=True)
    print(
        f"\nSAVE in flight failed {failed_after * 1000:.0f} ms after the kill; "
        f"SERVING {serving_after * 1000:.0f} ms and the first migration done "
        f"{migrated_after * 1000:.0f} ms after the restart"
    )


# --- a driver killed during stop-copy (kept as the kernel has it) ---------------------------


async def test_a_driver_killed_in_stop_copy_leaves_the_vf_suspended_until_a_new_open(
    stack: Stack,
) -> None:
    """Faithful to the kernel: nothing resumes a VF whose driver died in
    STOP_COPY (the firmware keeps it suspended), and the next driver's first
    open resets it (vfio-pci resets a device on open): RUNNING, and its state
    as it was, since a suspended VF runs no workload."""
    src, _ = await vfs(stack.fw_address)
    async with await VfioClient.connect(stack.target) as client:
        fd = await client.open_device(src.name)
        await client.set_state(fd, MigState.STOP)
        await client.set_state(fd, MigState.STOP_COPY)
        async with scenario(stack.fw_address) as fw:
            before = await fw.digest(src.vhca_id)
            stack.driver.kill()
            stack.driver.communicate()
            await asyncio.sleep(0.3)  # a workload at 8 MiB/s would have changed it
            vf = await fw.get_vf(src.vhca_id)
            assert vf.initiator_suspended and vf.responder_suspended
            assert await fw.digest(src.vhca_id) == before
            # From here on only the check of the reset: no workload while it runs.
            await fw.configure_vf(src.vhca_id, dirty_bytes_per_s=0)

            stack.driver, stack.target = start(
                [*DRIVER, *LOCAL, "--firmware", stack.fw_address, "--cmd-timeout", "10"]
            )
            async with await VfioClient.connect(stack.target) as again:
                fd = await again.open_device(src.name)
                assert await again.get_state(fd) == MigState.RUNNING
                vf = await fw.get_vf(src.vhca_id)
                assert not (vf.initiator_suspended or vf.responder_suspended)
                assert await fw.digest(src.vhca_id) == before
                await again.close(fd)
