"""MIG_DEVICE_STATE SET on Mlx5VfDevice itself, over the in-process firmware,
against the FSM of the reference (tests/support/fsm_reference.py): for every
(current, target) pair, the arcs mlx5vf_pci_step_device_state_locked is
handed by the VFIO core's arc loop, the errno and what is copied back."""

from __future__ import annotations

from typing import Any

import pytest

from driver.mlx5.arcs import MLX5VF_ARCS
from driver.vfio import fsm
from driver.vfio.errors import VfioError
from driver.vfio.uapi import MIG_STATE, Feature, MigState
from tests.support import mlx5 as h
from tests.support.fsm_reference import SetOutcome, SetState, expected, mismatches, parse_arcs

S = MigState
MLX5_FLAGS = h.SC | h.P2P | h.PRE  # mlx5vf_cmd_set_migratable offers all three

pytestmark = pytest.mark.timeout(120)


def mlx5_set_state(env: h.Mlx5Env, monkeypatch: pytest.MonkeyPatch) -> SetState:
    """SET on a fresh mlx5 VF brought to `cur` by SETs of its own; the arcs
    are the ones its step_device_state_locked was called for."""

    async def set_state(cur: MigState, new: int) -> SetOutcome:
        dev = await env.device()
        mvdev = dev.mvdev
        if cur == S.ERROR:
            # mlx5vf never enters ERROR itself; the ERROR row is the core's table.
            mvdev.mig_state = S.ERROR
        else:
            await dev.set_state(cur)
        arcs: list[tuple[MigState, MigState]] = []
        step = mvdev.step_device_state_locked

        async def recorded(nxt: MigState) -> Any:
            arcs.append((mvdev.mig_state, nxt))
            return await step(nxt)

        monkeypatch.setattr(mvdev, "step_device_state_locked", recorded)
        data = bytearray(MIG_STATE.pack(new, 1234))
        try:
            await env.drive(dev.feature(h.SET | Feature.MIG_DEVICE_STATE, data))
            code = None
        except VfioError as err:
            code = err.errno
        return SetOutcome(arcs, code, MIG_STATE.unpack(data))

    return set_state


@pytest.mark.parametrize("cur", list(S), ids=lambda s: s.name)
async def test_mlx5_set_state_follows_the_reference_fsm(
    mlx5_inproc: h.Factory, monkeypatch: pytest.MonkeyPatch, cur: MigState
) -> None:
    """vfio_mig_get_next_state + the arc loop on the real device: for every target,
    either EINVAL or exactly the reference's arcs, each a §1.2 arc, shortest, saving-group
    states only at the ends; data_fd only when the last arc opens a data session."""
    env = await mlx5_inproc()
    assert await mismatches(MLX5_FLAGS, mlx5_set_state(env, monkeypatch), [cur]) == []


def test_mlx5vf_steps_exactly_the_arcs_the_fsm_hands_out() -> None:
    """The arc table (mlx5vf_pci_step_device_state_locked) has a row for every §1.2 arc of
    a device with P2P and PRE_COPY, and no other: the kernel's final WARN_ON is unreachable."""
    assert set(MLX5VF_ARCS) == parse_arcs(MLX5_FLAGS)
    handed = {a for cur in S for new in S for a in expected(cur, new, MLX5_FLAGS)[0]}
    assert handed == set(MLX5VF_ARCS)


async def test_the_mlx5_conformance_check_catches_a_wrong_table(
    mlx5_inproc: h.Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard on the guard: one wrong cell of the core's table (RUNNING->STOP straight to
    STOP) hands mlx5vf an arc it has no row for, and that is reported."""
    monkeypatch.setitem(fsm.FSM_TABLE[S.RUNNING], S.STOP, S.STOP)
    env = await mlx5_inproc()
    assert await mismatches(MLX5_FLAGS, mlx5_set_state(env, monkeypatch), [S.RUNNING]) != []
