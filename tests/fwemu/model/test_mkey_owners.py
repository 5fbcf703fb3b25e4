"""mkeys are unguessable and their principal's alone (fwemu/model/mkeys.py,
issue 12 item 5): ids drawn at random in the mlx5 layout (index << 8 | key),
never 0, never two live with one index; a command of another principal
(SAVE, LOAD, DESTROY_MKEY) answers exactly as for an mkey that does not exist,
and changes nothing."""

from __future__ import annotations

import itertools
import secrets

import pytest

from fwemu.link.ifc import (
    CmdResult,
    CmdStatus,
    KiB,
    LoadVhcaStateIn,
    SaveVhcaStateIn,
    SuspendOpMod,
    Syndrome,
    VfConfig,
)
from fwemu.model import Firmware, VirtualClock

A, B = "spiffe://vfio-mlx5-emu/team-a", "spiffe://vfio-mlx5-emu/team-b"


def test_a_thousand_mkey_ids_are_distinct_nonzero_and_follow_no_step() -> None:
    fw = Firmware(VirtualClock())
    mkeys = [fw.create_mkey(memoryview(bytearray(16)), principal=A).mkey for _ in range(1000)]
    assert len(set(mkeys)) == 1000 and 0 not in mkeys
    assert len({m >> 8 for m in mkeys}) == 1000  # one live mkey per index, as mlx5
    assert all(m >> 8 for m in mkeys)
    steps = [b - a for a, b in itertools.pairwise(mkeys)]
    assert len(set(steps)) > 990  # no constant step between consecutive ids
    assert len({m & 0xFF for m in mkeys}) > 200  # the key byte varies too


def test_a_draw_that_hits_a_live_index_or_index_0_is_drawn_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fw = Firmware(VirtualClock())
    live = fw.create_mkey(memoryview(bytearray(16))).mkey
    # The live mkey's index with another key byte, index 0, then a free one.
    draws = iter([live ^ 0xFF, 0x000000AB, 0x12345678])
    monkeypatch.setattr("fwemu.model.mkeys.secrets.randbits", lambda bits: next(draws))
    assert fw.create_mkey(memoryview(bytearray(16))).mkey == 0x12345678
    assert fw.destroy_mkey(live).ok
    draws = iter([live ^ 0xFF])  # its index is free once it is destroyed
    assert fw.create_mkey(memoryview(bytearray(16))).mkey == live ^ 0xFF


def _suspended(fw: Firmware, vhca_id: int) -> None:
    for op_mod in (SuspendOpMod.SUSPEND_INITIATOR, SuspendOpMod.SUSPEND_RESPONDER):
        assert fw.suspend_vhca(vhca_id, op_mod).ok


def _absent(fw: Firmware) -> int:
    while True:
        n = secrets.randbits(32)
        if fw.mkey_view(n) is None:
            return n


def _same(foreign: CmdResult, absent: CmdResult, mkey: int, missing: int) -> None:
    assert (foreign.status, foreign.syndrome) == (CmdStatus.BAD_RES_ERR, Syndrome.UNKNOWN_MKEY)
    assert type(foreign) is type(absent)
    assert (foreign.status, foreign.syndrome) == (absent.status, absent.syndrome)
    assert foreign.diagnostic == absent.diagnostic.replace(f"{missing:#x}", f"{mkey:#x}")


def test_save_load_and_destroy_of_another_principals_mkey_answer_as_no_mkey() -> None:
    fw = Firmware(VirtualClock(), seed=1)
    src, dst = (v.vhca_id for v in fw.create_vfs(2, VfConfig(size=64 * KiB)))
    _suspended(fw, src)
    _suspended(fw, dst)
    buf = bytearray(b"\xa5" * (256 * KiB))
    mkey = fw.create_mkey(memoryview(buf), "client-1", principal=A).mkey
    missing = _absent(fw)
    for principal in (B, None):  # another principal, or a caller with none
        r = [_save(fw, src, m, len(buf), principal) for m in (mkey, missing)]
        _same(r[0], r[1], mkey, missing)
        r = [_load(fw, dst, m, 4 * KiB, principal) for m in (mkey, missing)]
        _same(r[0], r[1], mkey, missing)
        r = [fw.destroy_mkey(m, principal) for m in (mkey, missing)]
        _same(r[0], r[1], mkey, missing)
    assert bytes(buf) == b"\xa5" * len(buf)  # nothing written
    assert fw.mkey_view(mkey) is not None  # nor destroyed
    assert fw.vf(src).save_in_flight is None
    # Its own principal's commands reach it.
    assert _save(fw, src, mkey, len(buf), A).ok
    assert fw.destroy_mkey(mkey, A).ok


def _save(fw: Firmware, vhca_id: int, mkey: int, size: int, principal: str | None) -> CmdResult:
    return fw.exec(SaveVhcaStateIn(vhca_id, mkey=mkey, size=size, principal=principal))


def _load(fw: Firmware, vhca_id: int, mkey: int, size: int, principal: str | None) -> CmdResult:
    return fw.exec(LoadVhcaStateIn(vhca_id, mkey=mkey, size=size, principal=principal))


def test_an_in_process_callers_mkeys_are_no_principals() -> None:
    """mkeys made without a principal (the embedded mode) answer only callers
    without one: a principal's command finds nothing there."""
    fw = Firmware(VirtualClock(), seed=1)
    (vf,) = fw.create_vfs(1, VfConfig(size=64 * KiB))
    _suspended(fw, vf.vhca_id)
    mkey = fw.create_mkey(memoryview(bytearray(256 * KiB))).mkey
    r = _save(fw, vf.vhca_id, mkey, 256 * KiB, A)
    assert (r.status, r.syndrome) == (CmdStatus.BAD_RES_ERR, Syndrome.UNKNOWN_MKEY)
    assert _save(fw, vf.vhca_id, mkey, 256 * KiB, None).ok
