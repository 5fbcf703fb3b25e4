"""LOAD_VHCA_STATE under fuzzing: mutated valid images (resealed, so that the
mutations get past the checksums) and random bytes, through the firmware's
LOAD command on a small VF.  Whatever the bytes, LOAD answers with a status:
no exception, every refusal has a status and a syndrome, and a refused LOAD
leaves the VF's digest as it was.

A few hundred examples per run; VFIO_FUZZ_EXAMPLES=1000000 runs longer.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fwemu.link.ifc import KiB, VfConfig
from fwemu.model import Firmware, VirtualClock
from fwemu.model.image import IMAGE_HEADER_SIZE
from tests.fwemu.model.test_load import reseal
from tests.support.fwemu_model import load_bytes, save_image, suspend_fully

EXAMPLES = int(os.environ.get("VFIO_FUZZ_EXAMPLES", "300"))
SIZE = 16 * KiB

pytestmark = pytest.mark.timeout(max(120, EXAMPLES // 100))


def _setup() -> tuple[Firmware, int, list[bytes]]:
    fw = Firmware(VirtualClock(), seed=9, memory_limit=64 << 20)
    src, dst = (v.vhca_id for v in fw.create_vfs(2, VfConfig(size=SIZE, reconfig_bytes=8 * KiB)))
    images = [save_image(fw, src)]
    fw.advance_clock(0.5)
    fw.reconfigure(src)
    images.append(save_image(fw, src, incremental=True))
    suspend_fully(fw, dst)
    return fw, dst, images


FW, DST, IMAGES = _setup()

_u64 = st.integers(0, (1 << 64) - 1)
_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("u64"), st.integers(0, 1 << 20), _u64),
    st.tuples(st.just("u32"), st.integers(0, 1 << 20), st.integers(0, (1 << 32) - 1)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("grow"), st.integers(1, 64), st.just(0)),
)


def _mutate(img: bytes, mutations: list[tuple[str, int, int]]) -> bytearray:
    b = bytearray(img)
    for kind, at, value in mutations:
        at %= max(len(b), 1)
        if kind == "flip" and b:
            b[at] ^= value
        elif kind == "u64" and at + 8 <= len(b):
            struct.pack_into("<Q", b, at, value)
        elif kind == "u32" and at + 4 <= len(b):
            struct.pack_into("<I", b, at, value)
        elif kind == "cut":
            del b[at:]
        elif kind == "grow":
            b.extend(bytes(at))
    return b


_inputs = st.one_of(
    st.tuples(
        st.sampled_from(range(len(IMAGES))),
        st.lists(_mutation, min_size=1, max_size=4),
        st.booleans(),
    ).map(lambda t: (IMAGES[t[0]], t[1], t[2])),
    st.binary(min_size=1, max_size=512).map(lambda b: (b, [], False)),
)


def _check(data: bytes) -> None:
    before = FW.digest(DST)
    res = load_bytes(FW, DST, data)  # any exception fails the test
    event(f"syndrome {res.syndrome:#x}")
    if res.ok:
        return
    assert res.status != 0 and res.syndrome != 0, res
    assert res.diagnostic
    assert FW.digest(DST) == before, res


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_inputs)
def test_load_answers_any_bytes_with_a_status(case: tuple[bytes, list, bool]) -> None:
    img, mutations, sealed = case
    data = _mutate(img, mutations)
    if sealed and len(data) >= IMAGE_HEADER_SIZE:
        data = bytearray(reseal(data))
    if data:
        _check(bytes(data))


def test_the_seeds_of_the_fuzzer_load() -> None:
    """The valid images the mutations start from do load (so mutations reach
    every check, not only the first)."""
    fw, dst, images = _setup()
    for img in images:
        assert load_bytes(fw, dst, img).ok
