"""The fixtures of the driver tests, registered once: the mlx5 environments
(tests.support.mlx5: `mlx5`, `mlx5_wide`, `mlx5_inproc`) and the driver
services (tests.support.driver_service: `fwemu_target`, `drv`, `inproc`,
`client`)."""

from tests.support.driver_service import (  # noqa: F401
    client_fixture,
    drv_fixture,
    fwemu_target_fixture,
    inproc_fixture,
)
from tests.support.mlx5 import (  # noqa: F401
    mlx5_fixture,
    mlx5_inproc_fixture,
    mlx5_wide_fixture,
)
