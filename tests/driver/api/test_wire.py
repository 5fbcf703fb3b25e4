"""driver/service/wire.py against the protobuf runtime: the same bytes on the
wire both ways, for any fd and payload, unknown fields included."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from driver.api.v1 import vfio_pb2 as pb
from driver.api.wire import (
    ReadAnswer,
    ReadChunk,
    WriteChunk,
    _put_varint,
    decode_read_response,
    decode_write_request,
    encode_read_response,
    encode_write_request,
)

fds = st.integers(-(2**31), 2**31 - 1)
payloads = st.binary(max_size=300)


@given(fds, payloads)
def test_encoding_is_what_protobuf_writes(fd: int, data: bytes) -> None:
    assert encode_write_request(WriteChunk(fd, data)) == pb.WriteRequest(
        fd=fd, data=data
    ).SerializeToString(deterministic=True)


@given(st.binary(max_size=300) | st.sampled_from([b"", b"\x00" * (1 << 20)]))
def test_read_response_encoding_is_what_protobuf_writes(data: bytes) -> None:
    """Read and ReadStream answer with one copy of the data, and the same
    bytes on the wire as the protobuf runtime's (which the encoder also
    serializes, given a ReadResponse)."""
    wire = pb.ReadResponse(data=data).SerializeToString(deterministic=True)
    assert encode_read_response(ReadChunk.of(data)) == wire
    assert encode_read_response(ReadChunk.of(memoryview(data))) == wire
    assert encode_read_response(pb.ReadResponse(data=data)) == wire


@given(st.lists(st.binary(min_size=1, max_size=200), max_size=4))
def test_a_read_answer_is_what_protobuf_writes_for_the_pieces_read_into_it(
    pieces: list[bytes],
) -> None:
    """A read(2) into a ReadAnswer, in pieces (one per driver buffer it
    spans), answers the ReadResponse of the bytes read."""
    whole = b"".join(pieces)
    answer = ReadAnswer(len(whole) + 5)
    done = 0
    for p in pieces:
        answer[done : done + len(p)] = memoryview(p)
        done += len(p)
    assert answer.size == len(whole)
    wire = pb.ReadResponse(data=whole).SerializeToString(deterministic=True)
    assert encode_read_response(answer.chunk()) == wire


def test_a_read_answer_takes_the_pieces_of_one_read_in_order() -> None:
    answer = ReadAnswer(8)
    answer[0:4] = memoryview(b"abcd")
    with pytest.raises(ValueError):
        answer[0:4] = memoryview(b"abcd")  # not where the read is
    with pytest.raises(ValueError):
        answer[4:9] = memoryview(b"efghi")  # past the read's count
    assert len(answer) == 8 and answer.size == 4


@given(payloads | st.sampled_from([b"\x00" * (1 << 20)]))
def test_read_response_decoding_reads_what_protobuf_writes(data: bytes) -> None:
    raw = pb.ReadResponse(data=data).SerializeToString()
    got = decode_read_response(raw)
    assert type(got) is bytes and got == data


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a\x01a\x0a\x02bc",  # the field twice: the last wins
        b"\x0a\x01a\x10\x05",  # an unknown field after it
        b"\x10\x05\x0a\x01a",  # and before it
        b"\x0a\x81\x00a",  # a length in an overlong varint
    ],
)
def test_read_responses_encoded_otherwise_decode_as_protobuf_decodes_them(raw: bytes) -> None:
    assert decode_read_response(raw) == pb.ReadResponse.FromString(raw).data


@pytest.mark.parametrize("raw", [b"\x0a\x05ab", b"\x0a", b"\x0a\xff"])
def test_malformed_read_responses_fail_as_protobuf_fails(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_read_response(raw)


@given(fds, payloads)
def test_decoding_reads_what_protobuf_writes(fd: int, data: bytes) -> None:
    got = decode_write_request(pb.WriteRequest(fd=fd, data=data).SerializeToString())
    assert (got.fd, bytes(got.data)) == (fd, data)


@given(fds, payloads, st.integers(3, 1000), st.binary(max_size=20))
def test_unknown_fields_are_left_to_protobuf(
    fd: int, data: bytes, field: int, extra: bytes
) -> None:
    raw = pb.WriteRequest(fd=fd, data=data).SerializeToString()
    tag = (field << 3) | 2
    raw += _put_varint(tag) + _put_varint(len(extra)) + extra
    got = decode_write_request(raw)
    assert (got.fd, bytes(got.data)) == (fd, data)


def test_payload_is_a_view_of_the_received_buffer() -> None:
    raw = encode_write_request(WriteChunk(3, b"x" * 1024))
    got = decode_write_request(raw)
    assert isinstance(got.data, memoryview) and got.data.obj is raw


@pytest.mark.parametrize("raw", [b"\x12\x05ab", b"\x08", b"\x12"])
def test_malformed_messages_fail_as_protobuf_fails(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_write_request(raw)


def test_the_server_decodes_write_encodes_reads_and_registers_the_rest_as_generated() -> None:
    from driver.api.v1 import vfio_pb2_grpc as pbg
    from driver.service.server import VFIO_SERVICE, _Captured, add_vfio_servicer

    class Server:
        def __init__(self) -> None:
            self.generic: list[object] = []
            self.registered: dict[str, dict] = {}

        def add_generic_rpc_handlers(self, handlers: object) -> None:
            self.generic.append(handlers)

        def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
            self.registered[service] = handlers

    servicer = pbg.VfioServicer()  # the generated base: every method there
    generated = _Captured()
    pbg.add_VfioServicer_to_server(servicer, generated)  # type: ignore[arg-type]
    server = Server()
    add_vfio_servicer(servicer, server)  # type: ignore[arg-type]
    handlers = server.registered[VFIO_SERVICE]
    assert handlers.keys() == generated.handlers.keys() and server.generic
    assert handlers["Write"].request_deserializer is decode_write_request
    for name in ("Read", "ReadStream"):
        assert handlers[name].response_serializer is encode_read_response
    for name, h in handlers.items():
        if name != "Write":
            assert h.request_deserializer == generated.handlers[name].request_deserializer
        if name not in ("Read", "ReadStream"):
            assert h.response_serializer == generated.handlers[name].response_serializer
