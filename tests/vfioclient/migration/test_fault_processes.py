"""The fault matrix's process cases: a process dies in the middle of a
migration (fwemu mid-SAVE, a client mid-stream, the driver mid-stop-copy).

Each ends, well inside its timeout, in a failure carrying an errno (never a
hang); once the dead process is replaced, a migration of the same devices
completes with equal digests; and nothing is left over: no data stream or
device open in the driver (its metrics), no user memory of ours in
/dev/shm, no shared memory segment of a driver still mapped by the
firmware or the driver (/proc/PID/maps: the mkeys' host memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest

from driver.shards import pci_name
from driver.vfio.uapi import MigState
from fwemu.link.grpc import GrpcLink
from fwemu.link.ifc import MiB, VfConfig
from grpcsvc.spawn import DRIVER, FWEMU, metrics_url, start, stop
from tests.driver.service.test_firmware_restart import Status, free_port, vfio_health
from tests.support import tls_mode
from tests.support.leftovers import shm_segments
from tests.support.vfioclient_migration import options
from vfioclient import VfioClient, VfioClientError
from vfioclient.migration import DeviceMigration, DevicePair, MigrationError, migrate

pytestmark = pytest.mark.grpc

QUIET = ("--log-level", "error", "--loop", "asyncio")
CMD_TIMEOUT = 2.0
BOUND = 10.0  # a failure after longer than this is a hang
WORKLOAD = {"size": 2 * MiB, "dirty_bytes_per_s": 4 * MiB}


@dataclass
class Driver:
    proc: subprocess.Popen[str]
    target: str
    metrics_url: str

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            text = r.read().decode()
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        assert m is not None, f"no {name} in the driver's metrics"
        return float(m.group(1))

    async def serving(self) -> bool:
        """The driver's Vfio service is SERVING: it reaches the firmware and
        is subscribed to its completions again (ListDevices answering is not
        enough: buffers need the completion stream)."""
        return bool(await vfio_health(self.target) == Status.SERVING)


def start_driver(firmware: str) -> Driver:
    argv = [*DRIVER, "--listen", "127.0.0.1:0", "--firmware", firmware]
    argv += ["--cmd-timeout", str(CMD_TIMEOUT), "--metrics-listen", "127.0.0.1:0", *QUIET]
    argv += [*tls_mode.server_args(), *tls_mode.firmware_link_args()]
    proc, target = start(argv, "vfio-driver")
    tls_mode.serving(target)
    return Driver(proc, target, metrics_url(proc, "vfio-driver"))


def start_fwemu(address: str) -> subprocess.Popen[str]:
    argv = [*FWEMU, "--listen", address, "--vfs", "0", *QUIET, *tls_mode.server_args()]
    proc, at = start(argv, "fwemu")
    assert at == tls_mode.serving(address)
    return proc


def segments_mapped(pid: int, owner: int | None = None) -> int:
    """Firmware host-memory segments (a driver's, `owner`'s if given) mapped by `pid`."""
    prefix = "/fwemu-" if owner is None else f"/fwemu-{owner}-"
    with open(f"/proc/{pid}/maps") as f:
        return sum(prefix in line for line in f)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.05)
    return False


async def eventually_async(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


@dataclass
class Stack:
    fw_address: str
    fwemu: subprocess.Popen[str]
    driver: Driver

    def restart_fwemu(self) -> None:
        self.fwemu.kill()
        self.fwemu.communicate()
        self.fwemu = start_fwemu(self.fw_address)

    def no_leftovers(self) -> None:
        """Nothing open in the driver, no firmware memory of it mapped anywhere."""
        assert self.driver.metric("vfio_open_data_streams") == 0
        assert self.driver.metric("vfio_open_devices") == 0
        assert segments_mapped(self.driver.proc.pid) == 0
        assert segments_mapped(self.fwemu.pid) == 0
        assert shm_segments() == set()


@pytest.fixture(name="stack")
def stack_fixture() -> Iterator[Stack]:
    address = f"127.0.0.1:{free_port()}"
    fwemu = start_fwemu(address)
    try:
        s = Stack(address, fwemu, start_driver(address))
    except BaseException:
        stop(fwemu, 10)  # a driver that did not start leaves no firmware behind
        raise
    yield s
    for p in (s.driver.proc, s.fwemu):
        with contextlib.suppress(subprocess.TimeoutExpired):
            stop(p, 10)
    tls_mode.stopped(s.driver.target)
    tls_mode.stopped(address)


@contextlib.asynccontextmanager
async def scenario(address: str) -> AsyncIterator[GrpcLink]:
    link = GrpcLink(address, tls=tls_mode.client_tls(address))
    try:
        yield link
    finally:
        await link.close()


async def make_vfs(address: str, **config: object) -> tuple[tuple[str, int], tuple[str, int]]:
    """A source and a destination VF: (pci name, vhca id) each."""
    async with scenario(address) as fw:
        a, b = await fw.create_vfs(2, VfConfig(**{**WORKLOAD, **config}))  # type: ignore[arg-type]
    return (pci_name(a.function_id), a.vhca_id), (pci_name(b.function_id), b.vhca_id)


async def verified_migration(stack: Stack, src: tuple[str, int], dst: tuple[str, int]) -> None:
    """A migration of src to dst through the stack's driver: completes, verified."""
    async with (
        scenario(stack.fw_address) as fw,
        await VfioClient.connect(stack.driver.target) as c,
    ):
        await c.list_devices()  # the registry probes VFs made since
        sfd, dfd = await c.open_device(src[0]), await c.open_device(dst[0])

        async def digests(_d: DeviceMigration) -> tuple[str, str]:
            return await fw.digest(src[1]), await fw.digest(dst[1])

        r = await asyncio.wait_for(
            migrate([DevicePair(c, sfd, c, dfd)], options(digests=digests)), BOUND
        )
        assert r.verified and r.status == "completed"
        await c.close(sfd)
        await c.close(dfd)


