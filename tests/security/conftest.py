"""The hostile-client tests' services (rig.py): one mutual-TLS pair of
processes for the whole package, a plaintext pair for the cases that run
without TLS too, and each test's parties."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.security.rig import Parties, Stack, parties, stack
from tests.support.tls import Pki


@pytest.fixture(scope="package")
def mtls_stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack("mtls", pki, tmp_path_factory.mktemp("shm-mtls")) as s:
        yield s


@pytest.fixture(scope="package")
def plaintext_stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with stack("plaintext", pki, tmp_path_factory.mktemp("shm-plaintext")) as s:
        yield s


@pytest.fixture(name="mtls")
async def mtls_fixture(mtls_stack: Stack) -> AsyncIterator[Parties]:
    """The parties of a test against the mutual-TLS services."""
    async with parties(mtls_stack) as p:
        yield p


@pytest.fixture(name="either", params=["mtls", "plaintext"])
async def either_fixture(request: pytest.FixtureRequest) -> AsyncIterator[Parties]:
    """The parties of a test that runs with mutual TLS and without (loopback,
    every caller anonymous)."""
    s: Stack = request.getfixturevalue(f"{request.param}_stack")
    async with parties(s) as p:
        yield p
