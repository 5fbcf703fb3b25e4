"""A vfioctl command: the coroutine that does it, the arguments it takes, and
its help, which is the coroutine's docstring: the first line in vfioctl's
command list, the rest its --help description.  A `Command` works with a
VfioClient connected to --driver; a `LocalCommand` (certs) connects to
nothing."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from .output import Out

if TYPE_CHECKING:  # a LocalCommand (certs) needs no grpc
    from ..client import VfioClient

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Run = Callable[["VfioClient", argparse.Namespace, Out], Awaitable[None]]
LocalRun = Callable[[argparse.Namespace, Out], Awaitable[None]]


def _none(p: argparse.ArgumentParser) -> None:
    """No arguments but the DEVICE, if any."""


def _add_parser(sub: Subparsers, name: str, run: Callable[..., object]) -> argparse.ArgumentParser:
    help, _, description = (inspect.getdoc(run) or "").partition("\n\n")
    return sub.add_parser(name, help=help, description=description)


@dataclass(frozen=True)
class Command:
    run: Run
    arguments: Callable[[argparse.ArgumentParser], None] = _none
    # It acts on one device, named first: True, or the help of DEVICE.
    device: bool | str = False

    def add_to(self, sub: Subparsers, name: str) -> argparse.ArgumentParser:
        s = _add_parser(sub, name, self.run)
        if self.device:
            device_help = self.device if isinstance(self.device, str) else None
            s.add_argument("device", metavar="DEVICE", help=device_help)
        self.arguments(s)
        return s


@dataclass(frozen=True)
class LocalCommand:
    run: LocalRun
    arguments: Callable[[argparse.ArgumentParser], None] = _none

    def add_to(self, sub: Subparsers, name: str) -> argparse.ArgumentParser:
        s = _add_parser(sub, name, self.run)
        self.arguments(s)
        return s
