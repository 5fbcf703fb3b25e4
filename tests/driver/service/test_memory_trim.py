"""The driver gives the heap its clients' migrations freed back to the OS
when its last client goes (grpcsvc.memory.return_free_memory_to_the_os):
glibc keeps it resident otherwise, and a soak's RSS creeps up."""

from __future__ import annotations

import asyncio

import pytest

from driver.service import servicer as servicer_module
from tests.support.vfioclient_migration import in_process_rig

pytestmark = pytest.mark.grpc


async def _until(cond: object, what: str) -> None:
    for _ in range(500):
        if callable(cond) and cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_the_heap_is_trimmed_when_the_last_client_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trims: list[int] = []

    def counted() -> bool:
        trims.append(1)
        return True

    monkeypatch.setattr(servicer_module, "return_free_memory_to_the_os", counted)
    async with in_process_rig() as rig:
        procs = rig.server.servicer.processes
        await _until(lambda: len(procs) == 2, "both clients")
        await rig.src.aclose()
        await _until(lambda: len(procs) == 1, "the first client to go")
        assert trims == []  # another client is still there
        await rig.dst.aclose()
        await _until(lambda: not procs, "the last client to go")
        assert trims == [1]
