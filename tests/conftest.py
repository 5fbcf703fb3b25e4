"""Fixtures every test directory may use."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.support import tls_mode
from tests.support.grpc_noise import GrpcPollerNoise
from tests.support.tls import Pki


@pytest.fixture(scope="session")
def pki() -> Pki:
    """A development CA with a server certificate for 127.0.0.1 and client
    certificates for the driver, two tenants and an admin (tests/support/tls.py);
    the same one the mTLS pass (VFIO_TEST_TLS=1) serves everything with."""
    return tls_mode.session_pki()


@pytest.fixture(scope="session", autouse=True)
def tls_environment() -> Iterator[None]:
    """VFIO_TLS_CA/CERT/KEY for the whole session: the admin's certificate in
    the mTLS pass, so that library clients and `vfioctl` subprocesses present
    it; unset otherwise, so that a shell's own settings change no test."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in tls_mode.client_environment().items():
            if value is None:
                mp.delenv(name, raising=False)
            else:
                mp.setenv(name, value)
        yield


@pytest.fixture(scope="session", autouse=True)
def no_grpc_poller_noise() -> Iterator[None]:
    """asyncio's logger (uvloop's too) drops the stale gRPC poller callbacks'
    tracebacks of a process running many loops (tests/support/grpc_noise.py)."""
    noise = GrpcPollerNoise()
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(noise)
    yield
    asyncio_log.removeFilter(noise)
