"""Logging for the services: a level flag, and text or JSON lines on stderr.

JSON lines carry the record's extra fields (`log.info("...", extra={"device":
..., "fd": ...})`) as keys, so a log shipper can filter by device or stream.

`announce` is how a service says it is up (and where its metrics are): a
line on stdout, which scripts and grpcsvc.spawn read, and a log record,
except where stdout and stderr are one place (a terminal, `>file 2>&1`),
which would show it twice.
"""

from __future__ import annotations

import argparse
import logging
import os
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


def one_place() -> bool:
    """stdout and stderr write to the same terminal, file or pipe."""
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # replaced streams (tests): not one place
        return False
    return (out.st_dev, out.st_ino, out.st_rdev) == (err.st_dev, err.st_ino, err.st_rdev)


def announce(log: logging.Logger, line: str, record: str | None = None, *args: object) -> None:
    """`line` on stdout; and `record % args` (default: the line) logged at
    info, unless stdout and stderr are one place (see one_place)."""
    print(line, flush=True)
    if not one_place():
        log.info(record if record is not None else line, *args)
