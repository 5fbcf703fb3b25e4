"""grpcsvc.heap: a process's start-up objects frozen out of full collections."""

from __future__ import annotations

import gc

from grpcsvc.heap import freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic GC frees it


def collected(obj: object) -> bool:
    """`obj` is in the collector's generations (not frozen out of them)."""
    return any(o is obj for o in gc.get_objects())


def test_freeze_moves_what_is_alive_and_leaves_later_objects_collectable() -> None:
    # Counts only as lower bounds: another thread of this process (pytest-xdist's
    # channel, gRPC's pollers) may free frozen objects between two reads.
    before = gc.get_freeze_count()
    try:
        alive = Node()
        assert collected(alive)
        assert freeze_startup_heap() > before
        assert not collected(alive)  # frozen with the rest of what is alive
        later = Node()
        assert freeze_startup_heap(collect=False) > before and not collected(later)
        # A cycle made after the freeze is still collected.
        gc.collect()
        gone = Node()
        ident = id(gone)
        del gone
        assert gc.collect() >= 1
        assert all(id(o) != ident for o in gc.get_objects())
    finally:
        gc.unfreeze()  # give this test process its full collections back


def test_a_command_run_in_this_process_does_not_freeze_it() -> None:
    """vfioctl freezes its heap as a program (main() with its own command
    line), never a caller's process: a test, a library user calling main()."""
    from vfioclient.cli.main import main

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    # Nothing listens there: the command fails after its module is imported,
    # where the program would have frozen its heap.
    assert main(["--driver", "127.0.0.1:1", "--timeout", "2", "list"]) != 0
    assert gc.get_freeze_count() == 0
