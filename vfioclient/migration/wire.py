"""The migration stream between two agents as bytes: a pure codec, no sockets
(the caller owns them, as h11's does).

QEMU's VFIO section is a sequence of be64 tags (hw/vfio/migration.c); the
device tags here are QEMU's, each followed by the be32 section id of the
device (QEMU's section header names it), and the payload of DEV_DATA_STATE
goes as QEMU's does: be64 length, then the bytes.

Forward (source -> destination):

    header    be64 MAGIC ("VFIOMIGR"), be32 VERSION, be32 n, n bytes of JSON
              {"devices": [{"section", "source", "destination", "buffer_size"}],
               "verify": "auto" | "yes" | "no"}  (QEMU describes its devices in
              JSON too: QEMU_VM_VMDESCRIPTION)
    0xffffffffef100003 DEV_SETUP_STATE    be32 section
    0xffffffffef100004 DEV_DATA_STATE     be32 section, be64 length, payload
    0xffffffffef100005 DEV_INIT_DATA_SENT be32 section, be64 ack generation
    0xffffffffef100001 END_OF_STATE       be32 section: the device's data ends
    0xffffffffef100011 COMPLETE           every device ended: load, stop, say LOADED
    0xffffffffef100012 RUN                start the destinations, say RUNNING
    0xffffffffef100013 ABORT              be32 errno, be32 n, n bytes UTF-8 reason

Return path (destination -> source; QEMU's MIG_RP_MSG_*, as tags of their own):

    0xffffffffef200001 READY              be32 n, JSON {"devices": [{"section",
                                          "data_path", "verify"}]}: every device RESUMING
    0xffffffffef200002 SWITCHOVER_ACK     be32 section, be64 generation (the one
                                          DEV_INIT_DATA_SENT carried)
    0xffffffffef200003 LOADED             be32 n, JSON {"digests": {section: digest},
                                          "digest_s": seconds spent on them}
    0xffffffffef200004 RUNNING
    0xffffffffef200005 ERROR              be32 errno, be32 n, n bytes UTF-8 reason

Every length is bounded (a payload by the decoder's `max_payload`, JSON by
MAX_JSON, a reason by MAX_REASON); an unknown tag, a section never declared,
a message out of order (data after the device's END_OF_STATE, RUN before
COMPLETE) or a truncated stream raises WireError before any event of it is
returned."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

MAGIC = 0x5646494F4D494752  # b"VFIOMIGR"
VERSION = 1

# QEMU's VFIO_MIG_FLAG_* (hw/vfio/migration.c)
END_OF_STATE = 0xFFFFFFFFEF100001
DEV_SETUP_STATE = 0xFFFFFFFFEF100003
DEV_DATA_STATE = 0xFFFFFFFFEF100004
DEV_INIT_DATA_SENT = 0xFFFFFFFFEF100005
# Ours, after QEMU's in the same family: QEMU_VM_EOF and the VM start / cancel.
COMPLETE = 0xFFFFFFFFEF100011
RUN = 0xFFFFFFFFEF100012
ABORT = 0xFFFFFFFFEF100013
# The return path (QEMU's MIG_RP_MSG_*).
RP_READY = 0xFFFFFFFFEF200001
RP_SWITCHOVER_ACK = 0xFFFFFFFFEF200002
RP_LOADED = 0xFFFFFFFFEF200003
RP_RUNNING = 0xFFFFFFFFEF200004
RP_ERROR = 0xFFFFFFFFEF200005

MAX_JSON = 64 << 10  # the header, READY, LOADED
MAX_DIGEST_S = 3600.0  # LOADED's digest time: the longest a sane hash of a VF takes
MAX_REASON = 4096
MAX_DEVICES = 64
MAX_NAME = 256
MAX_PAYLOAD = 16 << 20  # a decoder's default bound on one DEV_DATA_STATE

_Q = struct.Struct(">Q")
_QII = struct.Struct(">QII")
_QI = struct.Struct(">QI")
_QIQ = struct.Struct(">QIQ")

Direction = Literal["forward", "return"]
VERIFY_MODES = ("auto", "yes", "no")


class WireError(ValueError):
    """The bytes are not a valid migration stream (EPROTO)."""


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    section: int
    source: str
    destination: str
    buffer_size: int


@dataclass(frozen=True)
class Header:
    devices: tuple[DeviceSpec, ...]
    verify: str = "auto"


@dataclass(frozen=True)
class SetupState:
    section: int


@dataclass(frozen=True)
class DataHeader:
    """A DEV_DATA_STATE of `length` bytes: Payload events (or the caller's
    direct reads, `Decoder.payload_taken`) follow until they are all in."""

    section: int
    length: int


@dataclass(frozen=True)
class Payload:
    section: int
    data: bytes


@dataclass(frozen=True)
class InitDataSent:
    section: int
    generation: int


@dataclass(frozen=True)
class EndOfState:
    section: int


@dataclass(frozen=True)
class Complete:
    pass


@dataclass(frozen=True)
class Run:
    pass


@dataclass(frozen=True)
class Abort:
    errno: int
    reason: str


@dataclass(frozen=True)
class ReadyDevice:
    section: int
    data_path: str
    verify: bool


@dataclass(frozen=True)
class Ready:
    devices: tuple[ReadyDevice, ...]


@dataclass(frozen=True)
class SwitchoverAck:
    section: int
    generation: int


@dataclass(frozen=True)
class Loaded:
    digests: dict[int, str] = field(default_factory=dict)
    digest_s: float = 0.0  # the destination's time on them: verification, not downtime


@dataclass(frozen=True)
class Running:
    pass


@dataclass(frozen=True)
class Error:
    errno: int
    reason: str


Event = (
    Header | SetupState | DataHeader | Payload | InitDataSent | EndOfState | Complete | Run | Abort
    | Ready | SwitchoverAck | Loaded | Running | Error
)  # fmt: skip


# --- encoding --------------------------------------------------------------------------


def _json(doc: Any) -> bytes:
    body = json.dumps(doc, separators=(",", ":")).encode()
    if len(body) > MAX_JSON:
        raise WireError(f"a JSON body of {len(body)} bytes is over {MAX_JSON}")
    return body


def _reason(tag: int, code: int, reason: str) -> bytes:
    text = reason.encode("utf-8", "replace")[:MAX_REASON]
    return _QII.pack(tag, code & 0xFFFFFFFF, len(text)) + text


def header(devices: Sequence[DeviceSpec], verify: str = "auto") -> bytes:
    body = _json(
        {
            "devices": [
                {
                    "section": d.section,
                    "source": d.source,
                    "destination": d.destination,
                    "buffer_size": d.buffer_size,
                }
                for d in devices
            ],
            "verify": verify,
        }
    )
    return _QII.pack(MAGIC, VERSION, len(body)) + body


def setup_state(section: int) -> bytes:
    return _QI.pack(DEV_SETUP_STATE, section)


def data_header(section: int, length: int) -> bytes:
    """DEV_DATA_STATE up to its payload (sent after it, from where it lies)."""
    return _QIQ.pack(DEV_DATA_STATE, section, length)


def init_data_sent(section: int, generation: int) -> bytes:
    return _QIQ.pack(DEV_INIT_DATA_SENT, section, generation)


def end_of_state(section: int) -> bytes:
    return _QI.pack(END_OF_STATE, section)


def complete() -> bytes:
    return _Q.pack(COMPLETE)


def run() -> bytes:
    return _Q.pack(RUN)


def abort(code: int, reason: str) -> bytes:
    return _reason(ABORT, code, reason)


def ready(devices: Sequence[ReadyDevice]) -> bytes:
    body = _json(
        {
            "devices": [
                {"section": d.section, "data_path": d.data_path, "verify": d.verify}
                for d in devices
            ]
        }
    )
    return _QI.pack(RP_READY, len(body)) + body


def switchover_ack(section: int, generation: int) -> bytes:
    return _QIQ.pack(RP_SWITCHOVER_ACK, section, generation)


def loaded(digests: dict[int, str], digest_s: float = 0.0) -> bytes:
    body = _json({"digests": {str(k): v for k, v in digests.items()}, "digest_s": digest_s})
    return _QI.pack(RP_LOADED, len(body)) + body


def running() -> bytes:
    return _Q.pack(RP_RUNNING)


def error(code: int, reason: str) -> bytes:
    return _reason(RP_ERROR, code, reason)


# --- decoding --------------------------------------------------------------------------

# The fixed part after the tag of each tag, by direction.
_FORWARD_FIXED = {
    DEV_SETUP_STATE: 4,
    DEV_DATA_STATE: 12,
    DEV_INIT_DATA_SENT: 12,
    END_OF_STATE: 4,
    COMPLETE: 0,
    RUN: 0,
    ABORT: 8,
}
_RETURN_FIXED = {
    RP_READY: 4,
    RP_SWITCHOVER_ACK: 12,
    RP_LOADED: 4,
    RP_RUNNING: 0,
    RP_ERROR: 8,
}


def _str(doc: dict[str, Any], key: str, limit: int = MAX_NAME) -> str:
    v = doc.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= limit:
        raise WireError(f"{key!r} must be a string of 1 to {limit} characters")
    return v


def _int(doc: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = doc.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise WireError(f"{key!r} must be an integer in [{lo}, {hi}]")
    return v


def _load_json(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"{what}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise WireError(f"{what}: not a JSON object")
    return doc


def _sections(items: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(items, list) or not 0 < len(items) <= MAX_DEVICES:
        raise WireError(f"{what}: 'devices' must be a list of 1 to {MAX_DEVICES}")
    for i, d in enumerate(items):
        if not isinstance(d, dict) or d.get("section") != i:
            raise WireError(f"{what}: device {i} must be an object with section {i}")
    return items


class Decoder:
    """One direction of a connection: `feed` it bytes, take `next_event()`s
    until it returns None (more bytes needed).  In a payload, the caller may
    read the rest itself into its own buffer (`payload_remaining` bytes at
    most, once `buffered` is 0) and say so with `payload_taken`.  `eof()`
    says the bytes ended: WireError unless at a clean end."""

    def __init__(
        self, direction: Direction, *, max_payload: int = MAX_PAYLOAD, sections: int = 0
    ) -> None:
        self.direction = direction
        self.max_payload = max_payload
        self._buf = bytearray()
        self._fixed = _FORWARD_FIXED if direction == "forward" else _RETURN_FIXED
        self._payload_section = -1
        self.payload_remaining = 0
        # forward: the header first, then the devices' sections until each one
        # ends, COMPLETE, RUN; ABORT at any time after the header, nothing after it.
        self.sections = sections
        self._ended: set[int] = set()
        self._limits: list[int] = []  # each section's buffer size (its largest payload)
        self.phase = "header" if direction == "forward" else "ready"
        self.done = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.done and data:
            raise WireError("bytes after the end of the stream")
        self._buf += data

    def payload_taken(self, n: int) -> None:
        """The caller read `n` payload bytes itself (nothing was buffered)."""
        if self._buf or not 0 < n <= self.payload_remaining:
            raise ValueError(f"{n} payload bytes taken with {self.payload_remaining} due")
        self.payload_remaining -= n

    def eof(self) -> None:
        if self.payload_remaining or self._buf:
            raise WireError("the stream was cut in the middle of a message (truncated)")
        if not self.done:
            raise WireError(f"the stream ended early (expecting {self.phase})")

    def next_event(self) -> Event | None:
        if self.payload_remaining:
            if not self._buf:
                return None
            n = min(len(self._buf), self.payload_remaining)
            data = bytes(self._buf[:n])
            del self._buf[:n]
            self.payload_remaining -= n
            return Payload(self._payload_section, data)
        if self.done:
            if self._buf:
                raise WireError("bytes after the end of the stream")
            return None
        if self.direction == "forward" and self.phase == "header":
            return self._header()
        if len(self._buf) < 8:
            return None
        (tag,) = _Q.unpack_from(self._buf)
        fixed = self._fixed.get(tag)
        if fixed is None:
            raise WireError(f"unknown tag {tag:#018x} on the {self.direction} stream")
        if len(self._buf) < 8 + fixed:
            return None
        try:
            return self._forward(tag) if self.direction == "forward" else self._return(tag)
        except _More:  # a variable-length body not all in yet: nothing consumed
            return None

    # forward

    def _header(self) -> Event | None:
        if len(self._buf) >= 8:
            (magic,) = _Q.unpack_from(self._buf)
            if magic != MAGIC:
                raise WireError(f"not a migration stream (magic {magic:#018x})")
        if len(self._buf) < 16:
            return None
        _, version, n = _QII.unpack_from(self._buf)
        if version != VERSION:
            raise WireError(f"stream version {version}, this agent speaks {VERSION}")
        if n > MAX_JSON:
            raise WireError(f"a header of {n} bytes is over {MAX_JSON}")
        if len(self._buf) < 16 + n:
            return None
        doc = _load_json(bytes(self._buf[16 : 16 + n]), "header")
        devices = []
        for d in _sections(doc.get("devices"), "header"):
            devices.append(
                DeviceSpec(
                    d["section"],
                    _str(d, "source"),
                    _str(d, "destination"),
                    _int(d, "buffer_size", 1, self.max_payload),
                )
            )
        verify = doc.get("verify", "auto")
        if verify not in VERIFY_MODES:
            raise WireError(f"header: 'verify' must be one of {', '.join(VERIFY_MODES)}")
        del self._buf[: 16 + n]
        self.sections = len(devices)
        self._limits = [d.buffer_size for d in devices]
        self.phase = "devices"
        return Header(tuple(devices), verify)

    def _section(self, offset: int = 8) -> int:
        section: int = struct.unpack_from(">I", self._buf, offset)[0]
        if section >= self.sections:
            raise WireError(f"section {section} was never declared ({self.sections} devices)")
        return section

    def _open_section(self) -> int:
        section = self._section()
        if self.phase != "devices" or section in self._ended:
            raise WireError(f"data for section {section} after its END_OF_STATE")
        return section

    def _forward(self, tag: int) -> Event:
        ev: Event
        if tag == ABORT:
            ev, n = self._reason_event(Abort)
            del self._buf[:n]
            self.done = True
            return ev
        if tag == COMPLETE:
            if self.phase != "devices" or len(self._ended) != self.sections:
                raise WireError("COMPLETE before every device's END_OF_STATE")
            self.phase = "complete"
            ev, n = Complete(), 8
        elif tag == RUN:
            if self.phase != "complete":
                raise WireError("RUN before COMPLETE")
            self.phase, self.done = "run", True
            ev, n = Run(), 8
        elif tag == DEV_DATA_STATE:
            section = self._open_section()
            (length,) = _Q.unpack_from(self._buf, 12)
            limit = self._limits[section] if self._limits else self.max_payload
            if not 0 < length <= limit:
                raise WireError(
                    f"DEV_DATA_STATE of {length} bytes (section {section}): not in 1..{limit}, "
                    "the device's buffer size"
                )
            self._payload_section, self.payload_remaining = section, length
            ev, n = DataHeader(section, length), 20
        elif tag == DEV_INIT_DATA_SENT:
            section = self._open_section()
            (gen,) = _Q.unpack_from(self._buf, 12)
            ev, n = InitDataSent(section, gen), 20
        elif tag == DEV_SETUP_STATE:
            ev, n = SetupState(self._open_section()), 12
        else:  # END_OF_STATE
            section = self._open_section()
            self._ended.add(section)
            ev, n = EndOfState(section), 12
        del self._buf[:n]
        return ev

    # return

    def _reason_event(self, cls: type[Abort] | type[Error]) -> tuple[Abort | Error, int]:
        _, code, n = _QII.unpack_from(self._buf)
        if n > MAX_REASON:
            raise WireError(f"a reason of {n} bytes is over {MAX_REASON}")
        if len(self._buf) < 16 + n:
            raise _More()
        return cls(code, bytes(self._buf[16 : 16 + n]).decode("utf-8", "replace")), 16 + n

    def _json_body(self, what: str) -> tuple[dict[str, Any], int]:
        (n,) = struct.unpack_from(">I", self._buf, 8)
        if n > MAX_JSON:
            raise WireError(f"{what} of {n} bytes is over {MAX_JSON}")
        if len(self._buf) < 12 + n:
            raise _More()
        return _load_json(bytes(self._buf[12 : 12 + n]), what), 12 + n

    def _return(self, tag: int) -> Event:
        ev: Event
        if tag == RP_ERROR:
            ev, n = self._reason_event(Error)
            self.done = True
        elif tag == RP_READY:
            if self.phase != "ready":
                raise WireError("READY twice")
            doc, n = self._json_body("READY")
            items = _sections(doc.get("devices"), "READY")
            if self.sections and len(items) != self.sections:
                raise WireError(f"READY names {len(items)} devices, not {self.sections}")
            devs = []
            for d in items:
                if not isinstance(d.get("verify"), bool):
                    raise WireError("READY: 'verify' must be true or false")
                devs.append(ReadyDevice(d["section"], _str(d, "data_path", 64), d["verify"]))
            self.sections, self.phase = len(devs), "acks"
            ev = Ready(tuple(devs))
        elif tag == RP_SWITCHOVER_ACK:
            if self.phase != "acks":
                raise WireError("SWITCHOVER_ACK before READY or after LOADED")
            (gen,) = _Q.unpack_from(self._buf, 12)
            ev, n = SwitchoverAck(self._section(), gen), 20
        elif tag == RP_LOADED:
            if self.phase != "acks":
                raise WireError("LOADED before READY, or twice")
            doc, n = self._json_body("LOADED")
            raw = doc.get("digests")
            if not isinstance(raw, dict):
                raise WireError("LOADED: 'digests' must be an object")
            digests: dict[int, str] = {}
            for k, v in raw.items():
                if not (isinstance(k, str) and k.isdigit() and int(k) < self.sections):
                    raise WireError(f"LOADED: {k!r} is not a section")
                if not isinstance(v, str) or len(v) > MAX_NAME:
                    raise WireError("LOADED: a digest must be a short string")
                digests[int(k)] = v
            spent = doc.get("digest_s", 0.0)
            if (
                isinstance(spent, bool)
                or not isinstance(spent, int | float)
                or not 0 <= spent <= MAX_DIGEST_S
            ):
                raise WireError(f"LOADED: 'digest_s' must be seconds in [0, {MAX_DIGEST_S}]")
            self.phase = "loaded"
            ev = Loaded(digests, float(spent))
        else:  # RP_RUNNING
            if self.phase != "loaded":
                raise WireError("RUNNING before LOADED")
            self.phase, self.done = "running", True
            ev, n = Running(), 8
        del self._buf[:n]
        return ev


class _More(Exception):
    """A variable-length body not all in yet."""


def decode_all(direction: Direction, data: bytes, **kw: Any) -> list[Event]:
    """Every event of `data` (tests, tools); WireError as the decoder raises it."""
    d = Decoder(direction, **kw)
    d.feed(data)
    out: list[Event] = []
    while (ev := d.next_event()) is not None:
        out.append(ev)
    return out
