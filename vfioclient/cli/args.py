"""vfioctl's argument types: each turns a word of the command line into a
value, or an argparse error naming what is wrong with it; and the arguments
several commands declare alike."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Iterable

from grpcsvc.units import byte_size

from ..uapi import MigState
from ..usermem import DATA_PATHS

# An action's attribute: True leaves it out of the usage line.
NOT_IN_USAGE = "vfioctl_not_in_usage"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """vfioctl's --help: each option's default where it has one that means
    something (not None, not a flag's False, not what its help already says),
    and descriptions kept in their paragraphs, each filled to the width
    (an indented block, an example, stays as written)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or re.search(r"\bdefault\b", text, re.IGNORECASE)
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or default in ([], ())
            or not (action.option_strings or action.nargs in ("?", "*"))
        ):
            return text
        if action.type is byte_size and isinstance(default, int):
            return f"{text} (default: {_bytes_text(default)})"
        return f"{text} (default: %(default)s)"

    def add_usage(
        self,
        usage: str | None,
        actions: Iterable[argparse.Action],
        groups: Iterable[argparse._MutuallyExclusiveGroup],
        prefix: str | None = None,
    ) -> None:
        # A command's usage line leaves out vfioctl's options (its help lists them).
        own = [a for a in actions if not getattr(a, NOT_IN_USAGE, False)]
        super().add_usage(usage, own, groups, prefix)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in re.split(r"\n[ \t]*\n", text.strip("\n")):
            lines = para.splitlines()
            if all(line[:1].isspace() for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(super()._fill_text(para, width, indent))
        return "\n\n".join(paragraphs)


def _bytes_text(n: int) -> str:
    """A byte count as --help shows it: 1GiB, 256MiB, 4KiB, else 1000."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


# For every vfioctl parser (and subparser: argparse does not pass it on).
HELP_FORMATTER = HelpFormatter


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
