"""A vfioctl command: the coroutine that does it, the arguments it takes, and
its help, which is the coroutine's docstring: the first line in vfioctl's
command list, the rest its --help description.  A `Command` works with a
VfioClient connected to --driver; a `LocalCommand` (certs) connects to
nothing.

vfioctl's own options (--driver, --json, --timeout, --tls-*) go before the
command or after it: `add_options` declares them on vfioctl's parser and,
again, on each command's (`add_to`), where they default to nothing, so that
what a command line gives after the command wins and what it leaves out
keeps the value given before it (or the default)."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from grpcsvc.tls import ENV_CA, ENV_CERT, ENV_KEY

from .args import HELP_FORMATTER, NOT_IN_USAGE, seconds
from .output import Out

if TYPE_CHECKING:  # a LocalCommand (certs) needs no grpc
    from ..client import VfioClient

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Run = Callable[["VfioClient", argparse.Namespace, Out], Awaitable[None]]
LocalRun = Callable[[argparse.Namespace, Out], Awaitable[None]]

DEFAULT_DRIVER = "127.0.0.1:50052"
DEFAULT_TIMEOUT = 30.0
DEVICE_HELP = "the device: its PCI name, e.g. 0000:81:00.1 (see `vfioctl list`)"
OPTIONS_TITLE = "vfioctl options (before or after the command)"

# vfioctl's own options: flags and add_argument keywords.  --driver and
# --timeout default to None on vfioctl's parser (main() fills in
# DEFAULT_DRIVER and DEFAULT_TIMEOUT), so that it knows which were given.
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    (
        "--driver",
        dict(metavar="HOST:PORT", help=f"the vfio-driver service (default {DEFAULT_DRIVER})"),
    ),
    ("--json", dict(action="store_true", help="print one JSON document on stdout")),
    (
        "--timeout",
        dict(
            type=seconds,
            metavar="SECONDS",
            help=f"connect timeout and limit for the whole operation (default {DEFAULT_TIMEOUT:g})",
        ),
    ),
    ("--tls-ca", dict(metavar="FILE", help=f"CA to verify the services with (default ${ENV_CA})")),
    (
        "--tls-cert",
        dict(metavar="FILE", help=f"client certificate, for mutual TLS (default ${ENV_CERT})"),
    ),
    ("--tls-key", dict(metavar="FILE", help=f"the client certificate's key (default ${ENV_KEY})")),
]
FLAGS = tuple(flag for flag, _ in OPTIONS)


def add_options(p: argparse.ArgumentParser, *, after_command: bool = False) -> None:
    """vfioctl's own options on `p`: vfioctl's parser, or (after_command) a
    command's, in a group of their own, defaulting to nothing; an option the
    command declares itself (events' --json) stays the command's."""
    if not after_command:
        for flag, kwargs in OPTIONS:
            p.add_argument(flag, **kwargs)
        return
    group = p.add_argument_group(OPTIONS_TITLE)
    for flag, kwargs in OPTIONS:
        if flag not in p._option_string_actions:
            action = group.add_argument(flag, **kwargs, default=argparse.SUPPRESS)
            setattr(action, NOT_IN_USAGE, True)


def add_command_parser(
    sub: Subparsers, name: str, *, help: str | None, description: str | None = None, **kwargs: Any
) -> argparse.ArgumentParser:
    """A command's parser (or a scenario action's): vfioctl's help format."""
    return sub.add_parser(
        name, help=help, description=description, formatter_class=HELP_FORMATTER, **kwargs
    )


def _none(p: argparse.ArgumentParser) -> None:
    """No arguments but the DEVICE, if any."""


def _add_parser(sub: Subparsers, name: str, run: Callable[..., object]) -> argparse.ArgumentParser:
    help, _, description = (inspect.getdoc(run) or "").partition("\n\n")
    return add_command_parser(sub, name, help=help, description=description or None)


@dataclass(frozen=True)
class Command:
    run: Run
    arguments: Callable[[argparse.ArgumentParser], None] = _none
    # It acts on one device, named first: True, or the help of DEVICE.
    device: bool | str = False

    def add_to(self, sub: Subparsers, name: str) -> argparse.ArgumentParser:
        s = _add_parser(sub, name, self.run)
        if self.device:
            device_help = self.device if isinstance(self.device, str) else DEVICE_HELP
            s.add_argument("device", metavar="DEVICE", help=device_help)
        self.arguments(s)
        add_options(s, after_command=True)
        return s


@dataclass(frozen=True)
class LocalCommand:
    run: LocalRun
    arguments: Callable[[argparse.ArgumentParser], None] = _none

    def add_to(self, sub: Subparsers, name: str) -> argparse.ArgumentParser:
        s = _add_parser(sub, name, self.run)
        self.arguments(s)
        add_options(s, after_command=True)
        return s
