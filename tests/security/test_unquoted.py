"""Errno messages never quote stream or file bytes (issue 12, item 5).

Against the main: a client that wrote a file it could not read into a
resuming fd (WriteFrom through a mapped segment) got its bytes back in the
errno messages, 8 at a time ("record of N bytes", "unknown mandatory record
tag").  Here the attacker's file holds a recognizable secret, shaped as each
refused record (a record past the LOAD size, a mandatory record of an
unknown tag, an image past the client's buffer budget, an image the firmware
refuses), and goes into a resuming fd of its own by WriteFrom, by
WriteFromStream (answered in band) and by Write: no answer, no ErrorInfo
metadata and no error event the admin watches contains any 8-byte window of
the file, nor any 4- or 8-byte window read as a number.  The victim migrates
meanwhile."""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from driver.api.v1 import vfio_pb2 as pb
from driver.mlx5.cmd import MIGRATION_HEADER, MLX5_MIGF_HEADER_TAG_FW_DATA
from tests.security.rig import (
    ADMIN,
    ATTACKER,
    VICTIM,
    Parties,
    S,
    Victim,
    events_until,
    map_user_memory,
    subscribe,
    write_from,
)
from tests.support.driver_service import VfioCallError, VfioClient

pytestmark = pytest.mark.grpc

SEG = 1 << 16
# Recognizable, and random so that no message can hold it by chance.
SECRET = b"SECRET:" + secrets.token_hex(20).encode() + b":lab-signing-key"


def _stream(shape: str) -> bytes:
    """The attacker's file: the secret shaped as a record the driver refuses."""
    if shape == "record-past-the-load-size":
        return SECRET  # its first 8 bytes are the record size
    if shape == "mandatory-unknown-tag":
        return struct.pack("<QI", 0, 0) + SECRET  # its first 4 bytes are the tag
    if shape == "image-past-the-budget":
        size = struct.unpack_from("<I", SECRET)[0]  # ~1.4 GiB, over the 1 GiB budget
        return MIGRATION_HEADER.pack(size, 0, MLX5_MIGF_HEADER_TAG_FW_DATA) + SECRET
    assert shape == "image-the-firmware-refuses"
    image = SECRET * (4096 // len(SECRET) + 1)
    return MIGRATION_HEADER.pack(len(image), 0, MLX5_MIGF_HEADER_TAG_FW_DATA) + image


SHAPES = [
    "record-past-the-load-size",
    "mandatory-unknown-tag",
    "image-past-the-budget",
    "image-the-firmware-refuses",
]


def _forms(data: bytes) -> set[str]:
    """How bytes of `data` could show in a message: any 8-byte window as
    text, any 4- or 8-byte window as a number (decimal or hex, either byte
    order)."""
    forms: set[str] = set()
    for i in range(len(data) - 3):
        for n in (4, 8):
            window = data[i : i + n]
            if len(window) < n:
                continue
            if n == 8:
                forms.add(window.decode("latin-1"))
            for v in (int.from_bytes(window, "little"), int.from_bytes(window, "big")):
                forms.update({str(v), f"{v:x}", f"{v:X}"})
    return {f for f in forms if len(f) >= 8}


def _quoted(texts: list[str], secret_file: bytes) -> list[str]:
    forms = _forms(secret_file)
    return [f for t in texts for f in forms if f in t]


def _texts(e: VfioCallError) -> list[str]:
    return [e.info.message, *e.info.metadata.keys(), *e.info.metadata.values()]


@pytest.fixture(name="secret_file")
def secret_file_fixture(mtls: Parties) -> Iterator[Callable[[bytes], str]]:
    """Write a file of the attacker's into the driver's shm directory (mode
    0600): its name."""
    made: list[Path] = []

    def make(data: bytes) -> str:
        path = mtls.stack.shm_dir / f"attacker-file-{secrets.token_hex(8)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data.ljust(SEG, b"\0"))
        made.append(path)
        return path.name

    yield make
    for path in made:
        path.unlink(missing_ok=True)


async def _resuming(p: Parties, client: VfioClient) -> tuple[int, int]:
    """A new VF of the attacker's in RESUMING: (device fd, resuming fd)."""
    (vf,) = await p.vfs(1)
    fd = await client.open_device(vf.name)
    await client.set_state(fd, S.STOP)
    return fd, await client.set_state(fd, S.RESUMING)


async def _write(how: str, client: VfioClient, fd: int, addr: int, data: bytes) -> list[str]:
    """Write the file into resuming fd `fd` one way: the texts of the
    refusal (message, ErrorInfo metadata, or WriteFromStream's in-band
    message), or [] when the driver took it all."""
    try:
        if how == "WriteFrom":
            assert await write_from(client, fd, addr, len(data)) == len(data)
        elif how == "Write":
            assert await client.write(fd, [data]) == len(data)
        else:

            async def requests() -> AsyncIterator[pb.WriteFromRequest]:
                yield pb.WriteFromRequest(fd=fd, addr=addr, count=len(data))

            call = client.stub.WriteFromStream(requests(), metadata=client.metadata)
            answers = [a async for a in call]
            if answers[-1].errno:
                return [a.message for a in answers]
            assert sum(a.count for a in answers) == len(data), answers
    except VfioCallError as e:
        return _texts(e)
    return []


@pytest.mark.parametrize("shape", SHAPES)
async def test_no_answer_quotes_the_file(
    mtls: Parties, secret_file: Callable[[bytes], str], shape: str
) -> None:
    data = _stream(shape)
    name = secret_file(data)
    victim, attacker = await mtls.vfio(VICTIM), await mtls.vfio(ATTACKER, "writer")
    admin = await mtls.vfio(ADMIN, "admin-watch")
    events = await subscribe(admin)
    v = await Victim.start(mtls, victim)
    addr = await map_user_memory(attacker, name, SEG)
    texts: list[str] = []
    for how in ("WriteFrom", "WriteFromStream", "Write"):
        fd, resuming = await _resuming(mtls, attacker)
        refusal = await _write(how, attacker, resuming, addr, data)
        if not refusal:
            # Only an image is taken whole: the firmware refuses it at LOAD.
            assert shape == "image-the-firmware-refuses", how
            with pytest.raises(VfioCallError) as e:
                await attacker.set_state(fd, S.STOP)
            refusal = _texts(e.value)
        assert refusal and refusal[0], how
        texts += refusal
        await attacker.close(resuming)
        await attacker.close(fd)
    await v.drain()
    await v.finish()

    with pytest.raises(VfioCallError):
        await admin.close(99)  # a marker: the admin's own error event, last
    seen = await events_until(
        events, lambda ev: ev.client == "admin-watch" and ev.WhichOneof("kind") == "error"
    )
    errors = [e.error for e in seen if e.client == "writer" and e.WhichOneof("kind") == "error"]
    assert len(errors) >= 3, "the admin saw too few of the attacker's errors"
    texts += [e.message for e in errors]
    assert _quoted(texts, data) == [], texts
    events.cancel()
