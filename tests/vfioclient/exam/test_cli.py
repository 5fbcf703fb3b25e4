"""`vfioctl exam` against a `vfio-driver serve --scenario-service` process,
with `vfioctl migrate` as the orchestrator under test (--run)."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from tests.support.vfioctl_driver import Driver
from vfioclient.cli import main

pytestmark = pytest.mark.grpc


def exam(capsys: pytest.CaptureFixture[str], driver: Driver, *argv: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    code = main(["--driver", driver.target, "--json", "--timeout", "60", "exam",
                 "--scenario", driver.target, *argv])  # fmt: skip
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_exam_grades_vfioctl_migrate_and_exits_0(
    driver: Driver, capsys: pytest.CaptureFixture[str]
) -> None:
    orchestrator = shlex.join(
        [sys.executable, "-m", "vfioclient.cli", "--driver", driver.target, "migrate"]
    )
    code, doc = exam(
        capsys,
        driver,
        "--trap", "reinit-first-precopy-info", "--trap", "load-refused",
        "--run", orchestrator + " {source} {destination}",
    )  # fmt: skip
    assert code == 0, doc
    assert doc["all_passed"] and doc["passed"] == 2
    got = {t["trap"]: (t["passed"], t["outcome"], t["fired"]) for t in doc["traps"]}
    assert got == {
        "reinit-first-precopy-info": (True, "completed", True),
        "load-refused": (True, "aborted", True),
    }


def test_exam_exits_1_when_the_orchestrator_never_comes(
    driver: Driver, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = exam(capsys, driver, "--trap", "reinit-after-ack", "--trap-timeout", "0.5")
    assert code == 1
    assert not doc["all_passed"]
    (t,) = doc["traps"]
    assert (t["passed"], t["outcome"]) == (False, "timeout")
    assert t["reasons"] == ["the orchestrator did not finish with the devices in time"]
