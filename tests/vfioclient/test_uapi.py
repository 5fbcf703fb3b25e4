"""vfioclient.uapi: the client's linux/vfio.h, the very table the driver runs on."""

from __future__ import annotations

from pathlib import Path

import driver.vfio.uapi as kernel
import vfioclient
from tests.support.imports import Rule
from vfioclient import uapi

ROOT = Path(__file__).resolve().parents[2]

# Client-side code: what orchestrators, the CLI, the load test and the
# benchmarks are made of.  vfioclient/uapi.py is where the table comes in.
CLIENT_CODE = Rule(
    "client-code-takes-the-uapi-from-vfioclient",
    ("vfioclient", "vfioload", "benchmarks", "examples"),
    ("driver.vfio",),
    "the driver's VFIO core is its own; clients use vfioclient.uapi",
)


def test_every_uapi_name_of_the_driver_is_the_clients() -> None:
    """One table: a constant or layout added to driver/vfio/uapi.py is
    exported here too, as the same object."""
    public = {n for n, v in vars(kernel).items() if n.isupper() or isinstance(v, type)}
    public -= {"annotations"}
    assert set(uapi.__all__) == public
    for name in public:
        assert getattr(uapi, name) is getattr(kernel, name), name


def test_the_package_exports_the_names_ioctl_code_uses() -> None:
    for name in ("MigState", "Feature", "VFIO_PRECOPY_INFO_REINIT", "VFIO_DEVICE_FEATURE_GET"):
        assert getattr(vfioclient, name) is getattr(kernel, name)
    assert vfioclient.uapi is uapi


def test_client_code_imports_no_driver_vfio_module_but_through_vfioclient_uapi() -> None:
    found = [v for v in CLIENT_CODE.violations(ROOT) if not v.startswith("vfioclient/uapi.py:")]
    assert found == []


def test_the_rule_sees_a_client_module_that_reaches_into_the_driver(tmp_path: Path) -> None:
    (tmp_path / "vfioclient" / "cli").mkdir(parents=True)
    (tmp_path / "vfioclient" / "cli" / "x.py").write_text("from driver.vfio.uapi import MigState\n")
    assert CLIENT_CODE.violations(tmp_path) == [
        "vfioclient/cli/x.py:1: from driver.vfio.uapi import MigState  (imports driver.vfio)"
    ]
