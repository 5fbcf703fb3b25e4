"""A system call runs to its end, whatever happens to its caller.

An ioctl, close(2) or write(2) on a VFIO device or data fd is not
interrupted halfway: mlx5's command waits are uninterruptible, and a process
killed in the middle of one dies only once the call has returned.  A gRPC
handler, on the other hand, is cancelled where it stands when its client goes
away or its deadline passes.  Cancelled in the middle of an ioctl, it would
leave what the kernel never leaves: a data buffer allocated but on no list
(a leaked mkey), a SAVE issued with nobody to queue its record, an arc half
walked, an fd out of the table whose device was never closed.

So the service runs those calls through `Calls.run`: the call is a task of
its own, shielded; a cancelled caller stops waiting for it, and the call
finishes unobserved, its answer dropped as a dead process's would be.  Only
the waits a signal does interrupt (a blocking read waiting for data,
wait_event_interruptible) are left outside: there nothing has been done yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from driver.vfio.errors import VfioError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Calls:
    """The system calls still running for callers that went away."""

    def __init__(self) -> None:
        self.orphans: set[asyncio.Task[Any]] = set()

    async def run(self, call: Coroutine[Any, Any, T]) -> T:
        """`call`'s result; if the caller is cancelled, `call` still runs to its end."""
        task = asyncio.get_running_loop().create_task(call)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                self.orphans.add(task)
                task.add_done_callback(self._ended)
            raise

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self.orphans.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved: never "exception was never retrieved"
        if exc is not None and not isinstance(exc, VfioError):
            log.error("a call whose caller went away failed", exc_info=exc)

    async def drain(self) -> None:
        """Wait for the calls still running (the server is stopping)."""
        while self.orphans:
            await asyncio.gather(*self.orphans, return_exceptions=True)
