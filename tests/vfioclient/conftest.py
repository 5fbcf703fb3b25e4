from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.vfioctl_driver import Driver


@pytest.fixture(name="driver")
def driver_fixture() -> Iterator[Driver]:
    """A fresh `vfio-driver serve` process (3 VFs, no workload) per test."""
    d = Driver.start()
    try:
        yield d
    finally:
        d.stop()
