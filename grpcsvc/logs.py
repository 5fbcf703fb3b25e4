"""Logging for the services: a level flag, and text or JSON lines on stderr.

JSON lines carry the record's extra fields (`log.info("...", extra={"device":
..., "fd": ...})`) as keys, so a log shipper can filter by device or stream.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pythonjsonlogger.json import JsonFormatter

LEVELS = ["debug", "info", "warning", "error"]
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class _TextWithExtras(logging.Formatter):
    """Text lines that still show a record's identifiers (device=..., fd=...)."""

    _standard = frozenset(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {
            k: v
            for k, v in vars(record).items()
            if k not in self._standard and k not in ("message", "asctime")
        }
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


def add_log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=LEVELS)
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line (time, level, logger, message, identifiers)",
    )


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                datefmt="%Y-%m-%dT%H:%M:%S%z",
            )
        )
    else:
        handler.setFormatter(_TextWithExtras(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
