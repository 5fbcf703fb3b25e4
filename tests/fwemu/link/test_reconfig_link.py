"""Issue 13 through both links (in-process and gRPC): reconfiguration modes,
automatic reconfigurations configured on a VF, ResetVf, and the VfInfo fields
that show them (state_size, reconfig_rate_per_s, reconfig_mode)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fwemu.link import LinkError
from fwemu.link.ifc import KiB, QueryVhcaMigState, ReconfigMode, VfConfig

CONFIG = VfConfig(size=128 * KiB, dirty_bytes_per_s=0, reconfig_bytes=8 * KiB)


async def test_replace_keeps_the_size_and_remove_drops_objects(h):
    """REPLACE of three 1 KiB objects: the oldest object goes, three come, the
    size stays; REMOVE of 1 byte: the oldest object goes; ADD grows the state."""
    vhca = await h.vf(CONFIG)
    before = await h.info(vhca)
    assert before.state_size == 128 * KiB
    await h.link.reconfigure(vhca, [("CQ", 1 * KiB)] * 3, mode=ReconfigMode.REPLACE)
    after = await h.info(vhca)
    assert after.state_size == 128 * KiB and after.reconfigurations == 1
    assert after.num_objects == before.num_objects + 2
    await h.link.reconfigure(vhca, [("QP", 1)], mode=ReconfigMode.REMOVE)
    removed = await h.info(vhca)
    assert removed.state_size == 128 * KiB and removed.num_objects == after.num_objects - 1
    await h.link.reconfigure(vhca, [("QP", 4 * KiB)])  # ADD, the default
    assert (await h.info(vhca)).state_size == 132 * KiB


async def test_a_replacement_while_tracking_is_init(h):
    vhca = await h.vf(CONFIG)
    await h.save_ok(vhca, (await h.query(vhca)).required_umem_size, set_track=True)
    assert await h.mig_state(vhca) == QueryVhcaMigState.OPER_MIGRATION_IDLE
    await h.link.reconfigure(vhca, mode=ReconfigMode.REPLACE)
    assert await h.mig_state(vhca) == QueryVhcaMigState.OPER_MIGRATION_INIT


@pytest.mark.parametrize("mode", [4, -1, 1 << 20])
async def test_an_unknown_mode_is_link_error_and_changes_nothing(h, mode):
    vhca = await h.vf(CONFIG)
    with pytest.raises(LinkError, match="mode"):
        await h.link.reconfigure(vhca, mode=mode)
    assert (await h.info(vhca)).reconfigurations == 0


async def test_the_rate_and_mode_travel_in_the_config(h):
    """CreateVfs and ConfigureVf take them, VfInfo reports them; the rate runs."""
    cfg = replace(CONFIG, reconfig_rate_per_s=40.0, reconfig_mode=ReconfigMode.REMOVE)
    [info] = await h.link.create_vfs(1, cfg)
    assert (info.config.reconfig_rate_per_s, info.config.reconfig_mode) == (40.0, 3)
    info = await h.link.configure_vf(
        info.vhca_id, reconfig_rate_per_s=25.5, reconfig_mode=ReconfigMode.REPLACE
    )
    assert (info.config.reconfig_rate_per_s, info.config.reconfig_mode) == (25.5, 2)
    for _ in range(10):
        await h.advance(0.1)
    info = await h.info(info.vhca_id)
    assert info.reconfigurations > 5 and info.state_size == 128 * KiB


@pytest.mark.parametrize(
    "changes",
    [{"reconfig_rate_per_s": float("nan")}, {"reconfig_rate_per_s": 1e9}, {"reconfig_mode": 9}],
    ids=["nan", "absurd-rate", "unknown-mode"],
)
async def test_bad_rates_are_link_errors_naming_the_field(h, changes):
    vhca = await h.vf(CONFIG)
    before = await h.info(vhca)
    with pytest.raises(LinkError, match=next(iter(changes))):
        await h.link.configure_vf(vhca, **changes)
    with pytest.raises(LinkError, match=next(iter(changes))):
        await h.link.create_vfs(1, replace(CONFIG, **changes))
    assert await h.info(vhca) == before and len(await h.link.list_vfs()) == 1


async def test_reset_vf_gives_a_fresh_vfs_state(h):
    vhca = await h.vf(replace(CONFIG, seed=77, dirty_bytes_per_s=64 * KiB))
    await h.link.reconfigure(vhca, [("QP", 64 * KiB)])
    await h.advance(1.0)
    info = await h.link.reset_vf(vhca)
    assert (info.vhca_id, info.state_size, info.reconfigurations) == (vhca, 128 * KiB, 1)
    [fresh] = await h.link.create_vfs(1, info.config)
    assert info.num_objects == fresh.num_objects
    assert await h.digest(vhca) == await h.digest(fresh.vhca_id)
    with pytest.raises(LinkError, match="no VF"):
        await h.link.reset_vf(99)
