"""The migration stream's codec (vfioclient/migration/wire.py) without a
socket: valid streams decode the same whatever the split, arbitrary bytes
only ever raise WireError (never anything else, never a wait without bound),
and each hostile case names what is wrong."""

from __future__ import annotations

import contextlib
import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfioclient.migration import wire

DEV = [wire.DeviceSpec(0, "0000:81:00.1", "0000:81:00.2", 4096), wire.DeviceSpec(1, "a", "b", 64)]


def forward_stream(payloads: list[bytes]) -> bytes:
    out = [wire.header(DEV, "yes"), wire.setup_state(0), wire.setup_state(1)]
    for i, p in enumerate(payloads):
        section = i % 2
        p = p[: DEV[section].buffer_size] or b"x"
        out += [wire.data_header(section, len(p)), p]
    out += [wire.init_data_sent(0, 1), wire.init_data_sent(1, 7)]
    out += [wire.end_of_state(0), wire.end_of_state(1), wire.complete(), wire.run()]
    return b"".join(out)


def return_stream() -> bytes:
    return b"".join(
        [
            wire.ready([wire.ReadyDevice(0, "shm", True), wire.ReadyDevice(1, "grpc", True)]),
            wire.switchover_ack(0, 1),
            wire.switchover_ack(1, 7),
            wire.loaded({0: "d0", 1: "d1"}),
            wire.running(),
        ]
    )


def decode_split(direction: wire.Direction, data: bytes, cuts: list[int]) -> list[wire.Event]:
    """Feed `data` in pieces cut at `cuts`; payload pieces joined back."""
    d = wire.Decoder(direction)
    events: list[wire.Event] = []
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for a, b in itertools.pairwise(bounds):
        d.feed(data[a:b])
        while (ev := d.next_event()) is not None:
            if isinstance(ev, wire.Payload) and events and isinstance(events[-1], wire.Payload):
                events[-1] = wire.Payload(ev.section, events[-1].data + ev.data)
            else:
                events.append(ev)
    d.eof()
    return events


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=6), st.lists(st.integers(0, 1 << 16)))
def test_a_valid_forward_stream_decodes_alike_whatever_the_split(
    payloads: list[bytes], cuts: list[int]
) -> None:
    data = forward_stream(payloads)
    whole = decode_split("forward", data, [])
    assert decode_split("forward", data, cuts) == whole
    assert isinstance(whole[0], wire.Header) and whole[0].devices == tuple(DEV)
    assert isinstance(whole[-1], wire.Run)
    sent = [p[: DEV[i % 2].buffer_size] or b"x" for i, p in enumerate(payloads)]
    assert [e.data for e in whole if isinstance(e, wire.Payload)] == sent


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 1 << 10)))
def test_a_valid_return_path_decodes_alike_whatever_the_split(cuts: list[int]) -> None:
    events = decode_split("return", return_stream(), cuts)
    assert events == [
        wire.Ready((wire.ReadyDevice(0, "shm", True), wire.ReadyDevice(1, "grpc", True))),
        wire.SwitchoverAck(0, 1),
        wire.SwitchoverAck(1, 7),
        wire.Loaded({0: "d0", 1: "d1"}),
        wire.Running(),
    ]


def drain(direction: wire.Direction, data: bytes) -> None:
    d = wire.Decoder(direction, max_payload=1 << 16)
    d.feed(data)
    while d.next_event() is not None:
        pass
    d.eof()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from(["forward", "return"]))
def test_arbitrary_bytes_raise_only_wire_errors(data: bytes, direction: wire.Direction) -> None:
    """Garbage never decodes to a full stream: WireError, nothing else
    (every call returns at once: the decoder has no I/O to wait on)."""
    with pytest.raises(wire.WireError):
        drain(direction, data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10_000), st.binary(min_size=1, max_size=16))
