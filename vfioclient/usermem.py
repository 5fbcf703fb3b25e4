"""User memory: the local data path.

QEMU reads a data fd with read(2) into its own buffer; the kernel copies, and
no byte crosses a network.  Here the "kernel" is a driver service, so a
client on the driver's host gives it a shared memory segment of its own
(`SharedSegment`, mapped by the driver with MapUserMemory) and reads and writes
through it (`VfioClient.read_into` / `write_from`): the migration data moves
by memcpy inside the driver, and only small control messages cross gRPC.  A
driver on another host cannot open the segment (ENOENT): `attach` says so and
the caller keeps to Read/ReadStream/Write.

`Slots` cuts a SharedSegment into equal buffers, the bound on the data in
flight between a source read and the destination write.  The buffer given back
last is the next handed out: a migration touches as few of its buffers' pages
as it keeps in flight (a precopy loop of one read at a time, one buffer), and
each page a driver touches first in its mapping of the segment is a page fault
in the driver (a quarter of the driver's faults at 64 migrations at once, when
every buffer went round in turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from dataclasses import dataclass

from fwemu.hostmem import Segment, create_segment, unlink_segment

from .client import VfioClient, VfioClientError

log = logging.getLogger(__name__)

# MigrationOptions.data_path: user memory where a driver can map it, else gRPC
# (auto); user memory or fail (shm); gRPC messages only (grpc).
DATA_PATHS = ("auto", "shm", "grpc")

# Answers of MapUserMemory meaning "this driver cannot use our memory" (it is
# on another host, cannot open the file, or predates the RPC: UNIMPLEMENTED
# arrives as EIO): use the gRPC data path.
UNAVAILABLE = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EIO})


class SharedSegment:
    """A segment of ours that drivers on this host map: `view` is its bytes,
    `addr(client)` where it lies in that client's session."""

    def __init__(self, segment: Segment, shm_dir: str | None) -> None:
        self.segment = segment
        self.shm_dir = shm_dir
        self.view = segment.view
        self._addrs: dict[int, tuple[VfioClient, int]] = {}
        self._linked = True

    @classmethod
    def create(cls, length: int, shm_dir: str | None = None) -> SharedSegment:
        """A new segment no one else can take over: an unguessable name
        (vfioclient-PID-<128 random bits>), created with O_CREAT|O_EXCL|
        O_NOFOLLOW and mode 0600 (fwemu.hostmem.create_segment), its pages
        allocated now.  Raises OSError (ENOSPC on a full /dev/shm) when it
        cannot be had."""
        return cls(create_segment(length, shm_dir, prefix="vfioclient", reserve=True), shm_dir)

    def __len__(self) -> int:
        return len(self.view)

    async def attach(self, client: VfioClient) -> int | None:
        """Map it in `client`'s driver session: its address there, or None
        when that driver cannot use it (another host).  Other errors raise."""
        key = id(client)
        if key in self._addrs:
            return self._addrs[key][1]
        if not self._linked:
            raise VfioClientError(errno.EINVAL, "the segment was sealed: no new mappings")
        try:
            addr = await client.map_user_memory(self.segment.name, len(self.view))
        except VfioClientError as e:
            if e.errno in UNAVAILABLE:
                log.info("user memory not available on %s: %s", client.target, e)
                return None
            raise
        self._addrs[key] = (client, addr)
        return addr

    def addr(self, client: VfioClient) -> int | None:
        entry = self._addrs.get(id(client))
        return None if entry is None else entry[1]

    def seal(self) -> None:
        """No more mappings: the file goes (the mappings stay), so nothing is
        left behind in /dev/shm if this process dies."""
        if self._linked:
            self._linked = False
            unlink_segment(self.segment.name, self.shm_dir)

    async def close(self) -> None:
        """Unmap from every driver (a session that ended unmapped already), then ours."""
        for client, addr in self._addrs.values():
            with contextlib.suppress(VfioClientError):
                await client.unmap_user_memory(addr)
        self._addrs.clear()
        self.seal()
        self.segment.close()


@dataclass(eq=False)
class Slot:
    """One buffer of a `Slots`: `length` bytes of data at `offset`."""

    slots: Slots
    index: int
    offset: int
    length: int = 0

    @property
    def view(self) -> memoryview:
        return self.slots.memory.view[self.offset : self.offset + self.length]

    def addr(self, client: VfioClient) -> int | None:
        base = self.slots.memory.addr(client)
        return None if base is None else base + self.offset

    def __len__(self) -> int:
        return self.length

    def release(self) -> None:
        self.slots.release(self)


class Slots:
    """`count` buffers of `size` bytes in one SharedSegment."""

    def __init__(self, memory: SharedSegment, size: int, count: int) -> None:
        if size <= 0 or count <= 0 or size * count > len(memory):
            raise ValueError(f"{count} slots of {size} bytes do not fit {len(memory)} bytes")
        self.memory, self.size, self.count = memory, size, count
        self._free: asyncio.Queue[int] = asyncio.LifoQueue()  # the warmest buffer first
        for i in reversed(range(count)):
            self._free.put_nowait(i)
        self._out: set[int] = set()

    @property
    def in_use(self) -> int:
        return len(self._out)

    async def acquire(self) -> Slot:
        """A free buffer (waits for one)."""
        i = await self._free.get()
        self._out.add(i)
        return Slot(self, i, i * self.size)

    def try_acquire(self) -> Slot | None:
        """A free buffer if there is one now."""
        try:
            i = self._free.get_nowait()
        except asyncio.QueueEmpty:
            return None
        self._out.add(i)
        return Slot(self, i, i * self.size)

    def release(self, slot: Slot) -> None:
        if slot.index in self._out:  # twice is harmless
            self._out.discard(slot.index)
            self._free.put_nowait(slot.index)
