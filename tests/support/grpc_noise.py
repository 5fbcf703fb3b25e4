"""One process, many event loops: the test process runs loop after loop (a
test's, a command's `main` run in-process), and gRPC's asyncio layer keeps one
completion-queue poller per loop, whose threads outlive their loops.  Now and
then a stale poller's wake-up lands in a later loop, whose exception handler
logs 'Exception in callback PollerCompletionQueue._handle_events(...)' with a
traceback through gRPC's own code, into whatever test is running: a test that
checks a command prints no traceback then fails for a reason that is not its
command's.  A service or `vfioctl` process runs one loop, so none of them ever
logs it; only the test process drops it, and nothing else."""

from __future__ import annotations

import logging

POLLER_CALLBACK = "PollerCompletionQueue._handle_events"


class GrpcPollerNoise(logging.Filter):
    """Drops asyncio's report of an exception in gRPC's poller callback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return POLLER_CALLBACK not in record.getMessage()
