"""What vfioctl prints: a command's result (text, or one JSON document with
--json) and its errors (the errno name and a hint; exit 1)."""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Sequence
from typing import Any

from grpcsvc.errnames import errno_name

PROG = "vfioctl"

HINTS = {
    errno.ENOTTY: "the device has no migration support (or the feature is not implemented)",
    errno.ENOMSG: "no data available right now (PRE_COPY): read again later",
    errno.ENOENT: "no such device: see `vfioctl list`",
    errno.EINVAL: "the request is not valid in the device's current state (see `vfioctl show`)",
    errno.EBUSY: "the device is busy (another client or an operation in progress)",
    errno.ENODEV: "the data stream is in error: reset the device (`vfioctl reset`)",
    errno.EIO: "the firmware or the service failed the operation",
    errno.EREMOTEIO: "the firmware rejected the command",
    errno.ETIMEDOUT: "the operation timed out (raise --timeout?)",
    errno.EOPNOTSUPP: "the operation is not supported by this device",
}


class CliError(Exception):
    """An expected failure: exit 1 with an errno name and a hint."""

    def __init__(self, code: int, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.errno = code
        self.hint = hint


class Out:
    def __init__(self, as_json: bool) -> None:
        self.json = as_json

    def line(self, text: str) -> None:
        if not self.json:
            print(text, flush=True)

    def doc(self, doc: Any) -> None:
        if self.json:
            print(json.dumps(doc, indent=2, default=str), flush=True)

    def note(self, text: str) -> None:
        """A remark on stderr (stdout stays the result, JSON or text)."""
        print(f"vfioctl: {text}", file=sys.stderr, flush=True)


def table(header: Sequence[str], rows: Sequence[Sequence[object]], right: str = "") -> list[str]:
    """Aligned columns, each as wide as its widest cell (two spaces apart):
    the header line, then a line per row; a column whose header is in
    `right` (space-separated names) is aligned right, the others left; the
    last column has no padding after it."""
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    flush_right = set(right.split())
    lines = []
    for line in cells:
        padded = [
            c.rjust(w) if name in flush_right else c.ljust(w)
            for c, w, name in zip(line, widths, header, strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
    return lines


def fail(out: Out, code: int, message: str, hint: str | None) -> int:
    name = errno_name(code)
    if out.json:
        print(
            json.dumps({"error": {"errno": code, "name": name, "message": message, "hint": hint}}),
            flush=True,
        )
    print(f"{PROG}: error: {name}: {message}", file=sys.stderr)
    if hint:
        print(f"{PROG}: hint: {hint}", file=sys.stderr)
    return 1