def test_a_valid_stream_with_bytes_changed_never_raises_anything_else(at: int, junk: bytes) -> None:
    data = bytearray(forward_stream([b"abc" * 50, b"z" * 60]))
    at %= len(data)
    data[at : at + len(junk)] = junk
    with contextlib.suppress(wire.WireError):
        drain("forward", bytes(data))


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        (b"XXXXXXXX" + bytes(8), "not a migration stream"),
        (wire._QII.pack(wire.MAGIC, 2, 0), "version 2"),
        (wire._QII.pack(wire.MAGIC, 1, wire.MAX_JSON + 1), "over"),
        (wire.header(DEV) + wire.data_header(0, 4097) + bytes(4097), "not in 1..4096"),
        (wire.header(DEV) + wire.data_header(1, 0), "not in 1..64"),
        (wire.header(DEV) + wire._Q.pack(0xFFFFFFFFEF100002), "unknown tag"),
        (wire.header(DEV) + wire.end_of_state(2), "never declared"),
        (wire.header(DEV) + wire.end_of_state(0) + wire.setup_state(0), "after its END_OF_STATE"),
        (wire.header(DEV) + wire.complete(), "COMPLETE before every device"),
        (wire.header(DEV) + wire.run(), "RUN before COMPLETE"),
        (wire.header(DEV) + wire.data_header(0, 10) + b"12345", "truncated"),
        (wire.header(DEV) + wire.setup_state(0), "ended early"),
        (wire.header([]), "'devices' must be a list"),
        (wire.header([wire.DeviceSpec(1, "a", "b", 1)]), "section 0"),
        (wire.header([wire.DeviceSpec(0, "a", "", 1)]), "'destination'"),
        (wire.header([wire.DeviceSpec(0, "a", "b", 1 << 30)]), "'buffer_size'"),
        (wire.header(DEV, "maybe"), "'verify'"),
    ],
)
def test_a_hostile_forward_stream_names_what_is_wrong(stream: bytes, match: str) -> None:
    with pytest.raises(wire.WireError, match=match):
        d = wire.Decoder("forward", max_payload=1 << 16)
        d.feed(stream)
        while d.next_event() is not None:
            pass
        d.eof()


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        (wire.switchover_ack(0, 1), "before READY"),
        (wire.running(), "RUNNING before LOADED"),
        (wire.ready([wire.ReadyDevice(0, "shm", True)]) + wire.loaded({5: "x"}), "not a section"),
        (wire._QII.pack(wire.RP_ERROR, 5, wire.MAX_REASON + 1), "over"),
    ],
)
def test_a_hostile_return_path_names_what_is_wrong(stream: bytes, match: str) -> None:
    with pytest.raises(wire.WireError, match=match):
        drain("return", stream)


def test_abort_and_error_end_their_streams() -> None:
    evs = wire.decode_all("forward", wire.header(DEV) + wire.abort(5, "gone"))
    assert evs[-1] == wire.Abort(5, "gone")
    assert wire.decode_all("return", wire.error(16, "busy")) == [wire.Error(16, "busy")]
    with pytest.raises(wire.WireError, match="after the end"):
        wire.decode_all("return", wire.error(16, "busy") + wire.running())


def test_a_payload_may_be_read_past_the_decoder() -> None:
    """The zero-copy path: after DataHeader the caller reads the payload
    itself and says how much; the decoder goes on after it."""
    d = wire.Decoder("forward")
    d.feed(wire.header(DEV) + wire.data_header(0, 100) + b"a" * 10)
    assert isinstance(d.next_event(), wire.Header)
    assert d.next_event() == wire.DataHeader(0, 100)
    assert d.next_event() == wire.Payload(0, b"a" * 10)
    assert d.payload_remaining == 90
    d.payload_taken(90)
    d.feed(wire.end_of_state(0))
    assert d.next_event() == wire.EndOfState(0)


def test_loaded_carries_the_destination_digest_time_within_bounds() -> None:
    """LOADED says how long the destination spent on its digests (the source
    keeps that out of the downtime); an absurd value is refused."""
    ready = wire.ready([wire.ReadyDevice(0, "shm", True)])
    evs = wire.decode_all("return", ready + wire.loaded({0: "d"}, 0.25))
    assert evs[-1] == wire.Loaded({0: "d"}, 0.25)
    assert wire.decode_all("return", ready + wire.loaded({0: "d"}))[-1] == wire.Loaded({0: "d"})
    for absurd in (-1.0, float("nan"), float("inf"), 1e9, "1", True, None):
        body = json.dumps({"digests": {"0": "d"}, "digest_s": absurd}).encode()
        raw = wire._QI.pack(wire.RP_LOADED, len(body)) + body
        with pytest.raises(wire.WireError, match="digest_s"):
            drain("return", ready + raw)
