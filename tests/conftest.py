"""Fixtures every test directory may use."""

from __future__ import annotations

import pytest

from tests.support.tls import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A development CA with a server certificate for 127.0.0.1 and client
    certificates for the driver, two tenants and an admin (tests/support/tls.py)."""
    return make_pki(tmp_path_factory.mktemp("pki"))
