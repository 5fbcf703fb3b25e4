"""MapUserMemory maps the client's own segment, nothing else (issue 12,
item 5): a symbolic link placed in the shm directory is never followed
(ELOOP, and the file it points to is untouched), a hard link, a FIFO or a
directory is refused (EACCES), and where the caller's uid is known (a
unix:PATH listener) so is a file of another user; over TCP it is not known.
A segment one principal maps cannot be mapped by another while it is
(EACCES), and the victim's migration through it completes.  The symlink
cases run without TLS too."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from driver.api.v1 import vfio_pb2 as pb
from driver.registry import DeviceRegistry
from driver.service.server import DriverServer
from driver.service.usermap import MappedSegments, UserMappings
from fwemu.hostmem import Segment, default_shm_dir
from fwemu.link.inproc import InProcessLink
from fwemu.model.clock import LoopClock
from fwemu.model.firmware import Firmware
from tests.driver.service.tenancy import WORKLOAD, A, B, S, Tenancy, start_migration
from tests.driver.service.test_user_memory import map_, read_into, write_from
from tests.support.driver_service import (
    DriverUnderTest,
    VfioClient,
    errno_of,
    shm_segment,
)
from tests.support.vfio_fakes import raises_errno

pytestmark = pytest.mark.grpc

SEG = 1 << 20
SECRET = b"root-only secret: never to be read or written through a segment\n"


class ShmNames:
    """Paths in the driver's shm directory, removed afterwards."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    def __call__(self, name: str) -> Path:
        path = Path(default_shm_dir()) / f"test-hardening-{os.getpid()}-{name}"
        self.made.append(path)
        return path

    def remove(self) -> None:
        for path in self.made:
            with contextlib.suppress(FileNotFoundError):
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()


@pytest.fixture(name="shm")
def shm_fixture() -> Iterator[ShmNames]:
    names = ShmNames()
    yield names
    names.remove()


