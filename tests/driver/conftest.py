"""The fixtures of the driver tests, registered once: the driver services
(tests.support.driver_service: `fwemu_target`, `drv`, `inproc`, `client`).
The mlx5 environments are tests/driver/mlx5/conftest.py's."""

from tests.support.driver_service import (  # noqa: F401
    client_fixture,
    drv_fixture,
    fwemu_target_fixture,
    inproc_fixture,
)
