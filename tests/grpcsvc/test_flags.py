"""The observability flags both services share (grpcsvc/logs.py,
grpcsvc/observability.py)."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from grpcsvc.logs import add_log_flags, setup_logging
from grpcsvc.observability import PER_LIMIT_MAX, add_metrics_flags


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_log_flags(p)
    add_metrics_flags(p, per="vf")
    return p


def test_defaults_are_text_logs_and_no_metrics() -> None:
    a = parser().parse_args([])
    assert (a.log_level, a.log_format, a.metrics_listen, a.metrics_per_vf) == (
        "info", "text", None, 0,
    )  # fmt: skip


@pytest.mark.parametrize("n", ["-1", str(PER_LIMIT_MAX + 1), "many"])
def test_per_vf_series_are_capped(n: str) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--metrics-per-vf", n])
    assert parser().parse_args(["--metrics-per-vf", str(PER_LIMIT_MAX)]).metrics_per_vf == 256


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_line_carries_its_identifiers(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)  # pytest's own handlers among them
    setup_logging("info", fmt)
    try:
        logging.getLogger("t").info("state change", extra={"device": "0000:81:00.1", "fd": 4})
        logging.getLogger("t").debug("not shown")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    (line,) = capsys.readouterr().err.splitlines()
    if fmt == "json":
        doc = json.loads(line)
        assert doc["message"] == "state change" and doc["level"] == "INFO"
        assert (doc["device"], doc["fd"], doc["logger"]) == ("0000:81:00.1", 4, "t")
    else:
        assert line.endswith("t INFO state change device=0000:81:00.1 fd=4")
