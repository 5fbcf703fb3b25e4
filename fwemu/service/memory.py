"""Host memory behind mkeys, server side: shared memory segments the driver
created on this host, mapped by name; or buffers the firmware holds for a driver
on another host, filled and drained with WriteMkey / ReadMkey.

Each mkey belongs to the principal that created it (README, "Host memory"): to
any other principal it answers as an mkey that does not exist.  Within the
principal, the client that created it holds it: a client holds at most
`max_mkeys_per_client`, and its mkeys go when its last completion stream ends,
or, for a client that never opened one, once it sent no RPC for `idle_s`
seconds (reaped when any client next creates an mkey).

A segment is mapped only after hostmem's checks (no symbolic link, a regular
file with one link, and, where the peers' uids are known, one of theirs), and
while one principal's mkey maps it no other principal's may.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import NamedTuple

from ..hostmem import HostMemoryError, Segment, SegmentRefused, open_segment
from ..link.ifc import MAX_U32, CmdResult, CmdStatus, MkeyResult, Syndrome
from ..model.firmware import Firmware

MAX_MKEYS_PER_CLIENT = 4096
DEFAULT_MAX_REMOTE_BYTES = 8 << 30  # held for drivers on other hosts (fwemu serve's default)
MAX_REMOTE_MEMORY = 1 << 40  # fwemu serve --max-remote-memory: past it, a typo
DEFAULT_IDLE_S = 300.0


class Owner(NamedTuple):
    """Who holds an mkey: a client (its x-fwemu-client, else its address)
    within an authenticated principal."""

    principal: str
    client: str


@dataclass
class _Backing:
    owner: Owner
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
        segment_uids: Collection[int] | None = None,
    ) -> None:
        """`segment_uids`: the uids a segment may belong to, when the peers'
        are known (a unix socket's); None: not known (TCP), not checked."""
        self.fw = fw
        self.shm_dir = shm_dir
        self.max_remote_bytes = max_remote_bytes
        self.max_mkeys_per_client = max_mkeys_per_client
        self.idle_s = idle_s
        self.segment_uids = segment_uids
        self._clock = clock
        self.remote_bytes = 0
        self._backing: dict[int, _Backing] = {}
        self._owned: dict[Owner, set[int]] = {}  # owner -> its mkeys
        self._last_seen: dict[Owner, float] = {}  # owners holding mkeys -> their last RPC
        self._streams: collections.Counter[Owner] = collections.Counter()
        # Mapped segments, by (st_dev, st_ino): the principal whose mkeys map
        # them, and how many do.
        self._segments: dict[tuple[int, int], tuple[str, int]] = {}

    def seen(self, owner: Owner) -> None:
        """The client sent an RPC: its mkeys are not idle.  O(1)."""
        if owner in self._owned:
            self._last_seen[owner] = self._clock()

    def owned(self, owner: Owner) -> int:
        return len(self._owned.get(owner, ()))

    def create(
        self, owner: Owner, length: int, *, shm_name: str | None, remote: bool
    ) -> MkeyResult:
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
            mapped = self._map(owner.principal, shm_name, length)
            if isinstance(mapped, MkeyResult):
                return mapped
            segment = mapped
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
            r = self.fw.create_held_mkey(length, owner.client, owner.principal)
        else:
            r = self.fw.create_mkey(segment.view, owner.client, owner.principal)
        if not r.ok:
            if segment is not None:
                segment.close()
            return r
        if segment is None:
            self.remote_bytes += length
        elif segment.ident is not None:
            _, count = self._segments.get(segment.ident, (owner.principal, 0))
            self._segments[segment.ident] = (owner.principal, count + 1)
        self._backing[r.mkey] = _Backing(owner, length, segment)
        self._owned.setdefault(owner, set()).add(r.mkey)
        self._last_seen[owner] = self._clock()
        return r

    def _map(self, principal: str, shm_name: str, length: int) -> Segment | MkeyResult:
        """The segment mapped for `principal`, or CreateMkey's refusal."""
        try:
            segment = open_segment(shm_name, length, self.shm_dir, owners=self.segment_uids)
        except SegmentRefused as e:
            return MkeyResult(
                status=CmdStatus.BAD_PARAM_ERR,
                syndrome=Syndrome.SEGMENT_REFUSED,
                diagnostic=f"will not map shared memory: {e.strerror or e}",
            )
        except HostMemoryError as e:
            return MkeyResult(
                status=CmdStatus.BAD_PARAM_ERR,
                syndrome=Syndrome.UNKNOWN_MKEY,
                diagnostic=f"cannot map shared memory: {e}",
            )
        holder = self._segments.get(segment.ident) if segment.ident is not None else None
        if holder is not None and holder[0] != principal:
            segment.close()
            return MkeyResult(
                status=CmdStatus.BAD_RES_ERR,
                syndrome=Syndrome.SEGMENT_BUSY,
                diagnostic=f"shared memory {shm_name} is mapped for another principal's mkey",
            )
        return segment

    def destroy(self, mkey: int, principal: str) -> CmdResult:
        """DESTROY_MKEY of `principal`'s mkey (another's does not exist for it)."""
        r = self.fw.destroy_mkey(mkey, principal)
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
        if b.segment is None:
            self.remote_bytes -= b.length
            return
        ident = b.segment.ident
        if ident is not None and ident in self._segments:
            principal, count = self._segments[ident]
            if count > 1:
                self._segments[ident] = (principal, count - 1)
            else:
                del self._segments[ident]
        b.segment.close()

    def range(self, mkey: int, offset: int, length: int, principal: str) -> memoryview | CmdResult:
        """Bytes of `principal`'s mkey for ReadMkey / WriteMkey, or the failure."""
        return self.fw.mkey_range(mkey, offset, length, principal)

    # A client's mkeys live as long as it keeps a completion stream open.
    def attach(self, owner: Owner) -> None:
        self._streams[owner] += 1

    def detach(self, owner: Owner) -> None:
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

    def _destroy_owned(self, owner: Owner) -> None:
        for mkey in list(self._owned.get(owner, ())):
            self.fw.destroy_mkey(mkey, owner.principal)
            self._release(mkey)

    def close(self) -> None:
        for mkey, b in list(self._backing.items()):
            self.fw.destroy_mkey(mkey, b.owner.principal)
            self._release(mkey)
