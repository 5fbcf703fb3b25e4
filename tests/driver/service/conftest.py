"""The service tests' own fixtures: a driver served with mutual TLS to two
tenants and an admin (tenancy.py)."""

from tests.driver.service.tenancy import tenancy_fixture  # noqa: F401
