"""The state a VF holds: device objects (QPs, CQs, MKEYs, ...) laid out in one
contiguous arena of bytes, deterministic from a seed.

Objects lie in the arena in offset order without overlapping.  A new VF's
objects cover the arena exactly; reconfigurations that remove objects leave
free space (bytes no object holds, kept as they were), which replacements
reuse.  Migration images carry the object table and arena bytes, free space
included; two VFs have the same digest exactly when their object tables and
arena contents are equal.
"""

from __future__ import annotations

import contextlib
import random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import overload

import xxhash

from ..link.ifc import OBJ_TYPES, PAGE_SIZE
from .memory import MemoryBudget, OutOfMemory

# Object table serialization: arena size, next object id, count, then entries.
_TABLE_HEAD = struct.Struct("<QII")
_TABLE_ENTRY = struct.Struct("<HHIQQ")  # type, reserved, id, offset, length

# Sizing of the initial partition: about one object per 64 KiB, at most 1024.
_OBJECT_GRAIN = 64 * 1024
_MAX_INITIAL_OBJECTS = 1024


class Arena:
    """A VF's state bytes in page-aligned memory (an anonymous mapping).

    Page alignment lets images place large records at their source's page
    offset without knowing addresses, which keeps images deterministic and
    copies at full memcpy speed.  `view` is the buffer for hashing, struct and
    memoryview users.  Its bytes are charged to `memory` (the firmware's
    budget), and its mappings come from that budget's allocator; an
    allocation that is refused or fails raises OutOfMemory and changes nothing.

    `clear` (a LOAD that starts a new chain) zeroes lazily: it marks the
    pages stale, a slice written through `arena[a:b] = ...` unmarks the pages
    it covers (zeroing first the stale pages it covers only in part), and
    `view`, reads and comparisons zero whatever is still stale before anyone
    sees a byte.  A migration's images write every byte of the state, so the
    destination's zeroing of its old state (a memset of all of it, inside
    the wait for the first switchover-ack) mostly never happens.
    """

    __slots__ = ("_mm", "_stale", "_view", "memory")

    def __init__(
        self,
        size: int = 0,
        data: bytes | bytearray | memoryview | None = None,
        *,
        memory: MemoryBudget | None = None,
    ) -> None:
        if data is not None:
            size = len(data)
        self.memory = memory or MemoryBudget.unlimited()
        self.memory.charge(size, f"a {size}-byte device state")
        try:
            self._mm = self.memory.allocator.map(size)
        except (MemoryError, OSError):
            self.memory.credit(size)
            raise OutOfMemory(f"no memory for a {size}-byte device state") from None
        self._view = memoryview(self._mm)[:size]
        # One flag per page: 1 = must read as zero, not zeroed yet (None: none).
        self._stale: bytearray | None = None
        if data is not None:
            self._view[:] = data

    @property
    def view(self) -> memoryview:
        """The state's bytes (stale pages zeroed first)."""
        if self._stale is not None:
            self._zero_stale()
        return self._view

    @property
    def stale_pages(self) -> int:
        """Pages a `clear` left to zero that no write has covered yet."""
        return 0 if self._stale is None else self._stale.count(1)

    def _zero_page_range(self, first: int, last: int) -> None:
        """Zero pages [first, last) (clipped to the state) and unmark them."""
        assert self._stale is not None
        lo, hi = first * PAGE_SIZE, min(last * PAGE_SIZE, len(self._view))
        zero = bytes(min(hi - lo, 1 << 20))
        for off in range(lo, hi, len(zero) or 1):
            n = min(len(zero), hi - off)
            self._view[off : off + n] = zero if n == len(zero) else zero[:n]
        self._stale[first:last] = bytes(last - first)

    def _zero_stale(self) -> None:
        stale = self._stale
        assert stale is not None
        pos = stale.find(1)
        while pos >= 0:
            end = stale.find(0, pos)
            end = len(stale) if end < 0 else end
            self._zero_page_range(pos, end)
            pos = stale.find(1, end)
        self._stale = None

    def _write_edges(self, start: int, stop: int) -> None:
        """[start, stop) is about to be written: zero the stale pages it
        covers only in part (the rest of them must read as zero)."""
        stale = self._stale
        assert stale is not None
        first, last = start // PAGE_SIZE, -(-stop // PAGE_SIZE)
        if start % PAGE_SIZE and stale[first]:
            self._zero_page_range(first, first + 1)
        if stop % PAGE_SIZE and stop < len(self._view) and stale[last - 1]:
            self._zero_page_range(last - 1, last)

    def _written(self, start: int, stop: int) -> None:
        """[start, stop) was written whole: its pages are no longer stale."""
        stale = self._stale
        assert stale is not None
        first, last = start // PAGE_SIZE, -(-stop // PAGE_SIZE)
        stale[first:last] = bytes(last - first)
        if stale.find(1) < 0:
            self._stale = None

    def __len__(self) -> int:
        return len(self._view)

    def resize(self, size: int) -> None:
        """Grow (new bytes are zero) or shrink, keeping the common prefix.

        In place by mremap(2) (no copy of the kept bytes) unless someone still
        holds a view of the old memory: then into a new mapping.  All or
        nothing: OutOfMemory leaves the arena as it was."""
        old_len = len(self._view)
        if size == old_len:
            return
        grow = max(0, size - old_len)
        self.memory.charge(grow, f"growing a device state to {size} bytes")
        try:
            self._remap(size, old_len)
        except (MemoryError, OSError):
            self.memory.credit(grow)
            raise OutOfMemory(f"no memory to grow a device state to {size} bytes") from None
        self.memory.credit(max(0, old_len - size))
        if self._stale is not None:  # pages past the old end are zero already
            pages = -(-size // PAGE_SIZE)
            del self._stale[pages:]
            self._stale.extend(bytes(pages - len(self._stale)))
            if self._stale.find(1) < 0:
                self._stale = None

    def _remap(self, size: int, old_len: int) -> None:
        alloc = self.memory.allocator
        self._view.release()
        try:
            alloc.resize(self._mm, size)
        except (BufferError, OSError, SystemError, MemoryError):
            try:
                mm = alloc.map(size)
            except BaseException:
                # mremap failing leaves the old mapping whole: view it again.
                self._view = memoryview(self._mm)[:old_len]
                raise
            new = memoryview(mm)[:size]
            keep = min(size, old_len)
            new[:keep] = memoryview(self._mm)[:keep]
            self._mm, self._view = mm, new
            return
        self._view = memoryview(self._mm)[:size]
        # Whole pages mremap adds are zero; the tail of the old last page is not
        # (an empty state's mapping is one byte long: allocators map at least 1).
        if size > old_len:
            tail_end = min(size, -(-max(old_len, 1) // PAGE_SIZE) * PAGE_SIZE)
            self._view[old_len:tail_end] = bytes(tail_end - old_len)

    def free(self) -> None:
        """Give the memory back (the VF is gone); the arena is empty after."""
        self.memory.credit(len(self._view))
        self._view.release()
        self._view = memoryview(b"")
        self._stale = None
        # A view someone holds keeps the mapping until it is dropped.
        with contextlib.suppress(BufferError):
            self._mm.close()

    def clear(self, size: int) -> None:
        """Become `size` zero bytes, in the same memory.  A LOAD that starts
        a new chain uses this: the VF's pages are resident already, so zeroing
        them runs at memset speed, where a fresh mapping costs a page fault
        per page (or a long stall to populate it at once).  The kept bytes
        are zeroed lazily (see the class): only the pages no image writes."""
        keep = min(size, len(self._view))
        self.resize(size)
        if keep:
            pages = -(-size // PAGE_SIZE)
            stale = self._stale if self._stale is not None else bytearray(pages)
            stale[: -(-keep // PAGE_SIZE)] = b"\x01" * -(-keep // PAGE_SIZE)
            self._stale = stale

    @overload
    def __getitem__(self, key: int) -> int: ...

    @overload
    def __getitem__(self, key: slice) -> memoryview: ...

    def __getitem__(self, key: int | slice) -> int | memoryview:
        return self.view[key]

    def __setitem__(self, key: int | slice, value: object) -> None:
        if self._stale is not None:
            if isinstance(key, slice) and key.step in (None, 1):
                start, stop, _ = key.indices(len(self._view))
                if start < stop:
                    self._write_edges(start, stop)
                    self._view[key] = value  # type: ignore[call-overload]
                    self._written(start, stop)
                    return
            self._zero_stale()
        self._view[key] = value  # type: ignore[call-overload]

    def __bytes__(self) -> bytes:
        return self.view.tobytes()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Arena):
            return self.view == other.view
        if isinstance(other, bytes | bytearray | memoryview):
            return self.view == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class TableError(ValueError):
    """A serialized object table is malformed."""


@dataclass(frozen=True, slots=True)
class DeviceObject:
    obj_type: int  # index into OBJ_TYPES
    obj_id: int
    offset: int  # in the arena
    length: int

    @property
    def type_name(self) -> str:
        return OBJ_TYPES[self.obj_type]

    @property
    def end(self) -> int:
        return self.offset + self.length


_POOL_SIZE = 1 << 20
_PAGE_STAMP = struct.Struct("<QQ")


def _fill_random(dest: Arena, start: int, rng: random.Random, end: int | None = None) -> None:
    """Seeded contents of [start, end) at memcpy speed: a 1 MiB random pool
    copied at seeded rotations, and every page stamped with (a seeded tag, its
    page number), so that no two pages of a VF, nor of VFs with other seeds,
    are alike."""
    view = dest.view
    end = len(view) if end is None else end
    pool = rng.randbytes(min(_POOL_SIZE, max(end - start, 1)))
    plen = len(pool)
    pv = memoryview(pool)
    tag = rng.getrandbits(64)
    off = start
    while off < end:
        rot = rng.randrange(plen)
        n = min(plen - rot, end - off)
        view[off : off + n] = pv[rot : rot + n]
        off += n
        m = min(rot, end - off)
        view[off : off + m] = pv[:m]
        off += m
    first = -(-start // PAGE_SIZE)
    for page in range(first, (end - _PAGE_STAMP.size) // PAGE_SIZE + 1):
        _PAGE_STAMP.pack_into(view, page * PAGE_SIZE, tag, page)


def _initial_layout(size: int, seed: int) -> tuple[list[DeviceObject], random.Random]:
    """A new VF's objects (covering `size` bytes) and the generator, seeded
    with `seed`, that then fills them."""
    if size <= 0:
        raise ValueError("device state size must be positive")
    rng = random.Random(seed)
    count = max(1, min(_MAX_INITIAL_OBJECTS, size // _OBJECT_GRAIN))
    objects: list[DeviceObject] = []
    offset = 0
    for obj_id, length in enumerate(_partition(size, count, rng), start=1):
        objects.append(DeviceObject(rng.randrange(len(OBJ_TYPES)), obj_id, offset, length))
        offset += length
    return objects, rng


def _replace_span(objects: list[DeviceObject], arena_size: int, need: int) -> tuple[int, int, int]:
    """Where a replacement of `need` bytes goes: the objects it removes,
    objects[first:last], and the span's start.  From the oldest object the
    span takes the free space before it and grows over the objects after it
    (each with the free space that follows), then over those before it,
    until it holds `need` bytes or is the whole arena."""
    n = len(objects)
    if n == 0:
        return 0, 0, 0
    first = min(range(n), key=lambda k: objects[k].obj_id)
    last = first + 1

    def start_of(i: int) -> int:
        return objects[i - 1].end if i > 0 else 0

    def end_of(j: int) -> int:
        return objects[j].offset if j < n else arena_size

    while end_of(last) - start_of(first) < need:
        if last < n:
            last += 1
        elif first > 0:
            first -= 1
        else:
            break  # the whole arena, and it grows
    return first, last, start_of(first)


def _partition(size: int, count: int, rng: random.Random) -> list[int]:
    """Split `size` bytes into `count` positive parts with seeded weights."""
    weights = [rng.randint(1, 8) for _ in range(count)]
    total_w = sum(weights)
    parts = [max(1, size * w // total_w) for w in weights]
    parts[-1] += size - sum(parts)
    # The last part can only go non-positive when count > size, which callers prevent.
    return parts


class DeviceState:
    """Object table plus arena contents of one VF."""

    __slots__ = ("arena", "next_obj_id", "objects")

    def __init__(
        self, arena: Arena | bytes | bytearray, objects: list[DeviceObject], next_obj_id: int
    ) -> None:
        self.arena = arena if isinstance(arena, Arena) else Arena(data=arena)
        self.objects = objects
        self.next_obj_id = next_obj_id

    @classmethod
    def generate(cls, size: int, seed: int, memory: MemoryBudget | None = None) -> DeviceState:
        """A fresh VF state of `size` bytes, the same for the same seed
        (OutOfMemory if `memory` cannot hold it)."""
        objects, rng = _initial_layout(size, seed)
        arena = Arena(size, memory=memory)
        _fill_random(arena, 0, rng)
        return cls(arena, objects, len(objects) + 1)

    def regenerate(self, size: int, seed: int) -> None:
        """Become what generate(size, seed) makes, in this state's memory.
        All or nothing: the arena is resized first (OutOfMemory changes nothing)."""
        objects, rng = _initial_layout(size, seed)
        self.arena.resize(size)
        self.objects = objects
        self.next_obj_id = len(objects) + 1
        _fill_random(self.arena, 0, rng)

    @classmethod
    def empty(cls, size: int = 0, memory: MemoryBudget | None = None) -> DeviceState:
        return cls(Arena(size, memory=memory), [], 1)

    @property
    def size(self) -> int:
        return len(self.arena)

    @property
    def num_pages(self) -> int:
        return (len(self.arena) + PAGE_SIZE - 1) // PAGE_SIZE

    def add_objects(
        self, specs: Sequence[tuple[int, int]], rng: random.Random, *, limit: int | None = None
    ) -> range:
        """Append objects (type, length) with seeded contents; returns the new
        pages.  All or nothing: the arena grows once, before the object table
        changes, so OutOfMemory (or a size beyond `limit`) changes nothing."""
        if any(length <= 0 for _, length in specs):
            raise ValueError("object size must be positive")
        old_size = len(self.arena)
        new_size = old_size + sum(length for _, length in specs)
        if limit is not None and new_size > limit:
            raise OutOfMemory(
                f"the device state would grow to {new_size} bytes, beyond the size limit {limit}"
            )
        self.arena.resize(new_size)
        start = old_size
        for obj_type, length in specs:
            self.objects.append(DeviceObject(obj_type, self.next_obj_id, start, length))
            self.next_obj_id += 1
            _fill_random(self.arena, start, rng, start + length)
            start += length
        return range(old_size // PAGE_SIZE, self.num_pages)

    def replace_objects(
        self, specs: Sequence[tuple[int, int]], rng: random.Random, *, limit: int | None = None
    ) -> range:
        """Remove the oldest object and the objects after it in the arena
        (before it, at the arena's end) until they and the free space around
        them span the new objects; lay the new objects out from the start of
        that span (what is left of it is free).  The arena grows only if the
        new objects are larger than all of it.  Returns the pages written.
        All or nothing, as add_objects."""
        if any(length <= 0 for _, length in specs):
            raise ValueError("object size must be positive")
        need = sum(length for _, length in specs)
        first, last, start = _replace_span(self.objects, len(self.arena), need)
        new_size = max(len(self.arena), start + need)
        if limit is not None and new_size > limit:
            raise OutOfMemory(
                f"the device state would grow to {new_size} bytes, beyond the size limit {limit}"
            )
        self.arena.resize(new_size)
        new: list[DeviceObject] = []
        at = start
        for obj_type, length in specs:
            new.append(DeviceObject(obj_type, self.next_obj_id, at, length))
            self.next_obj_id += 1
            _fill_random(self.arena, at, rng, at + length)
            at += length
        self.objects[first:last] = new
        return range(start // PAGE_SIZE, -(-(start + need) // PAGE_SIZE))

    def remove_objects(self, nbytes: int) -> int:
        """Remove the oldest objects until at least `nbytes` of them are gone
        (or none is left); their bytes become free space, unchanged.  Returns
        how many were removed."""
        taken: set[int] = set()
        removed = 0
        for o in sorted(self.objects, key=lambda o: o.obj_id):
            if removed >= nbytes:
                break
            taken.add(o.obj_id)
            removed += o.length
        if taken:
            self.objects = [o for o in self.objects if o.obj_id not in taken]
        return len(taken)

    @property
    def object_bytes(self) -> int:
        """Bytes the objects hold (the state's size less its free space)."""
        return sum(o.length for o in self.objects)

    # --- serialization of the object table --------------------------------

    def table_bytes(self) -> bytes:
        parts = [_TABLE_HEAD.pack(len(self.arena), self.next_obj_id, len(self.objects))]
        parts.extend(
            _TABLE_ENTRY.pack(o.obj_type, 0, o.obj_id, o.offset, o.length) for o in self.objects
        )
        return b"".join(parts)

    def table_size(self) -> int:
        return _TABLE_HEAD.size + _TABLE_ENTRY.size * len(self.objects)

    @staticmethod
    def parse_table(data: bytes | memoryview) -> tuple[int, int, list[DeviceObject]]:
        """(arena size, next object id, objects) from table bytes; validates layout."""
        if len(data) < _TABLE_HEAD.size:
            raise TableError("object table shorter than its header")
        arena_size, next_id, count = _TABLE_HEAD.unpack_from(data, 0)
        if len(data) != _TABLE_HEAD.size + count * _TABLE_ENTRY.size:
            raise TableError("object table length does not match its entry count")
        objects = []
        end = 0
        for i in range(count):
            t, _, oid, off, length = _TABLE_ENTRY.unpack_from(
                data, _TABLE_HEAD.size + i * _TABLE_ENTRY.size
            )
            # In offset order, not overlapping; free space between objects is allowed.
            if t >= len(OBJ_TYPES) or length == 0 or off < end or oid >= next_id:
                raise TableError(f"object table entry {i} is inconsistent")
            end = off + length
            objects.append(DeviceObject(t, oid, off, length))
        if end > arena_size:
            raise TableError("objects run past the end of the arena")
        return arena_size, next_id, objects

    # --- identity -----------------------------------------------------------

    def digest(self) -> str:
        # XXH3-128: a 256 MiB VF hashes in tens of milliseconds (BLAKE2b took
        # half a second, inside the demo's stop); equality is all it is for.
        h = xxhash.xxh3_128()
        h.update(self.table_bytes())
        h.update(self.arena.view)
        return h.hexdigest()


def page_runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted (first page, count) runs of consecutive page numbers."""
    runs: list[tuple[int, int]] = []
    start = prev = -2
    for p in sorted(pages):
        if p == prev + 1:
            prev = p
            continue
        if start >= 0:
            runs.append((start, prev - start + 1))
        start = prev = p
    if start >= 0:
        runs.append((start, prev - start + 1))
    return runs
