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
    """A ReadResponse the servicer answers with (Read, ReadStream): its data,
    encoded by encode_read_response with one copy."""

    data: bytes


def encode_read_response(m: ReadChunk | pb.ReadResponse) -> bytes:
    """A ReadResponse's bytes: `data` (field 2) after its tag and length, in
    one copy (the protobuf runtime copies it into its arena, serializes it
    into a buffer of its own and copies that into `bytes`: three copies of a
    fresh 1 MiB each, for every message of a stop-copy stream)."""
    if isinstance(m, pb.ReadResponse):
        return m.SerializeToString()
    if not m.data:
        return b""  # proto3: an empty bytes field is not on the wire
    return b"".join((bytes((_READ_DATA_TAG,)), _put_varint(len(m.data)), m.data))
