"""Host memory behind mkeys, server side: shared memory segments the driver
created on this host, mapped by name; or buffers the firmware holds for a driver
on another host, filled and drained with WriteMkey / ReadMkey.

Each mkey belongs to the client that created it (README, "Host memory"): a
client holds at most `max_mkeys_per_client`, and its mkeys go when its last
completion stream ends, or, for a client that never opened one, once it sent
no RPC for `idle_s` seconds (reaped when any client next creates an mkey).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..hostmem import HostMemoryError, Segment, open_segment
from ..link.ifc import MAX_U32, CmdResult, CmdStatus, MkeyResult, Syndrome
from ..model.firmware import Firmware

MAX_MKEYS_PER_CLIENT = 4096
DEFAULT_IDLE_S = 300.0


@dataclass
class _Backing:
    owner: str
    length: int
    segment: Segment | None  # None: firmware-held (remote) memory


class MkeyMemory:
    def __init__(
        self,
        fw: Firmware,
        *,
        shm_dir: str | None,
        max_remote_bytes: int,
        max_mkeys_per_client: int = MAX_MKEYS_PER_CLIENT,
        idle_s: float = DEFAULT_IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fw = fw
        self.shm_dir = shm_dir
        self.max_remote_bytes = max_remote_bytes
        self.max_mkeys_per_client = max_mkeys_per_client
        self.idle_s = idle_s
        self._clock = clock
        self.remote_bytes = 0
        self._backing: dict[int, _Backing] = {}
        self._owned: dict[str, set[int]] = {}  # owner -> its mkeys
        self._last_seen: dict[str, float] = {}  # owners holding mkeys -> their last RPC
        self._streams: collections.Counter[str] = collections.Counter()

    def seen(self, owner: str) -> None:
        """The client sent an RPC: its mkeys are not idle.  O(1)."""
        if owner in self._owned:
            self._last_seen[owner] = self._clock()

    def owned(self, owner: str) -> int:
        return len(self._owned.get(owner, ()))

    def create(self, owner: str, length: int, *, shm_name: str | None, remote: bool) -> MkeyResult:
        self.reap_idle()
        if not 0 < length <= MAX_U32 + 1:
            return MkeyResult(
                status=CmdStatus.BAD_PARAM_ERR,
                syndrome=Syndrome.BAD_SIZE,
                diagnostic=f"mkey length {length} must be between 1 and 2^32",
            )
        if self.owned(owner) >= self.max_mkeys_per_client:
            return MkeyResult(
                status=CmdStatus.LIM_ERR,
                syndrome=Syndrome.TOO_MANY_MKEYS,
                diagnostic=f"a client holds at most {self.max_mkeys_per_client} mkeys",
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
        elif remote:
            if self.remote_bytes + length > self.max_remote_bytes:
                return MkeyResult(
                    status=CmdStatus.LIM_ERR,
                    syndrome=Syndrome.NO_MEMORY,
                    diagnostic=f"firmware-held memory is limited to {self.max_remote_bytes} bytes",
                )
        else:
            return MkeyResult(
                status=CmdStatus.BAD_PARAM_ERR,
                syndrome=Syndrome.FIELD_RANGE,
                diagnostic="CreateMkey needs shm_name or remote",
            )
        if segment is None:
            # Memory the firmware holds counts against its --memory-limit.
            r = self.fw.create_held_mkey(length, owner)
        else:
            r = self.fw.create_mkey(segment.view, owner=owner)
        if not r.ok:
            if segment is not None:
                segment.close()
            return r
        if segment is None:
            self.remote_bytes += length
        self._backing[r.mkey] = _Backing(owner, length, segment)
        self._owned.setdefault(owner, set()).add(r.mkey)
        self._last_seen[owner] = self._clock()
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
        mine = self._owned.get(b.owner)
        if mine is not None:
            mine.discard(mkey)
            if not mine:
                del self._owned[b.owner]
                self._last_seen.pop(b.owner, None)
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
        self._destroy_owned(owner)

    def reap_idle(self) -> int:
        """Destroy the mkeys of clients with no completion stream and no RPC
        for idle_s seconds; how many clients were reaped."""
        cutoff = self._clock() - self.idle_s
        idle = [o for o, t in self._last_seen.items() if t < cutoff and not self._streams[o]]
        for owner in idle:
            self._destroy_owned(owner)
        return len(idle)

    def _destroy_owned(self, owner: str) -> None:
        for mkey in list(self._owned.get(owner, ())):
            self.fw.destroy_mkey(mkey)
            self._release(mkey)

    def close(self) -> None:
        for mkey in list(self._backing):
            self.fw.destroy_mkey(mkey)
            self._release(mkey)