@pytest.fixture(name="outside")
def outside_fixture(tmp_path: Path) -> Path:
    """A file outside the shm directory only its owner may read."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\0" * (SEG - len(SECRET)))
    secret.chmod(0o600)
    return secret


async def _symlink_refused(client: VfioClient, shm: ShmNames, outside: Path) -> None:
    link = shm("symlink")
    link.symlink_to(outside)
    assert await errno_of(map_(client, link.name, SEG)) == errno.ELOOP
    assert outside.read_bytes().startswith(SECRET) and len(outside.read_bytes()) == SEG


async def test_a_symlink_is_never_followed_without_tls(
    inproc: DriverUnderTest, shm: ShmNames, outside: Path
) -> None:
    async with await VfioClient.connect(inproc.target) as c:
        await _symlink_refused(c, shm, outside)


async def test_a_symlink_is_never_followed_under_mtls(
    tenancy: Tenancy, shm: ShmNames, outside: Path
) -> None:
    await _symlink_refused(await tenancy.client(A), shm, outside)


async def test_hard_links_fifos_and_directories_are_refused(
    inproc: DriverUnderTest, shm: ShmNames
) -> None:
    async with await VfioClient.connect(inproc.target) as c:
        with shm_segment(SEG, "test-hardening") as seg:
            other = shm("hardlink")
            os.link(Path(default_shm_dir()) / seg.name, other)
            assert await errno_of(map_(c, other.name, SEG)) == errno.EACCES
            assert await errno_of(map_(c, seg.name, SEG)) == errno.EACCES  # both names
            other.unlink()
            assert await map_(c, seg.name, SEG)  # its own again
        fifo = shm("fifo")
        os.mkfifo(fifo, 0o600)
        assert await errno_of(map_(c, fifo.name, SEG)) == errno.EACCES
        directory = shm("dir")
        directory.mkdir()
        assert await errno_of(map_(c, directory.name, SEG)) == errno.EACCES
        for bad in ("../etc/passwd", "a/b", "..", "x\0y"):
            assert await errno_of(map_(c, bad, SEG)) == errno.EINVAL


@pytest.fixture(name="unix_target")
async def unix_target_fixture(tmp_path: Path) -> AsyncIterator[str]:
    """A driver listening on a unix socket (mode 0600) only."""
    link = InProcessLink(Firmware(LoopClock(), seed=3))
    server = DriverServer(DeviceRegistry(link))
    target = f"unix:{tmp_path / 'vfio.sock'}"
    await server.start(target)
    yield target
    await server.stop(0)
    await link.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another uid needs root")
async def test_a_file_of_another_user_is_refused_where_the_callers_uid_is_known(
    unix_target: str, inproc: DriverUnderTest
) -> None:
    with shm_segment(SEG, "test-hardening") as seg:
        path = Path(default_shm_dir()) / seg.name
        async with (
            await VfioClient.connect(unix_target) as local,
            await VfioClient.connect(inproc.target) as tcp,
        ):
            assert await map_(local, seg.name, SEG)  # ours (root's): mapped
            os.chown(path, 54321, 54321)
            assert await errno_of(map_(local, seg.name, SEG)) == errno.EACCES
            # Over TCP the caller's uid is unknown: the file's own checks stand alone.
            assert await map_(tcp, seg.name, SEG)


async def test_owner_check_where_the_uid_is_known(seg_path: tuple[Segment, Path]) -> None:
    seg, _ = seg_path
    mappings = UserMappings()
    with raises_errno(errno.EACCES):
        await mappings.map(seg.name, SEG, uids=frozenset({os.geteuid() + 1}))
    assert len(mappings.segments) == 0  # a refusal takes nothing
    await mappings.map(seg.name, SEG, uids=frozenset({os.geteuid()}))
    mappings.close()


@pytest.fixture(name="seg_path")
def seg_path_fixture() -> Iterator[tuple[Segment, Path]]:
    with shm_segment(SEG, "test-hardening") as seg:
        yield seg, Path(default_shm_dir()) / seg.name


async def test_one_principal_maps_a_file_at_a_time(seg_path: tuple[Segment, Path]) -> None:
    seg, _ = seg_path
    shared = MappedSegments()
    a1 = UserMappings(principal="a", segments=shared)
    a2 = UserMappings(principal="a", segments=shared)
    b = UserMappings(principal="b", segments=shared)
    addr = await a1.map(seg.name, SEG)
    await a2.map(seg.name, 4096)  # the same principal's other process
    with raises_errno(errno.EACCES):
        await b.map(seg.name, SEG)
    a1.unmap(addr)
    with raises_errno(errno.EACCES):
        await b.map(seg.name, SEG)  # a2 still maps it
    a2.close()
    assert len(shared) == 0
    await b.map(seg.name, SEG)
    b.close()


async def test_another_principals_live_segment_cannot_be_mapped(tenancy: Tenancy) -> None:
    """B maps A's segment by its name while A migrates through it: EACCES;
    A's migration through user memory completes with equal digests."""
    t = tenancy
    src, dst = await t.create_vfs(2, **WORKLOAD)
    a, b = await t.client(A), await t.client(B)
    with shm_segment(4 * SEG, "test-hardening") as seg:
        addr = await map_(a, seg.name, 4 * SEG)
        assert await errno_of(map_(b, seg.name, 4 * SEG)) == errno.EACCES
        m = await start_migration(a, src, dst)
        while n := await read_into(a, m.saving, addr, 4 * SEG):
            assert await errno_of(map_(b, seg.name, SEG)) == errno.EACCES
            assert await write_from(a, m.resuming, addr, n) == n
        await a.set_state(m.sfd, S.STOP)
        await a.set_state(m.dfd, S.STOP)
        assert await t.digest(dst) == await t.digest(src)
        await a._call(a.stub.UnmapUserMemory, pb.UnmapUserMemoryRequest(addr=addr))
        assert await map_(b, seg.name, SEG)  # A let go of it