async def test_fwemu_killed_mid_save_fails_the_migration_and_a_restart_lets_it_retry(
    stack: Stack,
) -> None:
    """The source's first SAVE takes 30 s: fwemu dies while it is in flight.
    The read waiting for it fails at once (an errno); after a restart (a new
    firmware, new VFs) the driver migrates again."""
    src, dst = await make_vfs(stack.fw_address, save_latency_s=30.0)
    async with await VfioClient.connect(stack.driver.target) as c:
        await c.list_devices()
        sfd, dfd = await c.open_device(src[0]), await c.open_device(dst[0])

        async def on_iteration(it: int) -> None:
            if it == 1:  # PRE_COPY: the initial SAVE is in flight
                await asyncio.sleep(0.2)
                stack.fwemu.kill()

        t = time.monotonic()
        with pytest.raises(MigrationError) as e:
            await asyncio.wait_for(
                migrate([DevicePair(c, sfd, c, dfd)], options(on_iteration=on_iteration)), BOUND
            )
        assert time.monotonic() - t < CMD_TIMEOUT + 1, "failed only after the command timeout"
        assert re.search(r"\b(EIO|ENODEV)\b", str(e.value)), e.value
        assert stack.driver.metric("vfio_open_data_streams") == 0
        await c.close(sfd)
        await c.close(dfd)
    stack.restart_fwemu()
    src, dst = await make_vfs(stack.fw_address)
    assert await eventually_async(stack.driver.serving, BOUND), "the driver did not reconnect"
    await verified_migration(stack, src, dst)
    stack.no_leftovers()


