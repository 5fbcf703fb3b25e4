"""vfioctl's argument types: each turns a word of the command line into a
value, or an argparse error naming what is wrong with it; and the arguments
several commands declare alike."""

from __future__ import annotations

import argparse
import math

from grpcsvc.units import byte_size

from ..uapi import MigState
from ..usermem import DATA_PATHS


def state(text: str) -> MigState:
    try:
        return MigState[text.strip().upper().replace("-", "_")]
    except KeyError:
        if text.isdigit() and int(text) in MigState._value2member_map_:
            return MigState(int(text))
        names = ", ".join(s.name for s in MigState)
        raise argparse.ArgumentTypeError(f"{text!r} is not a state (one of {names})") from None


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def object_spec(text: str) -> tuple[str, int]:
    kind, sep, amount = text.partition(":")
    try:
        return (kind.upper() or "QP"), (byte_size(amount) if sep else 4096)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TYPE[:SIZE], e.g. QP:4096") from None


def add_byte_rate(
    p: argparse.ArgumentParser, flag: str, *, default: int, help: str, metavar: str = "BYTES_PER_S"
) -> None:
    """A rate in bytes per second (e.g. 1GiB)."""
    p.add_argument(flag, type=byte_size, default=default, metavar=metavar, help=help)


def add_data_path(p: argparse.ArgumentParser, *, help: str) -> None:
    """--data-path: how a migration's data moves (MigrationOptions.data_path)."""
    p.add_argument("--data-path", choices=DATA_PATHS, default="auto", help=help)
