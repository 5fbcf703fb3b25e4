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

import ctypes
import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import xxhash

from .constants import PAGE_SIZE, Syndrome
from .device_state import DeviceObject, DeviceState, TableError

MAGIC = b"VHCA"
VERSION = 1
# Identifies the device model whose state the image carries; an image made by
# firmware of another profile is foreign.
PROFILE = 0x4D4C5835  # "MLX5"

_HEADER = struct.Struct("<4sHBBIQIIQQ")  # without the trailing header checksum
HEADER_SIZE = _HEADER.size + 8
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
PAD_ALLOWANCE = REC_HEADER_SIZE + 4095
# A DATA record's length is 32 bits; split longer runs.
MAX_DATA_RECORD = 1 << 30

FLAG_LAST_PIECE = 1 << 0


class ImageKind(enum.IntEnum):
    FULL = 0
    INCREMENTAL = 1


class ImageError(Exception):
    """An image LOAD refuses; carries the syndrome."""

    def __init__(self, syndrome: Syndrome, message: str) -> None:
        super().__init__(message)
        self.syndrome = syndrome


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

    def remaining_bytes(self, cur: Cursor) -> int:
        """Record bytes (headers included) still to write from `cur`, unsplit."""
        total = 0
        for i in range(cur.item, len(self.items)):
            it = self.items[i]
            if it.rec_type == REC_TABLE:
                total += REC_HEADER_SIZE + len(it.table)
            else:
                left = it.length - (cur.done if i == cur.item else 0)
                nrec = max(1, -(-left // MAX_DATA_RECORD))
                total += nrec * REC_HEADER_SIZE + left
                if left >= PAD_MIN_BODY:
                    total += nrec * PAD_ALLOWANCE
        return total

    def image_size(self, cur: Cursor | None = None) -> int:
        """Size of one image holding everything from `cur` on."""
        return HEADER_SIZE + self.remaining_bytes(cur or Cursor())

    def pieces_size(self, piece_capacity: int, cur: Cursor | None = None) -> int:
        """Total bytes if written as pieces of at most `piece_capacity` bytes."""
        body = self.remaining_bytes(cur or Cursor())
        room = max(1, piece_capacity - HEADER_SIZE - REC_HEADER_SIZE)
        pieces = max(1, -(-body // room))
        return body + pieces * (HEADER_SIZE + REC_HEADER_SIZE)

    def finished(self, cur: Cursor) -> bool:
        return cur.item >= len(self.items)


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
    arena: bytearray,
    *,
    kind: ImageKind,
    chain_id: int,
    seq: int,
    piece: int,
    whole: bool,
    standalone: bool = False,
) -> WriteResult:
    """Write as much of `plan` from `start` as fits in `dest`.

    With `whole`, everything must fit or nothing is written.  A `standalone`
    piece is a complete image even if part of the plan did not fit (tracked
    SAVEs: what is left stays pending in the tracking state).  DATA records
    are split at page boundaries (except at the end of the arena) so that what
    a piece leaves out is a whole number of pages.  Raises ImageError
    (BUFFER_TOO_SMALL) if not even the first record fits.
    """
    capacity = len(dest)
    if whole and plan.image_size(start) > capacity:
        raise ImageError(Syndrome.BUFFER_TOO_SMALL, "buffer too small for the image")
    if capacity < HEADER_SIZE:
        raise ImageError(Syndrome.BUFFER_TOO_SMALL, "buffer smaller than an image header")
    pos = HEADER_SIZE
    cur = Cursor(start.item, start.done)
    ranges: list[tuple[int, int]] = []
    table_written = False
    src = memoryview(arena)
    dest_base, src_base = _address(dest), _address(src)
    while cur.item < len(plan.items):
        it = plan.items[cur.item]
        if it.rec_type == REC_TABLE:
            need = REC_HEADER_SIZE + len(it.table)
            if pos + need > capacity:
                break
            _REC.pack_into(dest, pos, REC_TABLE, len(it.table), 0)
            dest[pos + REC_HEADER_SIZE : pos + need] = it.table
            pos += need
            table_written = True
            cur.item += 1
            cur.done = 0
            continue
        left = it.length - cur.done
        off = it.offset + cur.done
        if left >= PAD_MIN_BODY:
            pad = (src_base + off - (dest_base + pos + 2 * REC_HEADER_SIZE)) % PAGE_SIZE
            if pos + 2 * REC_HEADER_SIZE + pad + PAGE_SIZE <= capacity:
                _REC.pack_into(dest, pos, REC_PAD, pad, 0)
                pos += REC_HEADER_SIZE + pad
        room = capacity - pos - REC_HEADER_SIZE
        take = min(left, room, MAX_DATA_RECORD)
        if take < left:
            take -= take % PAGE_SIZE  # runs start on page boundaries
        if take <= 0:
            break
        _REC.pack_into(dest, pos, REC_DATA, take, off)
        pos += REC_HEADER_SIZE
        dest[pos : pos + take] = src[off : off + take]
        pos += take
        ranges.append((off, take))
        cur.done += take
        if cur.done == it.length:
            cur.item += 1
            cur.done = 0
    if pos == HEADER_SIZE and cur.item < len(plan.items):
        raise ImageError(Syndrome.BUFFER_TOO_SMALL, "buffer too small for the next record")
    payload_len = pos - HEADER_SIZE
    flags = FLAG_LAST_PIECE if standalone or cur.item >= len(plan.items) else 0
    checksum = xxhash.xxh3_64_intdigest(dest[HEADER_SIZE:pos])
    _HEADER.pack_into(
        dest, 0, MAGIC, VERSION, kind, flags, PROFILE, chain_id, seq, piece, payload_len, checksum
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
    if len(buf) < HEADER_SIZE:
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
    if HEADER_SIZE + payload_len > len(buf):
        raise ImageError(
            Syndrome.IMAGE_TRUNCATED,
            f"image needs {HEADER_SIZE + payload_len} bytes, LOAD gave {len(buf)}",
        )
    payload = buf[HEADER_SIZE : HEADER_SIZE + payload_len]
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


def _address(view: memoryview) -> int:
    """Where a writable buffer's bytes are (to align copies), or 0 if unknown."""
    if view.readonly or not len(view):
        return 0
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


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


def apply_image(state: DeviceState, image: ParsedImage, *, starts_chain: bool) -> DeviceState:
    """Apply a checked image; returns the state to keep (maybe a new object).

    Every bound is checked before the first byte changes, so a refused image
    leaves `state` exactly as it was.
    """
    if starts_chain and image.table is None:
        raise ImageError(Syndrome.IMAGE_MALFORMED, "a full image must start with the object table")
    new_size = image.resulting_size(state.size)
    for offset, body in image.data:
        if offset + len(body) > new_size:
            raise ImageError(Syndrome.IMAGE_MALFORMED, "data record outside the device state")
    target = state
    try:
        if starts_chain:
            target = DeviceState(bytearray(new_size), [], 1)
        elif new_size > state.size:
            state.arena.extend(bytes(new_size - state.size))
        elif new_size < state.size:
            del state.arena[new_size:]
    except MemoryError:
        raise ImageError(Syndrome.NO_MEMORY, "no memory for the device state") from None
    if image.table is not None:
        _, target.next_obj_id, target.objects = image.table
    arena = target.arena
    for offset, body in image.data:
        arena[offset : offset + len(body)] = body
    return target
