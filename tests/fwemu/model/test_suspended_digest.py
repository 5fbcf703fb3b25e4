"""GetDigest(suspended=True): the digest of the state a VF had while it was
last suspended, whatever ran on it since.  A migration's source is suspended
from PRE_COPY_P2P until its user closes it, and the close's FLR runs its
workload again: a digest read after that close is not what its stop-copy
image held (the exam's source digest, vfioclient/exam/runner.py)."""

from __future__ import annotations

from fwemu.link.ifc import KiB, MiB, VfConfig
from fwemu.model.vf import Vf

CONFIG = VfConfig(size=256 * KiB, dirty_bytes_per_s=4 * MiB)


def a_vf() -> Vf:
    return Vf(0, CONFIG, seed=7, uid="vf-0", now=0.0)


def suspend(vf: Vf, now: float) -> None:
    vf.set_suspended(initiator=True, responder=True, now=now)


def test_a_vf_never_suspended_has_no_suspended_digest() -> None:
    vf = a_vf()
    vf.advance(0.5)
    assert vf.suspended_digest() == ""


def test_while_suspended_it_is_the_digest_of_the_state_now() -> None:
    vf = a_vf()
    vf.advance(0.5)
    suspend(vf, 0.5)
    vf.advance(1.0)  # the workload is paused
    assert vf.suspended_digest() == vf.digest()


def test_after_an_flr_and_the_workload_it_is_still_the_suspended_state() -> None:
    vf = a_vf()
    suspend(vf, 0.5)
    frozen = vf.digest()
    vf.reset_function(1.0)  # the close's FLR: the function runs again
    assert vf.suspended_digest() == frozen  # nothing changed yet
    vf.advance(1.5)  # half a second of its workload
    assert vf.digest() != frozen
    assert vf.suspended_digest() == frozen


def test_a_reconfiguration_after_a_resume_keeps_the_suspended_state() -> None:
    vf = a_vf()
    suspend(vf, 0.5)
    frozen = vf.digest()
    vf.set_suspended(initiator=False, responder=False, now=0.5)  # RESUME_VHCA
    vf.reconfigure_now([])
    assert vf.digest() != frozen
    assert vf.suspended_digest() == frozen


def test_reset_vf_while_suspended_keeps_the_state_it_had_then() -> None:
    vf = a_vf()
    vf.advance(0.5)
    suspend(vf, 0.5)
    frozen = vf.digest()
    vf.reset(1.0)  # ResetVf: the state regenerated, the function running
    assert vf.digest() != frozen
    assert vf.suspended_digest() == frozen


def test_the_next_suspension_replaces_it() -> None:
    vf = a_vf()
    suspend(vf, 0.5)
    first = vf.digest()
    vf.reset_function(1.0)
    vf.advance(1.5)
    suspend(vf, 1.5)
    assert vf.suspended_digest() == vf.digest() != first


def test_writes_owed_between_the_last_look_and_the_suspend_are_made_before_it() -> None:
    """The command pipeline brings a VF to its clock reading, and SUSPEND reads
    the clock again: the writes due in between (4 MiB/s is a write every
    ~1 ms) are part of the suspended state, not made at the next resume (a
    driver killed in STOP_COPY, then a new driver's FLR, saw its VF change
    with a zero rate)."""
    vf = a_vf()
    vf.advance(0.5)
    suspend(vf, 0.5 + 0.01)  # about ten writes owed since the last look
    frozen = vf.digest()
    vf.workload.set_rate(0, 0.6)
    vf.reset_function(1.0)
    vf.advance(1.5)  # runs again, at no rate
    assert vf.digest() == frozen
