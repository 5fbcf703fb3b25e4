"""A client's shared memory segments (vfioclient.usermem.SharedSegment) cannot
be taken over: names no one can guess, made only as new files (O_EXCL, never
through a symbolic link someone planted), readable by their owner alone."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import pytest

import fwemu.hostmem
from vfioclient.usermem import SharedSegment, Slots

NAME = re.compile(r"vfioclient-(\d+)-([0-9a-f]{32,})")


def test_segment_names_carry_128_random_bits(tmp_path: Path) -> None:
    segments = [SharedSegment.create(4096, str(tmp_path)) for _ in range(8)]
    try:
        names = [s.segment.name for s in segments]
        randoms = set()
        for name in names:
            m = NAME.fullmatch(name)
            assert m is not None, name
            assert int(m.group(1)) == os.getpid()
            randoms.add(m.group(2))
        assert len(randoms) == len(names)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    finally:
        for s in segments:
            s.segment.close()


def test_a_segment_is_its_owners_alone_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        seg = SharedSegment.create(4096, str(tmp_path))
    finally:
        os.umask(old)
    try:
        st = (tmp_path / seg.segment.name).lstat()
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid() and st.st_size == 4096
        assert st.st_blocks * 512 >= 4096  # allocated up front (posix_fallocate)
    finally:
        seg.segment.close()


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_a_name_someone_took_first_is_never_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    """Were the name guessed, a planted symlink (to a file of the victim's)
    or file would make creation fail, not be followed or reused."""
    monkeypatch.setattr(fwemu.hostmem.secrets, "token_hex", lambda n=None: "0" * 32)
    name = f"vfioclient-{os.getpid()}-{'0' * 32}"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    if planted == "symlink":
        (tmp_path / name).symlink_to(victim)
    else:
        (tmp_path / name).write_bytes(b"attacker's")
    with pytest.raises(OSError) as e:
        SharedSegment.create(4096, str(tmp_path))
    assert e.value.errno == errno.EEXIST
    assert victim.read_bytes() == b"precious"
    if planted == "file":
        assert (tmp_path / name).read_bytes() == b"attacker's"


async def test_slots_hand_out_the_buffer_given_back_last(tmp_path: Path) -> None:
    """A loop of one read at a time keeps to one buffer: the pages a driver
    touches (and faults in) are those of the buffers in flight, not all."""
    seg = SharedSegment.create(4 * 4096, str(tmp_path))
    try:
        slots = Slots(seg, 4096, 4)
        used = []
        for _ in range(6):
            slot = await slots.acquire()
            used.append(slot.offset)
            slot.release()
        assert used == [0] * 6
        a, b = await slots.acquire(), await slots.acquire()
        assert (a.offset, b.offset) == (0, 4096)
        a.release()
        c = slots.try_acquire()
        assert c is not None and c.offset == 0  # a's, given back last
        b.release()
        c.release()
        assert {(await slots.acquire()).offset for _ in range(4)} == {0, 4096, 8192, 12288}
        assert slots.try_acquire() is None
    finally:
        await seg.close()
