"""The caller's memory as the emulated kernel sees it: copy_from_user / copy_to_user.

An ioctl reaches the emulation with two kinds of caller memory:

* `UserArg`: the bytes at the ioctl's argument pointer (arg->data of
  VFIO_DEVICE_FEATURE, the struct of VFIO_MIG_GET_PRECOPY_INFO), as many as the
  caller sent; reading or writing past them is what a fault is in the kernel.
* `UserMemory`: the buffers that pointer fields inside those structs point to
  (DMA_LOGGING_START's range array, DMA_LOGGING_REPORT's bitmap), keyed by the
  address the caller gave them.

Both change the caller's bytearrays in place, so whoever called the ioctl sees
what the kernel wrote even when the ioctl then fails (as a real process would).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from itertools import pairwise

from .errors import VfioError

_ADDR_LIMIT = 1 << 64


class UserMemory:
    """The caller's address space: `address -> buffer` for every buffer it provided.

    A copy succeeds only if [addr, addr + n) lies inside one buffer; anything else
    is -EFAULT, as for an unmapped user address.  Buffers may not overlap (one
    address space has one byte at each address): ValueError.
    """

    def __init__(self, buffers: Mapping[int, bytearray] | None = None) -> None:
        self._buffers: dict[int, bytearray] = dict(buffers or {})
        spans = sorted((addr, addr + len(buf)) for addr, buf in self._buffers.items())
        for addr, end in spans:
            if addr < 0 or end > _ADDR_LIMIT:
                raise ValueError(f"buffer at {addr:#x} is outside the 64-bit address space")
        for (_, end), (nxt, _) in pairwise(spans):
            if nxt < end:
                raise ValueError(f"buffers overlap at {nxt:#x}")

    @property
    def buffers(self) -> dict[int, bytearray]:
        """The caller's buffers, changed in place by copy_to_user."""
        return self._buffers

    def _locate(self, addr: int, n: int) -> tuple[bytearray, int]:
        if n < 0:
            raise ValueError("negative length")
        for base, buf in self._buffers.items():
            if base <= addr and addr + n <= base + len(buf):
                return buf, addr - base
        raise VfioError(errno.EFAULT, f"user range [{addr:#x}, +{n}) is not mapped")

    def copy_from_user(self, addr: int, n: int) -> bytes:
        if n == 0:
            return b""
        buf, off = self._locate(addr, n)
        return bytes(buf[off : off + n])

    def copy_to_user(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        if len(data) == 0:
            return
        buf, off = self._locate(addr, len(data))
        buf[off : off + len(data)] = data


class UserArg:
    """The bytes at an ioctl's argument pointer, as many as the caller provided.

    A `bytearray` is used in place (the caller sees what the ioctl wrote, also on
    failure); `bytes` are copied first.
    """

    def __init__(self, data: bytes | bytearray) -> None:
        self._buf = data if isinstance(data, bytearray) else bytearray(data)

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def data(self) -> bytes:
        """What the caller's memory holds now (to send back)."""
        return bytes(self._buf)

    def copy_from(self, offset: int, n: int) -> bytes:
        """copy_from_user(kbuf, arg + offset, n)."""
        if offset < 0 or n < 0:
            raise ValueError("negative offset or length")
        if offset + n > len(self._buf):
            raise VfioError(
                errno.EFAULT, f"argument has {len(self._buf)} bytes, {offset + n} needed"
            )
        return bytes(self._buf[offset : offset + n])

    def copy_to(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """copy_to_user(arg + offset, kbuf, len(data))."""
        if offset < 0:
            raise ValueError("negative offset")
        if offset + len(data) > len(self._buf):
            raise VfioError(
                errno.EFAULT, f"argument has {len(self._buf)} bytes, {offset + len(data)} written"
            )
        self._buf[offset : offset + len(data)] = data
