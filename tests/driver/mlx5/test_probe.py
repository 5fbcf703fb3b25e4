"""Probe (mlx5vf_cmd_set_migratable, reference §5.1): which VFs get migration,
with which flags, and what the VFIO core answers for a VF without mig_ops."""

from __future__ import annotations

import errno

import pytest

from driver.vfio.uapi import MIG_DATA_SIZE, MIG_STATE, MIGRATION, Feature, MigState
from tests.support import mlx5 as h

S = MigState

pytestmark = pytest.mark.timeout(60)


async def test_migratable_vf_advertises_stop_copy_p2p_pre_copy(mlx5: h.Factory) -> None:
    """§5.1: with cmd_hca_cap.migration and cap_2 migratable, migration_multi_load
    and migration_tracking_state, migration_flags = STOP_COPY | P2P | PRE_COPY
    (VFIO_DEVICE_FEATURE_MIGRATION GET), and the device opens at RUNNING."""
    env = await mlx5()
    dev = await env.device()
    assert await dev.migration_flags() == h.SC | h.P2P | h.PRE == 7
    assert await dev.get_state() == S.RUNNING
    assert dev.mvdev.caps.vhca_id == dev.vhca_id
    # PROBE of the feature succeeds with no data at all
    assert await dev.feature(h.PROBE | h.GET | Feature.MIGRATION) == b""


@pytest.mark.parametrize(
    "missing", ["migration", "migratable", "migration_multi_load", "migration_tracking_state"]
)
async def test_vf_without_a_required_cap_is_not_migratable(mlx5: h.Factory, missing: str) -> None:
    """§5.1: mlx5vf enables migration only if all four caps hold; otherwise the
    device has no mig_ops, so the core answers MIGRATION, MIG_DEVICE_STATE and
    MIG_DATA_SIZE with ENOTTY (§2), and MIG_PRECOPY_INFOv2 with EINVAL
    (migration_flags lacks PRE_COPY, checked before the feature check, so even
    a PROBE fails)."""
    env = await mlx5()
    dev = await env.device(h.vf_config(**{missing: False}))
    assert not dev.mvdev.migratable
    assert dev.mvdev.mig_ops is None
    assert dev.mvdev.migration_flags == 0
    with h.raises_errno(errno.ENOTTY):
        await dev.feature(h.GET | Feature.MIGRATION, bytes(MIGRATION.size))
    with h.raises_errno(errno.ENOTTY):
        await dev.feature(h.GET | Feature.MIG_DEVICE_STATE, MIG_STATE.pack(0, 0))
    with h.raises_errno(errno.ENOTTY):
        await dev.feature(h.SET | Feature.MIG_DEVICE_STATE, MIG_STATE.pack(S.STOP, 0))
    with h.raises_errno(errno.ENOTTY):
        await dev.feature(h.GET | Feature.MIG_DATA_SIZE, bytes(MIG_DATA_SIZE.size))
    with h.raises_errno(errno.EINVAL):
        await dev.feature(h.SET | Feature.MIG_PRECOPY_INFOv2)
    with h.raises_errno(errno.EINVAL):
        await dev.feature(h.PROBE | h.SET | Feature.MIG_PRECOPY_INFOv2)
    # No firmware migration command was ever sent for it.
    assert [c for c in dev.cmds() if c.name != "FLR"] == []
    # The firmware VF is untouched: running, no tracking.
    vf = await dev.vf()
    assert not vf.initiator_suspended and not vf.responder_suspended and not vf.tracking


async def test_vf_without_chunk_cap_migrates_outside_chunk_mode(mlx5: h.Factory) -> None:
    """§5.1: chunk_mode = cap_2.migration_in_chunks.  Without it the driver
    never sets QUERY.chunk, and a STOP_COPY stream holds one FW_DATA image."""
    env = await mlx5()
    dev = await env.device(h.vf_config(chunks=False))
    assert await dev.migration_flags() == h.SC | h.P2P | h.PRE
    assert not dev.mvdev.caps.chunk_mode
    stream = await h.migrate_stopped(env, dev)
    queries = [c for c in dev.cmds() if c.name == "QUERY"]
    assert queries and all(not c.args["chunk"] for c in queries)
    saves = [c for c in dev.cmds() if c.name == "SAVE"]
    assert len(saves) == 1 and len(stream) > 64 * 1024


async def test_vf_with_chunk_cap_sets_query_chunk(mlx5: h.Factory) -> None:
    """§5.1/§5.4: with cap_2.migration_in_chunks every QUERY carries chunk=1."""
    env = await mlx5()
    dev = await env.device(h.vf_config(chunks=True))
    assert dev.mvdev.caps.chunk_mode
    await dev.data_size()
    queries = [c for c in dev.cmds() if c.name == "QUERY"]
    assert len(queries) == 1 and queries[0].args["chunk"] is True


async def test_vf_without_migration_state_cap_migrates_but_never_reinits(mlx5: h.Factory) -> None:
    """§5.1 (series): mig_state_cap = cap_2.migration_state.  A VF without it is
    migratable with the same flags, but the driver ignores the query's
    migration_state, so even with the v2 opt-in and a reconfiguration during
    PRE_COPY no REINIT is reported (flags stay 0)."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(mig_state=False))
    assert await dev.migration_flags() == h.SC | h.P2P | h.PRE
    assert not dev.mvdev.caps.mig_state_cap
    await dev.opt_in_v2()
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await env.reconfigure(dev)
    info = await h.precopy_info(f, flags=0xDEADBEEF)
    assert info.flags == 0  # v2: zeroed, and no REINIT
    assert dev.mvdev.stats.reinits == 0
    # The firmware itself reports 0 for a VF without the cap.
    q = await env.fw_query(dev, incremental=True, chunk=False)
    assert q.migration_state == 0
