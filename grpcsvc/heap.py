"""The cyclic garbage collector and a long-lived process's startup objects.

A full (generation 2) collection scans every tracked object.  A service or a
migration agent has tens of thousands of them from its imports and setup
(gRPC, protobuf descriptors, a driver's devices, a firmware's object tables),
and each full collection then stalls the event loop for ~20 ms on this
machine: in the middle of a migration's PRECOPY_INFO, LOAD or switchover.
`freeze_startup_heap` collects once, then moves everything alive into the
permanent generation (gc.freeze): later collections scan only what was made
after.  Frozen objects are still freed by reference counting; only a cycle
among them would stay (none is expected of what a process keeps from its
start)."""

from __future__ import annotations

import gc


def freeze_startup_heap(*, collect: bool = True) -> int:
    """Collect (unless not `collect`: a short-lived command's few cycles of
    garbage are not worth a full collection's time), then freeze what is
    alive: how many objects are frozen now."""
    if collect:
        gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
