"""Firmware shards: which `fwemu serve` holds which device.

At scale the VFs live in N firmware processes (shards); a driver serves the
VFs of all of them.  Shard k's VF with function id f is the PCI device
`{k:04x}:81:{f >> 3:02x}.{f & 7}`: the PCI domain names the shard, so shard 0
keeps the single-firmware names, and anyone holding a device name and the
shard map finds the device's firmware without asking a driver.

The shard map is a SPEC (`--firmware-shards`, or VFIO_FIRMWARE_SHARDS):

* `HOST:PORT,HOST:PORT,...`: shard i is the i-th address;
* `TEMPLATE@N`: shards 0..N-1, shard k at TEMPLATE with `{shard}` replaced by
  k, e.g. `fwemu-{shard}.fwemu.vfio.svc.cluster.local:50051@4` (the stable DNS
  names of a StatefulSet's pods behind its headless Service).

Pure: parsing and naming only, no I/O.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass

SHARDS_ENV = "VFIO_FIRMWARE_SHARDS"
PLACEHOLDER = "{shard}"
MAX_SHARDS = 1 << 16  # a PCI domain is 16 bits
PCI_BUS = 0x81

# A DNS name or IPv4 address, or an IPv6 address in brackets; then a port.
_HOST = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\]"
_ADDRESS = re.compile(rf"(?:{_HOST}):([0-9]+)")
_PCI_NAME = re.compile(r"([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2,})\.([0-7])", re.IGNORECASE)


class ShardSpecError(ValueError):
    """A malformed shard SPEC, or a device the shard map does not cover."""


@dataclass(frozen=True)
class ShardMap:
    """Shard k's firmware is at `addresses[k]`; `template` is set when the map
    came from `TEMPLATE@N` (so that `spec` gives the same form back)."""

    addresses: tuple[str, ...]
    template: str | None = None

    @property
    def count(self) -> int:
        return len(self.addresses)

    @property
    def spec(self) -> str:
        """The SPEC that parses to this map."""
        if self.template is not None:
            return f"{self.template}@{self.count}"
        return ",".join(self.addresses)

    def address(self, shard: int) -> str:
        if not 0 <= shard < self.count:
            raise ShardSpecError(f"no shard {shard}: the shard map has shards 0..{self.count - 1}")
        return self.addresses[shard]

    def address_of(self, device: str) -> str:
        """The firmware (HOST:PORT) that holds `device`."""
        shard = shard_of(device)
        if shard >= self.count:
            raise ShardSpecError(
                f"{device} is on shard {shard} (PCI domain {shard:04x}), "
                f"but the shard map has shards 0..{self.count - 1}"
            )
        return self.addresses[shard]


def _check_address(address: str, where: str) -> str:
    m = _ADDRESS.fullmatch(address)
    if m is None or not 0 < int(m.group(1)) < 1 << 16:
        raise ShardSpecError(f"{where}: {address!r} is not HOST:PORT (port 1..65535)")
    return address


def from_template(template: str, count: int) -> ShardMap:
    """Shards 0..count-1 at `template` with `{shard}` replaced by the shard number."""
    if PLACEHOLDER not in template:
        raise ShardSpecError(f"template {template!r} has no {PLACEHOLDER}")
    if "{" in template.replace(PLACEHOLDER, "") or "}" in template.replace(PLACEHOLDER, ""):
        raise ShardSpecError(f"template {template!r}: the only placeholder is {PLACEHOLDER}")
    if "," in template or "@" in template:
        raise ShardSpecError(f"template {template!r} holds ',' or '@' (one TEMPLATE@N)")
    if not 0 < count <= MAX_SHARDS:
        raise ShardSpecError(f"{count} shards: a shard map has 1..{MAX_SHARDS} shards")
    addresses = tuple(
        _check_address(template.replace(PLACEHOLDER, str(k)), f"shard {k}") for k in range(count)
    )
    return ShardMap(addresses, template)


def from_addresses(addresses: list[str]) -> ShardMap:
    """Shard i at addresses[i]."""
    if not 0 < len(addresses) <= MAX_SHARDS:
        raise ShardSpecError(f"{len(addresses)} shards: a shard map has 1..{MAX_SHARDS} shards")
    seen: dict[str, int] = {}
    for k, address in enumerate(addresses):
        if not address:
            raise ShardSpecError(f"shard {k}: empty address (a stray ',')")
        _check_address(address, f"shard {k}")
        if address in seen:
            # One firmware under two domains would show each VF as two devices.
            raise ShardSpecError(f"shards {seen[address]} and {k} are both {address}")
        seen[address] = k
    return ShardMap(tuple(addresses))


def parse_shards(spec: str) -> ShardMap:
    """`HOST:PORT,HOST:PORT,...` or `TEMPLATE@N` (TEMPLATE containing `{shard}`)."""
    spec = spec.strip()
    if not spec:
        raise ShardSpecError("empty shard map: give HOST:PORT,... or TEMPLATE@N")
    if PLACEHOLDER in spec or "@" in spec:
        template, at, count = spec.rpartition("@")
        if not at:
            raise ShardSpecError(f"{spec!r}: a TEMPLATE with {PLACEHOLDER} needs @N (the count)")
        if not (count.isascii() and count.isdigit()):
            raise ShardSpecError(f"{spec!r}: @{count} is not a shard count")
        return from_template(template, int(count))
    return from_addresses([a.strip() for a in spec.split(",")])


def shards_from_env(environ: Mapping[str, str]) -> ShardMap | None:
    """The shard map in VFIO_FIRMWARE_SHARDS; None if it is unset or blank."""
    text = environ.get(SHARDS_ENV, "")
    if not text.strip():
        return None
    try:
        return parse_shards(text)
    except ShardSpecError as e:
        raise ShardSpecError(f"{SHARDS_ENV}: {e}") from None


def shards_argument(text: str) -> ShardMap:
    """argparse type for a --firmware-shards SPEC."""
    try:
        return parse_shards(text)
    except ShardSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def pci_name(function_id: int, shard: int = 0) -> str:
    """VF n of shard k's PF (k:81:00.0) sits at k:81:<n / 8>.<n % 8>."""
    return f"{shard:04x}:{PCI_BUS:02x}:{function_id >> 3:02x}.{function_id & 7}"


def parse_pci_name(name: str) -> tuple[int, int]:
    """(shard, function id) of a device name made by `pci_name`."""
    m = _PCI_NAME.fullmatch(name)
    if m is None:
        raise ShardSpecError(f"{name!r} is not a PCI device name (DDDD:BB:dd.f)")
    domain, _, dev, fn = m.groups()
    return int(domain, 16), (int(dev, 16) << 3) | int(fn)


def shard_of(name: str) -> int:
    """The shard that holds device `name`: its PCI domain."""
    return parse_pci_name(name)[0]
