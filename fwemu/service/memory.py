"""Host memory behind mkeys, server side: shared memory segments the driver
created on this host, mapped by name; or buffers the firmware holds for a driver
on another host, filled and drained with WriteMkey / ReadMkey."""

from __future__ import annotations

import collections
from dataclasses import dataclass

from ..hostmem import HostMemoryError, Segment, open_segment
from ..link.ifc import MAX_U32, CmdResult, CmdStatus, MkeyResult, Syndrome
from ..model.firmware import Firmware


@dataclass
class _Backing:
    owner: str
    length: int
    segment: Segment | None  # None: firmware-held (remote) memory


class MkeyMemory:
    def __init__(self, fw: Firmware, *, shm_dir: str | None, max_remote_bytes: int) -> None:
        self.fw = fw
        self.shm_dir = shm_dir
        self.max_remote_bytes = max_remote_bytes
        self.remote_bytes = 0
        self._backing: dict[int, _Backing] = {}
        self._streams: collections.Counter[str] = collections.Counter()

    def create(self, owner: str, length: int, *, shm_name: str | None, remote: bool) -> MkeyResult:
        if not 0 < length <= MAX_U32 + 1:
            return MkeyResult(
                status=CmdStatus.BAD_PARAM_ERR,
                syndrome=Syndrome.BAD_SIZE,
                diagnostic=f"mkey length {length} must be between 1 and 2^32",
            )
        segment = None
        if shm_name is not None:
            try:
                segment = open_segment(shm_name, length, self.shm_dir)
            except HostMemoryError as e:
                return MkeyResult(
                    status=CmdStatus.BAD_PARAM_ERR,
                    syndrome=Syndrome.UNKNOWN_MKEY,
                    diagnostic=f"cannot map shared memory: {e}",
                )
            view = segment.view
        elif remote:
            if self.remote_bytes + length > self.max_remote_bytes:
                return MkeyResult(
                    status=CmdStatus.LIM_ERR,
                    syndrome=Syndrome.NO_MEMORY,
                    diagnostic=f"firmware-held memory is limited to {self.max_remote_bytes} bytes",
                )
            try:
                view = memoryview(bytearray(length))
            except MemoryError:
                return MkeyResult(
                    status=CmdStatus.LIM_ERR, syndrome=Syndrome.NO_MEMORY, diagnostic="no memory"
                )
        else:
            return MkeyResult(
                status=CmdStatus.BAD_PARAM_ERR,
                syndrome=Syndrome.FIELD_RANGE,
                diagnostic="CreateMkey needs shm_name or remote",
            )
        r = self.fw.create_mkey(view, owner=owner)
        if not r.ok:
            if segment is not None:
                segment.close()
            return r
        if segment is None:
            self.remote_bytes += length
        self._backing[r.mkey] = _Backing(owner, length, segment)
        return r

    def destroy(self, mkey: int) -> CmdResult:
        r = self.fw.destroy_mkey(mkey)
        if r.ok:
            self._release(mkey)
        return r

    def _release(self, mkey: int) -> None:
        b = self._backing.pop(mkey, None)
        if b is None:
            return
        if b.segment is not None:
            b.segment.close()
        else:
            self.remote_bytes -= b.length

    def range(self, mkey: int, offset: int, length: int) -> memoryview | CmdResult:
        view = self.fw.mkey_view(mkey)
        if view is None:
            return CmdResult(
                status=CmdStatus.BAD_RES_ERR,
                syndrome=Syndrome.UNKNOWN_MKEY,
                diagnostic=f"no mkey {mkey:#x}",
            )
        if offset + length > len(view):
            return CmdResult(
                status=CmdStatus.BAD_PARAM_ERR,
                syndrome=Syndrome.MKEY_RANGE,
                diagnostic=f"{offset}+{length} exceeds mkey {mkey:#x} of {len(view)} bytes",
            )
        return view[offset : offset + length]

    # A client's mkeys live as long as it keeps a completion stream open.
    def attach(self, owner: str) -> None:
        self._streams[owner] += 1

    def detach(self, owner: str) -> None:
        self._streams[owner] -= 1
        if self._streams[owner] > 0:
            return
        del self._streams[owner]
        for mkey in [k for k, b in self._backing.items() if b.owner == owner]:
            self.fw.destroy_mkey(mkey)
            self._release(mkey)

    def close(self) -> None:
        for mkey in list(self._backing):
            self.fw.destroy_mkey(mkey)
            self._release(mkey)
