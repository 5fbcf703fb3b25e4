"""The migration image format the emulated firmware writes with SAVE_VHCA_STATE
and accepts with LOAD_VHCA_STATE.

The kernel treats images as opaque (it wraps each one in a 16-byte FW_DATA
record); only this firmware reads them.  An image is a header followed by
records:

    header  (52 bytes, little endian)
      magic "VHCA", version, kind (FULL/INCREMENTAL), flags (LAST piece),
      profile, chain id, image seq in the chain, piece (chunk) number,
      payload length, payload checksum, header checksum
    records (16-byte record header + body)
      TABLE: the whole object table (arena size, objects)
      DATA:  bytes for arena[offset : offset + length]

A full image starts a chain (seq 0) and replaces the target's state; each
incremental image of the chain (seq 1, 2, ...) must be loaded in order.  In
chunk mode one image is split over several pieces, each separately loadable.
Checksums are xxh3-64, so corrupt or truncated images are refused before any
byte of the target changes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import xxhash

from ..link.ifc import PAGE_SIZE, CmdStatus, Syndrome, VfConfig
from .device_state import Arena, DeviceObject, DeviceState, TableError
from .memory import OutOfMemory

MAGIC = b"VHCA"
VERSION = 1
# Identifies the device model whose state the image carries; an image made by
# firmware of another profile is foreign.
PROFILE = 0x4D4C5835  # "MLX5"

_HEADER = struct.Struct("<4sHBBIQIIQQ")  # without the trailing header checksum
IMAGE_HEADER_SIZE = _HEADER.size + 8
_HCSUM = struct.Struct("<Q")
_REC = struct.Struct("<IIQ")  # type, length, offset
REC_HEADER_SIZE = _REC.size
REC_TABLE = 1
REC_DATA = 2
# Filler so that a large DATA body lands at the same offset within a page as
# its source: memcpy between buffers whose page offsets differ by a few hundred
# bytes runs at a third of its speed (4K aliasing).  The LOAD side skips it.
REC_PAD = 3
PAD_MIN_BODY = 256 << 10
# A DATA record's length is 32 bits; split longer runs.
MAX_DATA_RECORD = 1 << 30

FLAG_LAST_PIECE = 1 << 0
# write_piece copies and sums DATA bodies in blocks this size (fits in L2).
_SUM_BLOCK = 512 << 10


class ImageKind(enum.IntEnum):
    FULL = 0
    INCREMENTAL = 1


class ImageError(Exception):
    """An image LOAD refuses; carries the syndrome (and the status, BAD_PARAM
    unless the firmware lacks memory for it)."""

    def __init__(
        self, syndrome: Syndrome, message: str, status: CmdStatus = CmdStatus.BAD_PARAM_ERR
    ) -> None:
        super().__init__(message)
        self.syndrome = syndrome
        self.status = status


@dataclass(frozen=True, slots=True)
class ImageHeader:
    kind: ImageKind
    flags: int
    chain_id: int
    seq: int
    piece: int
    payload_len: int
    profile: int = PROFILE

    @property
    def last_piece(self) -> bool:
        return bool(self.flags & FLAG_LAST_PIECE)


@dataclass(slots=True)
class PlanItem:
    """One thing an image must carry: the object table, or an arena range."""

    rec_type: int
    offset: int = 0
    length: int = 0
    table: bytes = b""


@dataclass(slots=True)
class Cursor:
    """How far a plan has been written: item index and bytes of it done."""

    item: int = 0
    done: int = 0


@dataclass(slots=True)
class Plan:
    """The records of one image, in the order they are written."""

    items: list[PlanItem] = field(default_factory=list)

    @classmethod
    def full(cls, state: DeviceState) -> Plan:
        plan = cls([PlanItem(REC_TABLE, table=state.table_bytes())])
        if state.size:
            plan.items.append(PlanItem(REC_DATA, 0, state.size))
        return plan

    def add_table(self, state: DeviceState) -> None:
        self.items.append(PlanItem(REC_TABLE, table=state.table_bytes()))

    def add_pages(self, runs: list[tuple[int, int]], arena_size: int) -> None:
        for first, count in runs:
            off = first * PAGE_SIZE
            length = min(count * PAGE_SIZE, arena_size - off)
            if length > 0:
                self.items.append(PlanItem(REC_DATA, off, length))

    @property
    def empty(self) -> bool:
        return not self.items

    def finished(self, cur: Cursor) -> bool:
        return cur.item >= len(self.items)

    def image_size(self, cur: Cursor | None = None) -> int:
        """Exact size of one image holding everything from `cur` on."""
        size, _, _ = _cut(self, cur or Cursor(), UNBOUNDED, allow_empty=False)
        return size

    def pieces_size(self, capacity: int, cur: Cursor | None = None) -> int:
        """Exact total of the pieces written into buffers of `capacity` bytes.

        O(records), not O(pieces): every SAVE and QUERY of a chunked image
        asks, and a 1 GiB image is 128 pieces of 8 MiB.  A piece that is one
        DATA record (after its pad) ending inside its item repeats unchanged
        (same pad, same length: it ends on a page boundary) while more than
        its record's room is left, so those pieces are counted, not cut."""
        cur = cur or Cursor()
        total = 0
        while not self.finished(cur):
            fits = max(capacity, self.min_piece(cur))
            size, nxt, ops = _cut(self, cur, fits, allow_empty=False)
            total += size
            data = [op for op in ops if op[0] == "data"]
            if nxt.item == cur.item and len(data) == 1 and ops[-1] is data[0]:
                step = nxt.done - cur.done
                # The record's room: what it would take of an item long enough.
                room = fits - (size - step)
                left = self.items[cur.item].length - nxt.done
                same = -(-(left - room) // step) if left > room else 0
                total += same * size
                nxt = Cursor(nxt.item, nxt.done + same * step)
            cur = nxt
        return total

    def min_piece(self, cur: Cursor) -> int:
        """The smallest buffer the next piece fits in (its first record, or a page of it)."""
        if self.finished(cur):
            return IMAGE_HEADER_SIZE
        it = self.items[cur.item]
        if it.rec_type == REC_TABLE:
            return IMAGE_HEADER_SIZE + REC_HEADER_SIZE + len(it.table)
        return IMAGE_HEADER_SIZE + REC_HEADER_SIZE + min(PAGE_SIZE, it.length - cur.done)


UNBOUNDED = 1 << 62

# What _cut plans: ("table", index) | ("pad", length) | ("data", arena offset, length)
_Op = tuple[str, int] | tuple[str, int, int]


def _cut(
    plan: Plan, start: Cursor, capacity: int, *, allow_empty: bool
) -> tuple[int, Cursor, list[_Op]]:
    """Decide what one piece of at most `capacity` bytes holds, from `start`.

    Writing and sizing both use this, so a QUERY's size is exactly what SAVE
    writes.  DATA is cut at page boundaries (except at the arena's end) so that
    what a piece leaves out is whole pages.  Large DATA bodies are preceded by
    a PAD record that puts them at their source's offset within a page (both
    the arena and host buffers are page aligned): memcpy between buffers whose
    page offsets differ by a few hundred bytes runs at a third of its speed.
    """
    pos = IMAGE_HEADER_SIZE
    cur = Cursor(start.item, start.done)
    ops: list[_Op] = []
    while cur.item < len(plan.items):
        it = plan.items[cur.item]
        if it.rec_type == REC_TABLE:
            need = REC_HEADER_SIZE + len(it.table)
            if pos + need > capacity:
                break
            ops.append(("table", cur.item))
            pos += need
            cur = Cursor(cur.item + 1, 0)
            continue
        left = it.length - cur.done
        off = it.offset + cur.done
        if min(left, capacity - pos - 2 * REC_HEADER_SIZE - PAGE_SIZE) >= PAD_MIN_BODY:
            pad = (off - (pos + 2 * REC_HEADER_SIZE)) % PAGE_SIZE
            ops.append(("pad", pad))
            pos += REC_HEADER_SIZE + pad
        take = min(left, capacity - pos - REC_HEADER_SIZE, MAX_DATA_RECORD)
        if take < left:
            take -= take % PAGE_SIZE  # what is left starts on a page boundary
        if take <= 0:
            break
        ops.append(("data", off, take))
        pos += REC_HEADER_SIZE + take
        cur = Cursor(cur.item, cur.done + take)
        if cur.done == it.length:
            cur = Cursor(cur.item + 1, 0)
    if not ops and cur.item < len(plan.items) and not allow_empty:
        raise ImageError(Syndrome.BUFFER_TOO_SMALL, "buffer too small for the next record")
    return pos, cur, ops


@dataclass(slots=True)
class WriteResult:
    size: int  # bytes written (header included)
    cursor: Cursor  # where the next piece starts
    # Arena ranges this piece captured, for the tracking bookkeeping.
    data_ranges: list[tuple[int, int]]
    table_written: bool


def write_piece(
    dest: memoryview,
    plan: Plan,
    start: Cursor,
    arena: Arena,
    *,
    kind: ImageKind,
    chain_id: int,
    seq: int,
    piece: int,
    whole: bool,
    standalone: bool = False,
    allow_empty: bool = False,
) -> WriteResult:
    """Write as much of `plan` from `start` as fits in `dest`.

    With `whole`, everything must fit or nothing is written.  A `standalone`
    piece is a complete image even if part of the plan did not fit (tracked
    SAVEs: what is left stays pending in the tracking state); with
    `allow_empty` it may hold no record at all.  Otherwise ImageError
    (BUFFER_TOO_SMALL) when not even the first record fits.
    """
    capacity = len(dest)
    if capacity < IMAGE_HEADER_SIZE:
        raise ImageError(Syndrome.BUFFER_TOO_SMALL, "buffer smaller than an image header")
    size, cur, ops = _cut(plan, start, capacity, allow_empty=allow_empty)
    if whole and not plan.finished(cur):
        raise ImageError(Syndrome.BUFFER_TOO_SMALL, "buffer too small for the image")
    pos = IMAGE_HEADER_SIZE
    ranges: list[tuple[int, int]] = []
    table_written = False
    src = arena.view
    payload_sum = xxhash.xxh3_64()  # of dest[IMAGE_HEADER_SIZE:pos], as it is written
    for op in ops:
        rec_start = pos
        if op[0] == "table":
            table = plan.items[op[1]].table
            _REC.pack_into(dest, pos, REC_TABLE, len(table), 0)
            pos += REC_HEADER_SIZE
            dest[pos : pos + len(table)] = table
            pos += len(table)
            table_written = True
        elif op[0] == "pad":
            _REC.pack_into(dest, pos, REC_PAD, op[1], 0)
            pos += REC_HEADER_SIZE
            dest[pos : pos + op[1]] = bytes(op[1])
            pos += op[1]
        else:
            _, off, take = op  # type: ignore[misc]
            _REC.pack_into(dest, pos, REC_DATA, take, off)
            pos += REC_HEADER_SIZE
            payload_sum.update(dest[rec_start:pos])
            # Each block is summed while still in the cache it was copied
            # through: copy-then-sum of megabytes reads them back from memory.
            for done in range(0, take, _SUM_BLOCK):
                n = min(_SUM_BLOCK, take - done)
                dest[pos : pos + n] = src[off + done : off + done + n]
                payload_sum.update(dest[pos : pos + n])
                pos += n
            ranges.append((off, take))
            continue
        payload_sum.update(dest[rec_start:pos])
    assert pos == size
    flags = FLAG_LAST_PIECE if standalone or plan.finished(cur) else 0
    checksum = payload_sum.intdigest()
    _HEADER.pack_into(
        dest,
        0,
        MAGIC,
        VERSION,
        kind,
        flags,
        PROFILE,
        chain_id,
        seq,
        piece,
        pos - IMAGE_HEADER_SIZE,
        checksum,
    )
    _HCSUM.pack_into(dest, _HEADER.size, xxhash.xxh3_64_intdigest(dest[: _HEADER.size]))
    return WriteResult(pos, cur, ranges, table_written)


@dataclass(slots=True)
class ParsedImage:
    header: ImageHeader
    table: tuple[int, int, list[DeviceObject]] | None
    data: list[tuple[int, memoryview]]

    def resulting_size(self, current_size: int) -> int:
        return self.table[0] if self.table is not None else current_size


def parse_image(buf: memoryview) -> ParsedImage:
    """Check an image completely (layout and checksums) without applying it."""
    if len(buf) < IMAGE_HEADER_SIZE:
        raise ImageError(Syndrome.IMAGE_TRUNCATED, "image shorter than its header")
    magic, version, kind, flags, profile, chain_id, seq, piece, payload_len, checksum = (
        _HEADER.unpack_from(buf, 0)
    )
    if magic != MAGIC:
        raise ImageError(Syndrome.IMAGE_BAD_MAGIC, "not a VHCA migration image")
    (hsum,) = _HCSUM.unpack_from(buf, _HEADER.size)
    if hsum != xxhash.xxh3_64_intdigest(buf[: _HEADER.size]):
        raise ImageError(Syndrome.IMAGE_CHECKSUM, "image header checksum mismatch")
    if version != VERSION or profile != PROFILE:
        raise ImageError(
            Syndrome.IMAGE_FOREIGN,
            f"image of profile {profile:#x} v{version}, firmware takes {PROFILE:#x} v{VERSION}",
        )
    try:
        ikind = ImageKind(kind)
    except ValueError:
        raise ImageError(Syndrome.IMAGE_MALFORMED, f"unknown image kind {kind}") from None
    if IMAGE_HEADER_SIZE + payload_len > len(buf):
        raise ImageError(
            Syndrome.IMAGE_TRUNCATED,
            f"image needs {IMAGE_HEADER_SIZE + payload_len} bytes, LOAD gave {len(buf)}",
        )
    payload = buf[IMAGE_HEADER_SIZE : IMAGE_HEADER_SIZE + payload_len]
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        raise ImageError(Syndrome.IMAGE_CHECKSUM, "image payload checksum mismatch")
    table = None
    data: list[tuple[int, memoryview]] = []
    for rec_type, body_off, length, offset in _records(payload):
        body = payload[body_off : body_off + length]
        if rec_type == REC_TABLE:
            if table is not None:
                raise ImageError(Syndrome.IMAGE_MALFORMED, "two object tables in one image")
            try:
                table = DeviceState.parse_table(body)
            except TableError as e:
                raise ImageError(Syndrome.IMAGE_MALFORMED, str(e)) from None
        elif rec_type == REC_DATA:
            data.append((offset, body))
        elif rec_type == REC_PAD:
            continue
        else:
            raise ImageError(Syndrome.IMAGE_MALFORMED, f"unknown record type {rec_type}")
    header = ImageHeader(ikind, flags, chain_id, seq, piece, payload_len, profile)
    return ParsedImage(header, table, data)


def _records(payload: memoryview) -> Iterator[tuple[int, int, int, int]]:
    pos = 0
    end = len(payload)
    while pos < end:
        if pos + REC_HEADER_SIZE > end:
            raise ImageError(Syndrome.IMAGE_MALFORMED, "record header runs past the payload")
        rec_type, length, offset = _REC.unpack_from(payload, pos)
        body = pos + REC_HEADER_SIZE
        if body + length > end:
            raise ImageError(Syndrome.IMAGE_MALFORMED, "record runs past the payload")
        yield rec_type, body, length, offset
        pos = body + length


def apply_image(
    state: DeviceState,
    image: ParsedImage,
    *,
    starts_chain: bool,
    size_limit: int = VfConfig.MAX_SIZE,
) -> DeviceState:
    """Apply a checked image; returns the state to keep (maybe a new object).

    Every bound is checked before the first byte changes, and the arena is
    resized (all or nothing) before the object table, so a refused image
    leaves `state` exactly as it was.  An image whose state would be larger
    than `size_limit` (the VF's) is refused.
    """
    if starts_chain and image.table is None:
        raise ImageError(Syndrome.IMAGE_MALFORMED, "a full image must start with the object table")
    new_size = image.resulting_size(state.size)
    if new_size > size_limit:
        raise ImageError(
            Syndrome.IMAGE_TOO_LARGE,
            f"the image's device state of {new_size} bytes exceeds the function's "
            f"limit of {size_limit} bytes",
        )
    for offset, body in image.data:
        if offset + len(body) > new_size:
            raise ImageError(Syndrome.IMAGE_MALFORMED, "data record outside the device state")
    target = state
    try:
        if starts_chain:
            # The old contents are discarded: its memory is reused, zeroed.
            state.arena.clear(new_size)
            target = DeviceState(state.arena, [], 1)
        else:
            state.arena.resize(new_size)
    except OutOfMemory as e:
        raise ImageError(Syndrome.NO_MEMORY, str(e), CmdStatus.LIM_ERR) from None
    if image.table is not None:
        _, target.next_obj_id, target.objects = image.table
    arena = target.arena
    for offset, body in image.data:
        arena[offset : offset + len(body)] = body
    return target
