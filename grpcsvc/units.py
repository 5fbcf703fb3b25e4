"""Command-line units shared by every command (fwemu, vfio-driver, vfioctl,
the benchmarks): byte sizes as people write them."""

from __future__ import annotations

import argparse

from pydantic import ByteSize, TypeAdapter, ValidationError

_bytes = TypeAdapter(ByteSize)


def byte_size(text: str) -> int:
    """argparse type: '16MiB', '1.5GiB', '4096'."""
    try:
        return int(_bytes.validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (e.g. 4096, 64KiB, 16MiB)"
        ) from None
