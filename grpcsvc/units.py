"""Command-line units shared by every command (fwemu, vfio-driver, vfioctl,
the benchmarks): byte sizes as people write them, and bounded values."""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ByteSize, TypeAdapter


@functools.cache
def _bytes() -> TypeAdapter[ByteSize]:
    # pydantic and its adapter cost ~50 ms of CPU to import and build: paid
    # by the first size parsed, not by every command that imports this module
    # (64 `vfioctl migrate` processes at once parse none).
    from pydantic import ByteSize, TypeAdapter

    return TypeAdapter(ByteSize)


def byte_size(text: str) -> int:
    """argparse type: '16MiB', '1.5GiB', '4096'."""
    from pydantic import ValidationError

    try:
        return int(_bytes().validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (e.g. 4096, 64KiB, 16MiB)"
        ) from None


def _human(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def byte_size_between(low: int, high: int) -> Callable[[str], int]:
    """argparse type: a byte_size from `low` to `high` (an operator's typo,
    such as a budget of 0 or of 1 EiB, is a usage error, not a server that
    refuses everything or nothing)."""

    def parse(text: str) -> int:
        n = byte_size(text)
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(
                f"{text!r} is out of range ({_human(low)} to {_human(high)})"
            )
        return n

    return parse


def seconds_between(low: float, high: float, *, low_too: bool = False) -> Callable[[str], float]:
    """argparse type: a number of seconds, more than `low` (or `low` itself,
    with `low_too`) and at most `high`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if low_too:
            if not low <= value <= high:  # also refuses nan
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not a number of seconds from {low:g} to {high:g}"
                )
        elif not low < value <= high:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of seconds above {low:g} and at most {high:g}"
            )
        return value

    return parse


def count_between(low: int, high: int) -> Callable[[str], int]:
    """argparse type: a whole number from `low` to `high`."""

    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {low} to {high}")
        return int(text)

    return parse
