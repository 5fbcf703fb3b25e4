"""One event loop per process: uvloop by default, plain asyncio on request;
and a command's exit status from the coroutine it runs."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal, TypeAlias, TypeVar, get_args

import uvloop

T = TypeVar("T")
LoopName = Literal["uvloop", "asyncio"]
ErrorKinds: TypeAlias = type[Exception] | tuple[type[Exception], ...]

SIGINT_STATUS = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def loop_factory(name: LoopName) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        return uvloop.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    raise ValueError(f"unknown event loop {name!r} (uvloop or asyncio)")


def add_loop_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loop", choices=list(get_args(LoopName)), default="uvloop")


def run(main: Coroutine[Any, Any, T], loop: LoopName = "uvloop") -> T:
    """Run `main` on a fresh loop; every server and channel must be made inside it."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)


def run_main(
    prog: str,
    main: Coroutine[Any, Any, int],
    errors: Mapping[ErrorKinds, int],
    loop: LoopName = "uvloop",
) -> int:
    """A command's exit status: what `main` returns; for an error of a kind in
    `errors` (tried in order) its status, after '{prog}: error: ...' on stderr;
    SIGINT_STATUS for Ctrl-C.  Any other error propagates."""
    try:
        return run(main, loop)
    except KeyboardInterrupt:
        return SIGINT_STATUS
    except Exception as e:
        for kinds, status in errors.items():
            if isinstance(e, kinds):
                print(f"{prog}: error: {e}", file=sys.stderr)
                return status
        raise
