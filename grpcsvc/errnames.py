"""Errno names as the kernel spells them (include/uapi/asm-generic/errno*.h),
for ErrorInfo reasons, logs, metrics labels and messages.  Python's
errno.errorcode picks C library aliases where two names share a number
(ENOTSUP for EOPNOTSUPP, EDEADLOCK for EDEADLK); clients in other languages
match the kernel's.  No gRPC here: the pure cores use it too."""

from __future__ import annotations

import errno

# Numbers with two names: the kernel's (the other is a C library alias).
_KERNEL_NAMES = {
    errno.EOPNOTSUPP: "EOPNOTSUPP",  # glibc's ENOTSUP
    errno.EAGAIN: "EAGAIN",  # EWOULDBLOCK
    errno.EDEADLK: "EDEADLK",  # EDEADLOCK
}


def errno_name(code: int, default: str | None = None) -> str:
    """The kernel's name of errno `code` (else `default`, else "E<code>")."""
    name = _KERNEL_NAMES.get(code) or errno.errorcode.get(code)
    if name is not None:
        return name
    return default if default is not None else f"E{code}"
