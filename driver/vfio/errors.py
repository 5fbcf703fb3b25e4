"""Errors of the VFIO layer are kernel errnos."""

from __future__ import annotations

import errno
import os


class VfioError(OSError):
    """An ioctl/read/write failure: `errno` is what the kernel returns (positive)."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(code, detail or os.strerror(code))
        self.detail = detail

    @property
    def name(self) -> str:
        return errno.errorcode.get(self.errno or 0, f"E{self.errno}")

    def __str__(self) -> str:
        return f"[{self.name}] {self.detail or os.strerror(self.errno or 0)}"
