"""The progress line in a real terminal (issue 18): `vfioctl demo` runs in a
tmux pane 80 and 200 columns wide, and the pane's text afterwards holds one
progress line, no wider than the pane, and nothing its redraws left behind.

tmux is Debian's (.ci/run installs it); without it the tests skip, except
under CI (CI set), where they fail."""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tools import tool

# A progress line as TerminalProgress draws it: "[phase] DEVICE ... init X dirty Y ...".
PROGRESS = re.compile(r"\[(setup|precopy|switchover|cleanup|completed|failed|-)\] ")
NUMBERS = re.compile(r"init \d+\.\dM dirty \d+\.\dM pre \d+\.\dM stop \d+\.\dM")


class Pane:
    """A tmux server of its own (its socket in a fresh directory) with one
    session `columns` x `rows`, running `command` once."""

    def __init__(self, tmux: str, socket: Path, columns: int, rows: int, command: str) -> None:
        self.tmux = [tmux, "-S", str(socket)]
        self.columns = columns
        # The pane stays after the command: its text is read afterwards.
        script = f'{command}; echo "exit $?"; exec sleep 120'
        self._tmux("new-session", "-d", "-s", "t", "-x", str(columns), "-y", str(rows), script)

    def _tmux(self, *argv: str) -> str:
        return subprocess.run(
            [*self.tmux, *argv], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    def text(self, *, joined: bool = False) -> list[str]:
        """The pane's lines, its history included; `joined`: a line the
        terminal wrapped as one line again (capture-pane -J)."""
        argv = ["capture-pane", "-p", "-S", "-", "-t", "t", *(["-J"] if joined else [])]
        return [line.rstrip() for line in self._tmux(*argv).splitlines()]

    def wait_exit(self, timeout: float = 90) -> int:
        """The command's exit status, once it printed it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.text(joined=True):
                if m := re.fullmatch(r"exit (\d+)", line):
                    return int(m.group(1))
            time.sleep(0.2)
        raise AssertionError("the command did not end:\n" + "\n".join(self.text()))

    def kill(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._tmux("kill-server")


@contextlib.contextmanager
def pane(columns: int, rows: int, argv: list[str]) -> Iterator[Pane]:
    tmux = tool("tmux", "Debian package tmux", optional=True)
    # A short directory: a unix socket's path has a length limit.
    where = Path(tempfile.mkdtemp(prefix="tmux-", dir="/tmp"))
    # The progress line draws only outside CI: the pane's command unsets it.
    command = "env -u CI -u COLUMNS -u LINES " + shlex.join(argv)
    p = Pane(tmux, where / "socket", columns, rows, command)
    try:
        yield p
    finally:
        p.kill()
        shutil.rmtree(where, ignore_errors=True)


DEMO = [sys.executable, "-m", "vfioclient.cli", "demo", "--size", "16MiB"]


@pytest.mark.parametrize("columns", [80, 200])
def test_the_demos_progress_line_fits_the_terminal(columns: int) -> None:
    with pane(columns, 40, DEMO) as p:
        status = p.wait_exit()
        rows, lines = p.text(), p.text(joined=True)
    shown = "\n".join(lines)
    assert status == 0, shown
    assert "migration completed" in shown and "digests equal" in shown
    assert all(len(row) <= columns for row in rows), shown
    # One progress line, the last drawn, and no piece of another.
    drawn = [line for line in lines if PROGRESS.search(line)]
    assert len(drawn) == 1, shown
    assert len([line for line in lines if NUMBERS.search(line)]) == 1, shown
    (line,) = drawn
    assert line.startswith("[completed] 0000:81:00.1"), shown
    assert len(line) < columns, shown  # never the last column: no wrap anywhere
    assert "reinit 1" in line and not line.endswith(">"), shown  # it fits without a cut
    if columns == 200:
        assert "[############]" in line, shown  # room for the whole bar


def test_a_narrow_terminal_cuts_the_line() -> None:
    """40 columns: the bar goes, then the end of the line (marked '>')."""
    with pane(40, 40, DEMO) as p:
        status = p.wait_exit()
        lines = p.text(joined=True)
    shown = "\n".join(lines)
    assert status == 0, shown
    drawn = [line for line in lines if PROGRESS.search(line)]
    assert len(drawn) == 1, shown
    assert len(drawn[0]) == 39 and drawn[0].endswith(">") and "[#" not in drawn[0], shown
