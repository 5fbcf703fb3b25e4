"""Firmware commands straight on the model (no link), for tests that need the
model's own seams (an allocator, a memory limit) or many commands a second."""

from __future__ import annotations

import mmap

from fwemu.link.ifc import CmdResult, SuspendOpMod
from fwemu.model import Firmware
from fwemu.model.image import IMAGE_HEADER_SIZE
from fwemu.model.memory import Allocator

_PAYLOAD_LEN_AT = 28  # the header's payload length (fwemu/model/image.py)


def suspend_fully(fw: Firmware, vhca: int) -> None:
    for op_mod in (SuspendOpMod.SUSPEND_INITIATOR, SuspendOpMod.SUSPEND_RESPONDER):
        res = fw.suspend_vhca(vhca, op_mod)
        assert res.ok, res


def save_image(fw: Firmware, vhca: int, *, incremental: bool = False) -> bytes:
    """A tracked SAVE (full, or incremental) of everything the query reports:
    the image bytes, as written into host memory when the SAVE is accepted."""
    q = fw.query_vhca_migration_state(vhca, incremental=incremental)
    assert q.ok and q.required_umem_size > 0, q
    buf = bytearray(q.required_umem_size)
    mkey = fw.create_mkey(memoryview(buf)).mkey
    accepted = fw.save_vhca_state(
        vhca, incremental=incremental, set_track=True, mkey=mkey, size=len(buf)
    )
    assert accepted.ok, accepted
    fw.advance_clock(0)  # the completion
    fw.destroy_mkey(mkey)
    n = int.from_bytes(buf[_PAYLOAD_LEN_AT : _PAYLOAD_LEN_AT + 8], "little")
    return bytes(buf[: IMAGE_HEADER_SIZE + n])


def load_bytes(fw: Firmware, vhca: int, data: bytes) -> CmdResult:
    """LOAD `data` (all of it) from a fresh host buffer."""
    buf = bytearray(data) or bytearray(1)
    mkey = fw.create_mkey(memoryview(buf)).mkey
    try:
        return fw.load_vhca_state(vhca, mkey=mkey, size=len(data))
    finally:
        fw.destroy_mkey(mkey)


class FailingAllocator(Allocator):
    """The system allocator, except that the next `fail` calls fail with `error`
    (MemoryError, or OSError ENOMEM as mmap/mremap raise it)."""

    def __init__(self) -> None:
        self.fail = 0
        self.error: BaseException = MemoryError()
        self.calls = 0
        self.after = 0

    def arm(self, error: BaseException, times: int = 1_000, *, after: int = 0) -> None:
        """Fail the `times` calls that follow the next `after` ones."""
        self.fail, self.error, self.after = times, error, after

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.after:
            self.after -= 1
        elif self.fail:
            self.fail -= 1
            raise self.error

    def map(self, size: int) -> mmap.mmap:
        self._maybe_fail()
        return super().map(size)

    def resize(self, mm: mmap.mmap, size: int) -> None:
        self._maybe_fail()
        super().resize(mm, size)
