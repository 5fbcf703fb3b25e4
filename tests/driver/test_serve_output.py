"""What `vfio-driver serve` and `fwemu serve` print as processes (issue 18):
each start message once where stdout and stderr are one place (a terminal,
`2>&1`), a log of SIGTERM (received, draining, stopped), and a taken port
named as EADDRINUSE without gRPC core's own raw line before it.  Both
services' serve commands are grpcsvc's, so both are tested here."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
from collections.abc import Iterator

import pytest

from grpcsvc.spawn import DRIVER, FWEMU
from tests.support import tls_mode

pytestmark = pytest.mark.grpc

SERVICES = {
    "vfio-driver": [*DRIVER, "--vfs", "1", "--size", "64KiB"],
    "fwemu": [*FWEMU, "--vfs", "1", "--size", "64KiB"],
}


class Served:
    """A service with its stdout and stderr on one pipe (as on a terminal),
    or each on its own; its lines read as they come."""

    def __init__(self, argv: list[str], *, one_place: bool) -> None:
        self.proc = subprocess.Popen(
            [*argv, *tls_mode.server_args()],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if one_place else subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        assert self.proc.stdout is not None
        self.readers = [threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)]
        if self.proc.stderr is not None:
            self.readers.append(
                threading.Thread(target=self.err.extend, args=(self.proc.stderr,), daemon=True)
            )
        for r in self.readers:
            r.start()

    def _read(self, stream: Iterator[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def until(self, text: str, timeout: float = 30) -> list[str]:
        """The lines up to the first with `text`."""
        seen: list[str] = []
        while not any(text in line for line in seen):
            try:
                seen.append(self.lines.get(timeout=timeout))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"no {text!r} in {seen}") from None
        return seen

    def terminate(self) -> tuple[int, list[str], str]:
        """SIGTERM: the exit status, the rest of stdout, and stderr."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=20)
        for r in self.readers:
            r.join(timeout=10)
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        return rc, rest, "".join(self.err)


@pytest.fixture(name="kill")
def kill_fixture() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


@pytest.mark.parametrize("name", SERVICES)
def test_start_messages_once_and_sigterm_logged(name: str, kill: list[Served]) -> None:
    """On one terminal (stdout and stderr the same pipe): "serving" and
    "metrics on" once each; SIGTERM: received and draining, then stopped."""
    argv = [*SERVICES[name], "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
    s = Served(argv, one_place=True)
    kill.append(s)
    started = s.until("metrics on")
    rc, rest, _ = s.terminate()
    out = [*started, *rest]
    assert rc == 0, out
    assert len([line for line in out if "serving" in line]) == 1, out
    assert len([line for line in out if "metrics on" in line]) == 1, out
    assert started[-2].startswith(f"{name}: serving 1 ") and started[-1].startswith(
        f"{name}: metrics"
    )
    received = [line for line in out if "received SIGTERM" in line]
    assert len(received) == 1 and "draining calls in progress (up to 5 s)" in received[0], out
    assert out[-1].endswith(f"{name} stopped"), out
    assert "Traceback" not in "\n".join(out)


@pytest.mark.parametrize("name", SERVICES)
def test_apart_stdout_has_the_line_and_the_log_the_record(name: str, kill: list[Served]) -> None:
    """stdout and stderr apart (a log file, a pipeline): the line for scripts
    on stdout, the record, with its details, in the log."""
    s = Served([*SERVICES[name], "--listen", "127.0.0.1:0"], one_place=False)
    kill.append(s)
    started = s.until("serving")
    rc, rest, err = s.terminate()
    assert rc == 0, err
    assert [line for line in [*started, *rest] if "serving" in line] == started[-1:]
    detail = "(embedded firmware)" if name == "vfio-driver" else "(clock real)"
    logged = [line for line in err.splitlines() if "serving" in line]
    assert len(logged) == 1 and logged[0].endswith(detail), err
    assert "received SIGTERM" in err and f"{name} stopped" in err


@pytest.mark.parametrize("taker", SERVICES)
@pytest.mark.parametrize("name", SERVICES)
def test_a_port_in_use_is_eaddrinuse_without_grpc_cores_line(
    name: str, taker: str, kill: list[Served]
) -> None:
    first = Served([*SERVICES[taker], "--listen", "127.0.0.1:0"], one_place=False)
    kill.append(first)
    target = first.until("serving")[-1].rsplit(" on ", 1)[1]
    second = subprocess.run(
        [*SERVICES[name], "--listen", target, *tls_mode.server_args()],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "add_port.cc" not in second.stderr, second.stderr
    lines = second.stderr.splitlines()
    assert lines == [
        f"{name}: error: cannot listen on {target}: EADDRINUSE: address already in use "
        "(another process serves that port)"
    ], second.stderr


@pytest.mark.parametrize("name", SERVICES)
def test_the_start_up_heap_is_frozen_before_serving(name: str, kill: list[Served]) -> None:
    """Both services freeze what their start-up made out of the cyclic GC's
    full collections (grpcsvc.heap) before they say they serve: a full
    collection scanning it stalled a migration's ioctls for ~20 ms."""
    argv = [*SERVICES[name], "--listen", "127.0.0.1:0", "--log-level", "debug"]
    s = Served(argv, one_place=True)
    kill.append(s)
    started = s.until("serving")
    rc, _, _ = s.terminate()
    assert rc == 0
    frozen = [line for line in started if "start-up objects frozen" in line]
    assert len(frozen) == 1, started
    count = int(frozen[0].split(" start-up objects")[0].rsplit(" ", 1)[1])
    assert count > 10_000, frozen  # the imports alone are tens of thousands
