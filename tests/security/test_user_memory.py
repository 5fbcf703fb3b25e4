"""User memory no one else can reach (issue 12, item 5), on the driver:

* a symbolic link placed in the driver's shm directory is never followed
  (MapUserMemory: ELOOP), so ReadInto cannot write the file it points to,
  outside the directory; with mutual TLS and without (loopback, anonymous);
* a hard link, a FIFO, a directory are refused (EACCES), and a name that is
  not one path component is EINVAL;
* segment names are unguessable, and even knowing the name of the victim's
  live segment another principal cannot map it (EACCES), while the victim
  migrates through it to equal digests.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from driver.service.usermap import MMAP_BASE
from fwemu.hostmem import create_segment
from tests.security.rig import (
    ATTACKER,
    VICTIM,
    Parties,
    S,
    Victim,
    map_user_memory,
    read_into,
    refused,
)
from vfioclient.usermem import SharedSegment

pytestmark = pytest.mark.grpc

SEG = 1 << 20
SECRET = b"root-only: the lab's signing key, never to be read or written by a client\n"


@pytest.fixture(name="outside")
def outside_fixture(tmp_path: Path) -> Path:
    """A file outside the shm directory only its owner may read or write."""
    path = tmp_path / "outside" / "secret"
    path.parent.mkdir()
    path.write_bytes(SECRET + b"\0" * (SEG - len(SECRET)))
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def placed(path: Path) -> Iterator[Path]:
    """A name the attacker placed in the shm directory, removed afterwards."""
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()


def _unchanged(path: Path, before: os.stat_result) -> bool:
    after = path.stat()
    return path.read_bytes()[: len(SECRET)] == SECRET and (
        after.st_size,
        after.st_mtime_ns,
        stat.S_IMODE(after.st_mode),
    ) == (before.st_size, before.st_mtime_ns, 0o600)


async def test_a_symlink_in_the_shm_directory_is_never_followed(
    either: Parties, outside: Path
) -> None:
    """The attacker links a name in the driver's shm directory to a file
    outside it (and to a segment inside it): MapUserMemory is ELOOP, and
    ReadInto, with no mapping to write through, is EFAULT at any address,
    the mapping's included: the file outside keeps every byte.  The victim
    migrates meanwhile.  With mutual TLS and without."""
    p = either
    shm = p.stack.shm_dir
    victim, attacker = await p.vfio(VICTIM), await p.vfio(ATTACKER)
    v = await Victim.start(p, victim)
    before = outside.stat()
    (own,) = await p.vfs(1)
    fd = await attacker.open_device(own.name)
    await attacker.set_state(fd, S.STOP)
    saving = await attacker.set_state(fd, S.STOP_COPY)
    inside = create_segment(SEG, str(shm), prefix="attacker")
    try:
        with placed(shm / "lab-key") as out, placed(shm / "alias") as alias:
            out.symlink_to(outside)
            alias.symlink_to(shm / inside.name)
            for name in (out.name, alias.name):
                await refused(map_user_memory(attacker, name, SEG), "ELOOP")
            for addr in (MMAP_BASE, MMAP_BASE + SEG, 0):
                await refused(read_into(attacker, saving, addr, SEG), "EFAULT")
            assert _unchanged(outside, before)
            for bad in ("../outside/secret", "a/b", "..", "x\0y", str(outside)):
                await refused(map_user_memory(attacker, bad, SEG), "EINVAL")
    finally:
        inside.close()
        os.unlink(shm / inside.name)
    assert _unchanged(outside, before)
    await v.drain()
    await v.finish()


async def test_hard_links_fifos_and_directories_are_refused(mtls: Parties, outside: Path) -> None:
    """A second name for a file (outside the directory, or the victim's
    segment), a FIFO (which must not block the driver) and a directory are
    not the client's own segment: EACCES; the victim, mapping its segment
    before, migrates through it to equal digests."""
    shm = mtls.stack.shm_dir
    before = outside.stat()
    victim, attacker = await mtls.vfio(VICTIM), await mtls.vfio(ATTACKER)
    seg = SharedSegment.create(SEG, str(shm))
    try:
        addr = await map_user_memory(victim, seg.segment.name, SEG)
        with (
            placed(shm / "outside-link") as far,
            placed(shm / "victim-link") as near,
            placed(shm / "fifo") as fifo,
            placed(shm / "dir") as directory,
        ):
            os.link(outside, far)
            os.link(shm / seg.segment.name, near)
            os.mkfifo(fifo, 0o600)
            directory.mkdir()
            for name in (far.name, near.name, seg.segment.name, fifo.name, directory.name):
                await refused(map_user_memory(attacker, name, SEG), "EACCES")
        v = await Victim.start(mtls, victim, memory=(addr, SEG))
        await v.finish()
    finally:
        await seg.close()
    assert _unchanged(outside, before)


async def test_the_victims_live_segment_cannot_be_taken(mtls: Parties) -> None:
    """Segment names carry 128 random bits (not `vfioclient-<pid>-<n>`), and
    knowing one does not help: while the victim migrates through its
    segment the attacker's MapUserMemory of it is EACCES, at every step;
    another process of the victim's own principal may map it."""
    shm = mtls.stack.shm_dir
    segs = [SharedSegment.create(SEG, str(shm)) for _ in range(2)]
    try:
        names = [s.segment.name for s in segs]
        pattern = re.compile(rf"vfioclient-{os.getpid()}-([0-9a-f]{{32}})")
        randoms = [m.group(1) for m in map(pattern.fullmatch, names) if m is not None]
        assert len(randoms) == 2 and randoms[0] != randoms[1], names
        seg = segs[0]
        victim, attacker = await mtls.vfio(VICTIM), await mtls.vfio(ATTACKER)
        addr = await map_user_memory(victim, seg.segment.name, SEG)
        await refused(map_user_memory(attacker, seg.segment.name, SEG), "EACCES")
        v = await Victim.start(mtls, victim, memory=(addr, SEG))
        await refused(map_user_memory(attacker, seg.segment.name, 4096), "EACCES")
        await v.stop_copy()
        await refused(map_user_memory(attacker, seg.segment.name, SEG), "EACCES")
        sibling = await mtls.vfio(VICTIM)  # another process of the victim's principal
        assert await map_user_memory(sibling, seg.segment.name, SEG)
        await v.complete()
    finally:
        for s in segs:
            await s.close()
