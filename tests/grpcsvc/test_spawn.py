"""grpcsvc.spawn, the one way tests and benchmarks start services: the
address a server announces, its stderr when it fails to start, its exit code
when stopped, a hung one killed, and one whose harness was killed stopping."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpcsvc import spawn
from tests.support.tools import tool

ROOT = Path(__file__).resolve().parents[2]


def fake_server(body: str) -> list[str]:
    """A process that runs `body` with `sys`, `signal`, `time` and `listen`
    (the value of its --listen, '?' without one) at hand."""
    prelude = (
        "import signal, sys, time\n"
        "listen = sys.argv[sys.argv.index('--listen') + 1] if '--listen' in sys.argv else '?'\n"
    )
    return [sys.executable, "-c", prelude + body, "fake"]


ANNOUNCE = "print(f'fake: serving 1 thing on {listen}', flush=True)\n"
# Stops on SIGTERM with exit code 7 and a last word on stderr.
UNTIL_SIGTERM = (
    "def bye(*_):\n"
    "    sys.stderr.write('bye\\n')\n"
    "    sys.exit(7)\n"
    "signal.signal(signal.SIGTERM, bye)\n" + ANNOUNCE + "time.sleep(60)\n"
)


def test_start_returns_the_address_the_server_announced() -> None:
    proc, target = spawn.start([*fake_server(UNTIL_SIGTERM), "--listen", "10.0.0.1:5"])
    assert target == "10.0.0.1:5"
    assert spawn.stop(proc) == (7, "bye\n")


def test_a_server_that_exits_at_start_is_reported_with_its_stderr() -> None:
    argv = fake_server("sys.stderr.write('cannot listen: address in use\\n'); sys.exit(1)")
    with pytest.raises(RuntimeError, match="probe did not start: cannot listen: address in use"):
        spawn.start(argv, "probe")


def test_a_server_that_says_something_else_first_is_killed_and_reported() -> None:
    # stderr first, so that it is there when the first line is read
    argv = fake_server(
        "sys.stderr.write('why\\n')\nsys.stderr.flush()\nprint('hello', flush=True)\ntime.sleep(60)"
    )
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=r"did not start: hello\nwhy"):
        spawn.start(argv)
    assert time.monotonic() - began < 30  # killed, not waited for


def test_metrics_url_is_the_one_the_line_after_serving_names() -> None:
    body = ANNOUNCE + "print('fake: metrics on http://127.0.0.1:9/metrics', flush=True)\n"
    proc, _ = spawn.start([*fake_server(body + "time.sleep(60)")])
    try:
        assert spawn.metrics_url(proc) == "http://127.0.0.1:9/metrics"
    finally:
        spawn.stop(proc)


def test_a_service_that_does_not_name_its_metrics_is_an_error() -> None:
    proc, _ = spawn.start([*fake_server(ANNOUNCE + "print('ready', flush=True)\ntime.sleep(60)")])
    try:
        with pytest.raises(RuntimeError, match="probe did not say where its metrics are: 'ready"):
            spawn.metrics_url(proc, "probe")
    finally:
        spawn.stop(proc)


def test_stop_returns_the_exit_code_and_stderr() -> None:
    proc, _ = spawn.start(fake_server(UNTIL_SIGTERM))
    assert spawn.stop(proc) == (7, "bye\n")


def test_stop_of_a_process_already_signalled_only_waits() -> None:
    proc, _ = spawn.start(fake_server(UNTIL_SIGTERM))
    proc.terminate()
    assert spawn.stop(proc, signal_it=False) == (7, "bye\n")


def test_a_server_that_ignores_sigterm_is_killed() -> None:
    proc, _ = spawn.start(
        fake_server("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + ANNOUNCE + "time.sleep(60)")
    )
    with pytest.raises(subprocess.TimeoutExpired):
        spawn.stop(proc, timeout=0.5)
    assert proc.returncode == -signal.SIGKILL


def test_served_listens_on_a_free_local_port_and_stops_the_server() -> None:
    with spawn.served(fake_server(UNTIL_SIGTERM)) as (proc, target):
        assert target == "127.0.0.1:0"
        assert proc.poll() is None
    assert proc.returncode == 7


def test_served_arguments_come_after_listen_and_may_override_it() -> None:
    override = "listen = sys.argv[sys.argv.index('--listen', sys.argv.index('--listen') + 1) + 1]\n"
    with spawn.served(fake_server(override + UNTIL_SIGTERM), "--listen", "127.0.0.2:9") as (
        _,
        target,
    ):
        assert target == "127.0.0.2:9"


def test_served_services_announce_where_they_serve() -> None:
    with spawn.served(spawn.FWEMU, "--vfs", "0", "--log-level", "error") as (proc, target):
        host, _, port = target.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0 and proc.poll() is None
    assert proc.returncode == 0


def test_dying_with_parent_wraps_the_command_in_setpriv_where_there_is_one() -> None:
    wrapped = spawn.dying_with_parent(["fwemu", "serve"])
    setpriv = shutil.which("setpriv")
    if setpriv is None or not sys.platform.startswith("linux"):
        assert wrapped == ["fwemu", "serve"]
    else:
        assert wrapped == [setpriv, "--pdeathsig", "TERM", "--", "fwemu", "serve"]


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_service_stops_when_its_harness_is_killed() -> None:
    """A harness SIGKILLed (a benchmark killed, a test worker crashed) cannot
    stop its services: they get SIGTERM from the kernel and stop as from an
    operator's, instead of serving on for ever."""
    tool("setpriv", "util-linux", optional=True)
    harness = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from grpcsvc import spawn\n"
            "with spawn.served(spawn.FWEMU, '--vfs', '0', '--log-level', 'error') as (p, _):\n"
            "    print(p.pid, flush=True)\n"
            "    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert harness.stdout is not None
    service = int(harness.stdout.readline())
    try:
        harness.kill()
        harness.wait(10)
        # The service was the harness's child: init reaps it once it exits.
        assert _gone(service, 15), f"fwemu {service} still runs after its harness was killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(service, signal.SIGKILL)
