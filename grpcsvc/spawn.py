"""The project's services as child processes: start one, learn the address it
announced ('serving ... on HOST:PORT'), stop it the way an operator does
(SIGTERM, then SIGKILL if it hangs).  Used by the tests and the benchmarks, so
that every harness starts services one way.

Where util-linux's `setpriv` is on PATH, a service started here gets SIGTERM
when the thread that started it ends (Linux's parent-death signal, which
`setpriv --pdeathsig` sets before it execs the service: same pid), so it stops
even when its harness cannot stop it, a benchmark or a test worker killed by
SIGKILL or the OOM killer.  Start services from the thread that stops them
(the main thread, in practice).  Not by a `preexec_fn`: Python code between
fork and exec deadlocks now and then in a process with gRPC's threads.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence

FWEMU = [sys.executable, "-m", "fwemu.cli", "serve"]
DRIVER = [sys.executable, "-m", "driver.cli", "serve"]
_METRICS = re.compile(r"metrics on (http://\S+/metrics)")


def dying_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` run so that it gets SIGTERM when this thread ends (through
    `setpriv --pdeathsig`), or as it is where there is no setpriv."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else list(argv)


def start(argv: Sequence[str], what: str = "") -> tuple[subprocess.Popen[str], str]:
    """Start `argv`, a server that prints '...serving ... on HOST:PORT' once it
    is up; (the process, HOST:PORT).  A server that exits or prints anything
    else first is killed and reported with what it wrote to stderr."""
    proc = subprocess.Popen(
        dying_with_parent(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise RuntimeError(f"{what or argv[0]} did not start: {line}{err}")
    return proc, line.rsplit(" on ", 1)[1].strip()


def metrics_url(proc: subprocess.Popen[str], what: str = "") -> str:
    """The /metrics URL a service started with --metrics-listen announced:
    the line after its 'serving ...' (read it right after `start`)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = _METRICS.search(line)
    if found is None:
        raise RuntimeError(f"{what or 'the service'} did not say where its metrics are: {line!r}")
    return found.group(1)


def stop(
    proc: subprocess.Popen[str], timeout: float = 15, *, signal_it: bool = True
) -> tuple[int, str]:
    """SIGTERM (unless it was sent already); the exit code and what it wrote to
    stderr.  A process still running after `timeout` seconds is killed and
    TimeoutExpired raised."""
    if signal_it and proc.poll() is None:
        proc.terminate()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


@contextlib.contextmanager
def served(command: Sequence[str], *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run a service on a free port of 127.0.0.1 (later `args` may override
    --listen); yields (process, HOST:PORT) and stops it on the way out."""
    proc, target = start([*command, "--listen", "127.0.0.1:0", *args], command[-1])
    try:
        yield proc, target
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            stop(proc, 10)
