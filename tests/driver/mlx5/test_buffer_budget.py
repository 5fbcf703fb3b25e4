"""The per-client budget of data buffers (issue 11, item 4): a resuming
stream's records size buffers as in mlx5vf (record_size, STOP_COPY_SIZE's
pre-size, up to MAX_LOAD_SIZE), but what one client's files hold is bounded:
past the budget the allocation is ENOMEM, as a kernel allocation under
pressure, the device state is unchanged, and other clients are unaffected.
A header alone allocates nothing, and a non-image record's payload is not
held at all."""

from __future__ import annotations

import errno
import os
from contextvars import copy_context
from typing import Any

import pytest

from driver.events import CALLER
from driver.mlx5.cmd import DEFAULT_BUFFER_BUDGET, BufferBudget
from driver.vfio.uapi import MigState
from fwemu.link.ifc import KiB, MiB
from tests.support import mlx5 as h

S = MigState
pytestmark = pytest.mark.timeout(90)

SIZE = 48 * KiB


def rss() -> int:
    """This process's resident memory now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def resuming_as(dev: h.Dev, client: str) -> Any:
    """STOP -> RESUMING in a call of `client`: its file charges that client."""
    CALLER.set(client)
    return await dev.walk(S.STOP, S.RESUMING)


def fw_header(size: int) -> bytes:
    return h.REC_HEADER.pack(size, 0, h.TAG_FW_DATA)


def test_budget_refuses_past_its_limit_and_charges_nothing() -> None:
    b = BufferBudget(10)
    a, a_of_p, other = ("", "a"), ("p", "a"), ("", "b")
    b.charge(a, 6)
    with h.raises_errno(errno.ENOMEM):
        b.charge(a, 5)
    assert b.held == {a: 6}
    b.charge(other, 10)  # another client's account is its own
    b.charge(a_of_p, 10)  # ... and so is the same id's of another principal
    b.check(a, 8, freed=4)  # what a replaced buffer gives back counts
    b.release(a, 6)
    b.release(other, 10)
    b.release(a_of_p, 10)
    assert b.held == {}
    assert BufferBudget().limit == DEFAULT_BUFFER_BUDGET == 1 << 30


async def test_image_header_alone_allocates_nothing(mlx5_inproc: h.Factory) -> None:
    """A 16-byte FW_DATA header declaring 256 MiB is accepted (it is within
    MAX_LOAD_SIZE and the budget) but allocates nothing until image bytes
    come: neither the budget nor the process's memory grows."""
    env = await mlx5_inproc()
    dst = await env.device(h.vf_config(SIZE))
    f = await resuming_as(dst, "hostile")
    before = rss()
    assert await f.write(fw_header(256 * MiB)) == 16
    assert rss() - before < 32 * MiB
    assert env.registry.budget.held == {}


async def test_optional_record_payload_is_not_held(mlx5_inproc: h.Factory) -> None:
    """A skipped record declaring 512 MiB keeps only a page: writing part of
    its payload does not grow the process (mlx5vf would allocate it all)."""
    env = await mlx5_inproc()
    dst = await env.device(h.vf_config(SIZE))
    f = await resuming_as(dst, "hostile")
    before = rss()
    head = h.REC_HEADER.pack(512 * MiB, h.FLAG_OPTIONAL, 0x77)
    assert await f.write(head + bytes(64 * KiB)) == 16 + 64 * KiB
    assert rss() - before < 32 * MiB
    assert f.f_pos == 16 + 64 * KiB


@pytest.mark.parametrize("stream", ["huge-image", "huge-stop-copy-size"])
async def test_past_the_budget_is_enomem_and_changes_nothing(
    mlx5_inproc: h.Factory, stream: str
) -> None:
    """An image record, or a STOP_COPY_SIZE pre-size, larger than the budget:
    ENOMEM at the header, no memory taken, the file in ERROR (ENODEV next), the
    device still RESUMING; it resets and then loads a real stream."""
    env = await mlx5_inproc("virtual")
    src = await env.device(h.vf_config(SIZE, dirty=1 << 20))
    real, digest = await h.pre_copy_stream(env, src)
    dst = await env.device(h.vf_config(SIZE))
    f = await resuming_as(dst, "hostile")
    if stream == "huge-image":
        bad = fw_header(2 << 30)
    else:
        bad = h.record((4 << 30).to_bytes(8, "little"), tag=h.TAG_STOP_COPY_SIZE) + fw_header(64)
    before = rss()
    with h.raises_errno(errno.ENOMEM):
        await f.write(bad + bytes(64))
    assert rss() - before < 32 * MiB
    assert env.registry.budget.held == {}
    with h.raises_errno(errno.ENODEV):
        await f.write(b"\0")
    assert await dst.get_state() == S.RESUMING
    f2 = await dst.walk(S.STOP, S.RESUMING)
    assert await f2.write(real) == len(real)
    await dst.set_state(S.STOP)
    assert await dst.digest() == digest
    assert env.registry.budget.held == {}  # freed with the file


async def test_one_client_exhausting_its_budget_leaves_others_migrating(
    mlx5_inproc: h.Factory,
) -> None:
    """Client A holds one image buffer near the budget; its second resuming
    fd's image is ENOMEM.  Client B, on the same driver, loads a whole
    stream meanwhile; each account returns to zero when its files end."""
    env = await mlx5_inproc("virtual")
    budget = env.registry.budget
    budget.limit = 4 * MiB
    src = await env.device(h.vf_config(SIZE, dirty=1 << 20))
    real, digest = await h.pre_copy_stream(env, src)
    a1, a2, b = await env.devices(3, h.vf_config(SIZE))
    fa1 = await copy_context().run(resuming_as, a1, "a")
    await copy_context().run(lambda: fa1.write(fw_header(3 * MiB) + b"x"))
    assert budget.held == {("", "a"): 3 * MiB}
    fa2 = await copy_context().run(resuming_as, a2, "a")
    with h.raises_errno(errno.ENOMEM):
        await fa2.write(fw_header(2 * MiB) + b"x")
    assert budget.held == {("", "a"): 3 * MiB}
    fb = await copy_context().run(resuming_as, b, "b")
    assert await fb.write(real) == len(real)
    assert budget.held["", "b"] > 0
    await b.set_state(S.STOP)
    assert await b.digest() == digest
    assert budget.held == {("", "a"): 3 * MiB}
    await a1.set_state(S.STOP)
    assert budget.held == {}


async def test_saving_buffers_count_on_the_budget(mlx5_inproc: h.Factory) -> None:
    """The stop-copy buffers of a saving file are charged too: a device
    whose image exceeds the client's budget cannot enter STOP_COPY (ENOMEM,
    the state stays STOP); within it, the charge is given back at STOP."""
    env = await mlx5_inproc()
    budget = env.registry.budget
    dev = await env.device(h.vf_config(SIZE))
    CALLER.set("saver")
    await dev.set_state(S.STOP)
    budget.limit = 16 * KiB
    with h.raises_errno(errno.ENOMEM):
        await dev.set_state(S.STOP_COPY)
    assert await dev.get_state() == S.STOP
    assert budget.held == {}
    budget.limit = DEFAULT_BUFFER_BUDGET
    f = await dev.set_state(S.STOP_COPY)
    assert budget.held["", "saver"] >= SIZE
    await h.read_to_eof(env, f)
    await dev.set_state(S.STOP)
    assert budget.held == {}
