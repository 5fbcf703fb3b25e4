"""One event loop per process: uvloop by default, plain asyncio on request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

import uvloop

T = TypeVar("T")
LoopName = Literal["uvloop", "asyncio"]


def loop_factory(name: LoopName) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        return uvloop.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    raise ValueError(f"unknown event loop {name!r} (uvloop or asyncio)")


def run(main: Coroutine[Any, Any, T], loop: LoopName = "uvloop") -> T:
    """Run `main` on a fresh loop; every server and channel must be made inside it."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)
