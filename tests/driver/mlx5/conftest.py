"""The fixtures of the mlx5vf behaviour tests: factories of environments
(tests/support/mlx5) over the firmware adapters."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.mlx5 import ADAPTERS, REMOTE, Factory, environments


@pytest.fixture(params=ADAPTERS)
async def mlx5(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    """Factory of environments over the parametrized adapter:
    `env = await mlx5(clock="loop" | "virtual", max_chunk_size=..., seed=...,
    cmd_timeout=...)` (cmd_timeout: when the driver gives up on a SAVE
    completion, as mlx5_cmd_exec_cb does)."""
    async for make in environments(request.param):
        yield make


@pytest.fixture
async def mlx5_inproc() -> AsyncIterator[Factory]:
    """The `mlx5` factory over the in-process firmware only (tests that make
    many devices and look at the driver, not the adapter)."""
    async for make in environments("inproc"):
        yield make


@pytest.fixture(params=[*ADAPTERS, REMOTE])
async def mlx5_wide(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    """The `mlx5` factory plus a third adapter, ``grpc-remote``: the firmware
    holds host memory, so the driver's dma_sync_for_cpu / dma_sync_for_device
    really move the image bytes (for the tests that move whole streams)."""
    async for make in environments(request.param):
        yield make
