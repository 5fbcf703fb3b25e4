"""Values no mailbox can carry, given to the model's Python API directly (as the
embedded mode and InProcessLink do): refused with BAD_PARAM like any field that
does not fit its bits, never obeyed."""

from __future__ import annotations

import pytest

from fwemu.link.ifc import CmdStatus, KiB, SaveCompletion, Syndrome, VfConfig
from fwemu.model import Firmware, VirtualClock

BAD_PARAM = CmdStatus.BAD_PARAM_ERR


@pytest.fixture
def fw() -> Firmware:
    f = Firmware(VirtualClock(), seed=1)
    f.create_vfs(2, VfConfig(size=64 * KiB, dirty_bytes_per_s=0))
    return f


def mkey_of(fw: Firmware, n: int) -> tuple[int, bytearray]:
    buf = bytearray(n)
    res = fw.create_mkey(memoryview(buf))
    assert res.ok
    return res.mkey, buf


def suspend_fully(fw: Firmware, vhca: int) -> None:
    assert fw.suspend_vhca(vhca, 0).ok
    assert fw.suspend_vhca(vhca, 1).ok


def test_negative_vhca_id_op_mod_and_mkey_are_refused(fw):
    """Negative vhca_id, op_mod and mkey are refused like any value that does not fit."""
    assert fw.query_vhca_migration_state(-1).status == BAD_PARAM
    assert fw.suspend_vhca(1, -1).status == BAD_PARAM
    assert fw.resume_vhca(1, -1).status == BAD_PARAM
    assert fw.query_hca_cap(-1, True, 1).status == BAD_PARAM
    assert fw.function_level_reset(-1).status == BAD_PARAM
    assert fw.save_vhca_state(1, set_track=True, mkey=-1, size=4096).status == CmdStatus.BAD_RES_ERR
    assert fw.save_vhca_state(1, op_mod=-1, set_track=True, mkey=1, size=1).status == BAD_PARAM


def test_negative_save_size_is_bad_param(fw):
    """README: size 0 or above 2^32-1 is BAD_PARAM; a negative size fits no 32-bit field either."""
    suspend_fully(fw, 1)
    mkey, buf = mkey_of(fw, 256 * KiB)
    res = fw.save_vhca_state(1, mkey=mkey, size=-1)
    assert (res.status, res.syndrome) == (BAD_PARAM, Syndrome.BAD_SIZE)
    assert buf == bytearray(len(buf))


def test_negative_save_va_is_bad_param(fw):
    """A range outside the mkey is BAD_PARAM; a negative va lies outside it."""
    suspend_fully(fw, 1)
    n = 128 * KiB
    mkey, buf = mkey_of(fw, 2 * n)
    res = fw.save_vhca_state(1, mkey=mkey, size=n, va=-2 * n)
    assert res.status == BAD_PARAM
    assert buf == bytearray(len(buf))


def test_negative_load_va_is_bad_param(fw):
    """A range outside the mkey is BAD_PARAM for LOAD; the VF is unchanged."""
    done: list[SaveCompletion] = []
    fw.subscribe(done.append)
    suspend_fully(fw, 1)
    suspend_fully(fw, 2)
    n = fw.query_vhca_migration_state(1).required_umem_size
    mkey, _ = mkey_of(fw, 2 * n)
    assert fw.save_vhca_state(1, mkey=mkey, size=n).ok
    fw.clock.advance(0)
    size = done[-1].actual_image_size
    before = fw.digest(2)
    res = fw.load_vhca_state(2, mkey=mkey, size=size, va=-2 * n)
    assert res.status == BAD_PARAM
    assert fw.digest(2) == before
