"""Progress: what a migration tells about itself as it goes (`Progress`), and
`TerminalProgress`, which draws it on stderr when that is a TTY (and CI is
unset)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

log = logging.getLogger(__name__)


class Progress:
    """What the orchestrator tells about its progress; every method does
    nothing here (override what you need).  Exceptions are logged, ignored."""

    def phase(self, name: str) -> None:
        """setup | precopy | switchover | cleanup | completed | failed"""

    def devices(self, names: Sequence[str]) -> None:
        """The devices, once, before anything else about them."""

    def bytes_moved(self, device: str, phase: str, n: int) -> None:
        """`n` more bytes read from the device's source ("precopy" | "stop-copy")."""

    def pending(self, device: str, initial_bytes: int, dirty_bytes: int) -> None:
        """The cached PRECOPY_INFO counters now."""

    def reinit(self, device: str, initial_bytes: int) -> None:
        """A REINIT: new initial bytes."""

    def close(self) -> None:
        """The migration ended (completed or failed)."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}M"


MIN_BAR = 4  # the narrowest bar; narrower still, none, and then the line is cut


def terminal_columns(stream: TextIO) -> int:
    """The width of the terminal `stream` writes to: $COLUMNS if set, else
    the terminal's, else shutil.get_terminal_size()'s (stdout's, or 80)."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return os.get_terminal_size(stream.fileno()).columns or shutil.get_terminal_size().columns
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size().columns


class TerminalProgress(Progress):
    """One line per redraw on stderr with carriage returns: the phase, and per
    device a bar of initial+dirty left against the most seen, and the bytes
    moved.  Draws nothing unless the stream is a TTY and CI is unset.

    The line never wraps: it fits the terminal's width at each redraw (one
    column spare: a full last column wraps on some terminals), narrowing the
    bars first, then leaving them out, then cutting the end; each redraw returns to the start of
    the line and clears it."""

    def __init__(
        self, stream: TextIO | None = None, *, min_interval_s: float = 0.1, width: int = 12
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) and "CI" not in os.environ
        self.min_interval_s = min_interval_s
        self.width = width
        self._phase = ""
        self._names: list[str] = []
        self._moved: dict[str, dict[str, int]] = {}
        self._pending: dict[str, tuple[int, int]] = {}
        self._peak: dict[str, int] = {}
        self._reinits: dict[str, int] = {}
        self._last = 0.0
        self._drawn = 0

    def devices(self, names: Sequence[str]) -> None:
        self._names = list(names)

    def phase(self, name: str) -> None:
        self._phase = name
        self._draw(force=True)

    def bytes_moved(self, device: str, phase: str, n: int) -> None:
        d = self._moved.setdefault(device, {})
        d[phase] = d.get(phase, 0) + n
        self._draw()

    def pending(self, device: str, initial_bytes: int, dirty_bytes: int) -> None:
        self._pending[device] = (initial_bytes, dirty_bytes)
        left = initial_bytes + dirty_bytes
        self._peak[device] = max(self._peak.get(device, 0), left)
        self._draw()

    def reinit(self, device: str, initial_bytes: int) -> None:
        self._reinits[device] = self._reinits.get(device, 0) + 1
        self._peak[device] = initial_bytes
        self._draw(force=True)

    def close(self) -> None:
        self._draw(force=True)
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def line(self, columns: int | None = None) -> str:
        """The progress line, at most `columns - 1` characters (None: any)."""
        bar = self.width
        line = self._line(bar)
        if columns is None:
            return line
        limit = max(columns - 1, 1)
        while len(line) > limit and bar > 0:
            bar = bar - 1 if bar > MIN_BAR else 0  # then no bar: the numbers matter more
            line = self._line(bar)
        return line if len(line) <= limit else line[: limit - 1] + ">"

    def _line(self, width: int) -> str:
        parts = []
        for name in self._names or sorted(self._moved):
            init, dirty = self._pending.get(name, (0, 0))
            peak = self._peak.get(name, 0)
            done = 1.0 if peak == 0 else 1.0 - (init + dirty) / peak
            fill = round(max(0.0, min(1.0, done)) * width)
            moved = self._moved.get(name, {})
            bar = f" [{'#' * fill}{'.' * (width - fill)}]" if width else ""
            parts.append(
                f"{name}{bar}"
                f" init {_mib(init)} dirty {_mib(dirty)}"
                f" pre {_mib(moved.get('precopy', 0))} stop {_mib(moved.get('stop-copy', 0))}"
                + (f" reinit {self._reinits[name]}" if name in self._reinits else "")
            )
        return f"[{self._phase or '-'}] " + "  ".join(parts)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        self.stream.write("\r\x1b[K" + self.line(terminal_columns(self.stream)))
        self.stream.flush()
        self._drawn += 1


def notify(progress: Progress | None, method: str, *args: Any) -> None:
    if progress is None:
        return
    try:
        getattr(progress, method)(*args)
    except Exception:  # progress must never break a migration
        log.exception("progress.%s failed", method)
