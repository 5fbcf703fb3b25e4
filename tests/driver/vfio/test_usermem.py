"""UserMemory / UserArg: copy_from_user and copy_to_user over the caller's buffers."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driver.vfio.usermem import UserArg, UserMemory
from tests.support.vfio_fakes import raises_errno


@settings(max_examples=300, deadline=None)
@given(addr=st.integers(0x0F00, 0x1300), n=st.integers(0, 0x300))
def test_a_copy_must_lie_inside_one_buffer(addr, n):
    """[addr, addr + n) must be inside a single provided buffer, else -EFAULT; two adjacent
    buffers are still two mappings (a copy across the seam faults).  n == 0 never faults."""
    a, b = bytearray(range(256)) * 2, bytearray(0x100)
    mem = UserMemory({0x1000: a, 0x1200: b})
    inside = n == 0 or any(
        base <= addr and addr + n <= base + len(buf) for base, buf in ((0x1000, a), (0x1200, b))
    )
    if inside:
        data = mem.copy_from_user(addr, n)
        assert len(data) == n
        mem.copy_to_user(addr, b"\xee" * n)
        assert mem.copy_from_user(addr, n) == b"\xee" * n
    else:
        with raises_errno(errno.EFAULT):
            mem.copy_from_user(addr, n)
        with raises_errno(errno.EFAULT):
            mem.copy_to_user(addr, b"\xee" * n)
        assert a == bytearray(range(256)) * 2 and b == bytes(0x100)


def test_writes_land_in_the_callers_buffers():
    """The buffers are the caller's objects, changed in place and returned by .buffers."""
    buf = bytearray(8)
    mem = UserMemory({0x40: buf})
    mem.copy_to_user(0x42, b"\x01\x02")
    assert buf == b"\x00\x00\x01\x02" + bytes(4)
    assert mem.buffers[0x40] is buf


@pytest.mark.parametrize(
    "buffers",
    [{0x10: bytearray(16), 0x18: bytearray(4)}, {-1: bytearray(1)}, {2**64 - 1: bytearray(2)}],
)
def test_bad_address_spaces_are_refused(buffers):
    """Overlapping buffers or buffers outside [0, 2^64) are a caller bug (ValueError)."""
    with pytest.raises(ValueError):
        UserMemory(buffers)


def test_user_arg_faults_past_its_end_and_changes_a_bytearray_in_place():
    """UserArg: copies beyond the bytes the caller sent -> -EFAULT; a bytearray is written in
    place, bytes are copied."""
    raw = bytearray(b"abcdef")
    arg = UserArg(raw)
    assert arg.copy_from(2, 4) == b"cdef"
    with raises_errno(errno.EFAULT):
        arg.copy_from(3, 4)
    with raises_errno(errno.EFAULT):
        arg.copy_to(5, b"xy")
    arg.copy_to(4, b"XY")
    assert raw == b"abcdXY" and arg.data == b"abcdXY"
    frozen = b"abc"
    copy = UserArg(frozen)
    copy.copy_to(0, b"z")
    assert copy.data == b"zbc" and frozen == b"abc"
