"""WriteRequest and ReadResponse (vfio.v1) on the wire, without the protobuf
runtime's copies.

A migration streams its data through `Write` in 1 MiB messages.  The
protobuf runtime copies each payload twice on the way in (into its arena,
then into a new `bytes` for `.data`) and twice on the way out; at these
sizes the copies (and the page faults of their fresh buffers) were a good
part of the driver's CPU in a migration.  The message is two fields, so it
is decoded here into a view of the received buffer and encoded with one
copy.  Anything this decoder does not expect is handed to the protobuf
runtime, so the wire format stays exactly vfio.proto's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .v1 import vfio_pb2 as pb

_FD_TAG = 0x08  # field 1, varint
_DATA_TAG = 0x12  # field 2, length-delimited
_READ_DATA_TAG = 0x0A  # ReadResponse.data: field 1, length-delimited


@dataclass(frozen=True, slots=True)
class WriteChunk:
    """A WriteRequest: what the servicer reads (`fd`, `data`)."""

    fd: int
    data: bytes | memoryview


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _put_varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32: ten bytes, two's complement
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def decode_write_request(raw: bytes) -> WriteChunk:
    fd = 0
    data: bytes | memoryview = b""
    pos = 0
    try:
        while pos < len(raw):
            tag, pos = _varint(raw, pos)
            if tag == _FD_TAG:
                v, pos = _varint(raw, pos)
                v &= 0xFFFFFFFF  # int32: the low 32 bits, signed
                fd = v - (1 << 32) if v >= 1 << 31 else v
            elif tag == _DATA_TAG:
                n, pos = _varint(raw, pos)
                if pos + n > len(raw):
                    raise ValueError("truncated bytes field")
                data = memoryview(raw)[pos : pos + n]
                pos += n
            else:
                raise ValueError(f"unexpected tag {tag}")  # unknown fields: the runtime's job
    except ValueError:
        m = pb.WriteRequest.FromString(raw)  # raises DecodeError on a malformed message
        return WriteChunk(m.fd, m.data)
    return WriteChunk(fd, data)


def encode_write_request(chunk: WriteChunk) -> bytes:
    head = bytearray()
    if chunk.fd:
        head.append(_FD_TAG)
        head += _put_varint(chunk.fd)
    n = len(chunk.data)
    if n:
        head.append(_DATA_TAG)
        head += _put_varint(n)
        return b"".join((head, chunk.data))
    return bytes(head)


@dataclass(frozen=True, slots=True)
class ReadChunk:
    """A ReadResponse the servicer answers with (Read, ReadStream), already on
    the wire: encode_read_response passes `wire` through."""

    wire: bytes

    @classmethod
    def of(cls, data: bytes | memoryview) -> ReadChunk:
        """A ReadResponse of `data`, in one copy."""
        return cls(b"".join((_read_head(len(data)), data)))


def _read_head(n: int) -> bytes:
    """ReadResponse.data's tag and length; nothing for no data (proto3 leaves
    an empty bytes field off the wire)."""
    return bytes((_READ_DATA_TAG,)) + _put_varint(n) if n else b""


class ReadAnswer:
    """A ReadResponse as the memory a read(2) copies into (a UserBuffer for
    MigrationFile.readinto): what is read lands in the `bytes` of the answer,
    after the field's tag and length.  So the data is copied once on its way
    from the driver's buffer to the answer, where reading it into a `bytes`
    first and then encoding copied it twice, each time into a fresh buffer
    whose pages fault in (gRPC copies the answer once more: it must be
    `bytes`).

    Pieces come in order (the stream's); a read that spans two of the
    driver's buffers copies the first piece again, as the length before it
    changes."""

    def __init__(self, count: int) -> None:
        self._count = count
        self.size = 0  # bytes of data in `wire`
        self.wire = b""

    def __len__(self) -> int:
        return self._count

    def __setitem__(self, key: slice, value: memoryview, /) -> None:
        if key.start != self.size or len(value) > self._count - self.size:
            raise ValueError("a ReadAnswer takes the pieces of one read, in order")
        if self.size:
            data = memoryview(self.wire)[len(self.wire) - self.size :]
            self.wire = b"".join((_read_head(self.size + len(value)), data, value))
        else:
            self.wire = b"".join((_read_head(len(value)), value))
        self.size += len(value)

    def chunk(self) -> ReadChunk:
        return ReadChunk(self.wire)


def decode_read_response(raw: bytes) -> bytes:
    """A ReadResponse's data, in one copy (the protobuf runtime parses it into
    its arena, then `.data` copies it again).  Anything but the one field is
    handed to the protobuf runtime."""
    if not raw:
        return b""
    if raw[0] == _READ_DATA_TAG:
        try:
            n, pos = _varint(raw, 1)
        except ValueError:
            n = pos = -1
        if pos + n == len(raw):
            return raw[pos:]
    return pb.ReadResponse.FromString(raw).data  # raises DecodeError on a malformed message


def encode_read_response(m: ReadChunk | pb.ReadResponse) -> bytes:
    """A ReadResponse's bytes: a ReadChunk is already encoded."""
    if isinstance(m, pb.ReadResponse):
        return m.SerializeToString()
    return m.wire