CLIENT = """
import asyncio, sys
from vfioclient import VfioClient, VfioClientError
from vfioclient.migration import DevicePair, MigrationOptions, migrate

async def main(target, src, dst):
    c = await VfioClient.connect(target)
    sfd, dfd = await c.open_device(src), await c.open_device(dst)

    async def on_iteration(it):
        if it == 3:
            print("streaming", flush=True)

    # Never converges (threshold of 1 byte): precopy streams until killed.
    o = MigrationOptions(bandwidth_estimate=10, downtime_limit_s=0.1,
                         max_precopy_iterations=10**6, on_iteration=on_iteration)
    await migrate([DevicePair(c, sfd, c, dfd)], o)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_client_killed_mid_stream_leaves_nothing_open_and_the_devices_migrate(
    stack: Stack,
) -> None:
    """A client process migrating (precopy streaming, user memory mapped by
    the driver) is SIGKILLed: its session ends, the driver closes its fds
    and unmaps its memory, and another client migrates the same devices."""
    src, dst = await make_vfs(stack.fw_address)
    child = subprocess.Popen(
        [sys.executable, "-c", CLIENT, stack.driver.target, src[0], dst[0]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), BOUND)
        assert line == "streaming\n", child.stderr.read() if child.stderr else ""
        assert stack.driver.metric("vfio_open_data_streams") == 2
        assert segments_mapped(stack.driver.proc.pid) > 0  # its data buffers
    finally:
        child.kill()
        child.communicate()
    assert shm_segments(child.pid) == set()  # sealed once mapped: nothing to clean

    def closed() -> bool:
        return stack.driver.metric("vfio_open_devices") == 0

    assert await eventually(closed), "the dead client's devices are still open"
    with open(f"/proc/{stack.driver.proc.pid}/maps") as f:
        assert f"vfioclient-{child.pid}-" not in f.read()
    await verified_migration(stack, src, dst)
    stack.no_leftovers()


async def test_the_driver_killed_mid_stop_copy_fails_the_migration_and_a_new_driver_migrates(
    stack: Stack,
) -> None:
    """At the switchover decision the source's SAVEs are made to take 0.5 s;
    the driver dies 0.1 s into the stop-copy.  The migration fails with
    ENOTCONN (the driver is unreachable) at once; the firmware drops the dead
    driver's mkeys; a new driver migrates the same devices."""
    src, dst = await make_vfs(stack.fw_address)
    old = stack.driver
    async with (
        scenario(stack.fw_address) as fw,
        await VfioClient.connect(old.target) as c,
    ):
        await c.list_devices()
        sfd, dfd = await c.open_device(src[0]), await c.open_device(dst[0])
        stop_copy: list[float] = []

        async def decided() -> None:
            await fw.configure_vf(src[1], save_latency_s=0.5)
            loop = asyncio.get_running_loop()
            stop_copy.append(loop.time())
            loop.call_later(0.1, old.proc.kill)

        t = time.monotonic()
        with pytest.raises(MigrationError) as e:
            await asyncio.wait_for(
                migrate([DevicePair(c, sfd, c, dfd)], options(on_switchover_decision=decided)),
                BOUND,
            )
        assert stop_copy, "no switchover"
        assert time.monotonic() - t < CMD_TIMEOUT + 1
        cause = e.value.__cause__
        assert isinstance(cause, VfioClientError) and cause.errno == errno.ENOTCONN, e.value
        r = e.value.report
        assert r is not None and r.status == "failed"
        old.proc.communicate()

        def ours_gone() -> bool:
            return segments_mapped(stack.fwemu.pid, old.proc.pid) == 0

        assert await eventually(ours_gone), "fwemu still maps the dead driver's memory"
        await fw.configure_vf(src[1], save_latency_s=0.0)
    stack.driver = start_driver(stack.fw_address)
    await verified_migration(stack, src, dst)
    stack.no_leftovers()
    async with await VfioClient.connect(stack.driver.target) as c:
        fd = await c.open_device(src[0])
        assert await c.get_state(fd) == MigState.RUNNING
        await c.close(fd)
