"""Fixtures of the fwemu behaviour tests.

The same tests run against both implementations of the firmware link:

* ``inproc``: `InProcessLink` over a `Firmware` model in this process;
* ``grpc``: a real `FirmwareServer` on 127.0.0.1 reached through `GrpcLink`
  (host memory in shared memory the firmware maps);
* ``grpc-remote`` (tests marked `remote_memory`): the same with the firmware
  holding host memory, so `dma_sync_for_cpu` / `dma_sync_for_device` really
  move the bytes.

Both firmwares run on a `VirtualClock`, so time moves only through
`advance_clock`.  Tests talk to the firmware only through link methods (wrapped
by `Harness` for brevity), so every test really runs in both modes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from fwemu.model import Firmware, VirtualClock
from tests.support.fwemu import Harness, open_link

MODES = [
    pytest.param("inproc", id="inproc"),
    pytest.param("grpc", id="grpc", marks=pytest.mark.grpc),
]
# The firmware holds host memory; dma_sync_* really move the bytes.  Only for
# tests marked `remote_memory` (those that move image bytes), to keep the suite fast.
REMOTE = pytest.param("grpc-remote", id="grpc-remote", marks=pytest.mark.grpc)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "remote_memory: also run over gRPC with firmware-held host memory"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test using the link runs in each mode (see the module docstring)."""
    if "make_harness" in metafunc.fixturenames:
        remote = metafunc.definition.get_closest_marker("remote_memory") is not None
        metafunc.parametrize("make_harness", [*MODES, REMOTE] if remote else MODES, indirect=True)


@pytest.fixture
async def make_harness(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """Factory of harnesses, each over its own Firmware(VirtualClock(), seed)."""
    mode: str = request.param
    closers: list[Callable[[], Awaitable[None]]] = []

    async def make(seed: int = 1) -> Harness:
        fw = Firmware(VirtualClock(), seed=seed)
        harness = Harness(await open_link(fw, mode, closers), mode)
        harness.fw = fw  # what the link reaches, for tests of the model's own counters
        return harness

    yield make
    for close in reversed(closers):
        await close()


@pytest.fixture
async def h(make_harness: Callable[..., Awaitable[Harness]]) -> Harness:
    """A harness over a fresh firmware (seed 1) with no VF yet."""
    return await make_harness()
