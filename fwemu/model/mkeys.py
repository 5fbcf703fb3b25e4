"""Host memory the firmware reaches through mkeys: CREATE_MKEY, DESTROY_MKEY and
the bounds checks of a command's (mkey, va, size) range.  Memory the firmware
holds itself (for a driver on another host) is charged to its memory budget
until the mkey is destroyed.

An mkey is `index << 8 | key` as in mlx5 (the index names the entry, the key
byte is its variant), both drawn at random: an mkey cannot be guessed from
another.  It belongs to the principal that created it (fwemu.link.ifc): to
any other principal's command it does not exist.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..link.ifc import (
    CmdResult,
    CmdStatus,
    CreateMkeyIn,
    DestroyMkeyIn,
    MkeyResult,
    Syndrome,
)
from .memory import MemoryBudget, OutOfMemory

if TYPE_CHECKING:
    from .state import FirmwareState


@dataclass(slots=True)
class _Mkey:
    view: memoryview
    owner: str = ""
    principal: str | None = None
    held: int = 0  # bytes the firmware holds for it (charged to its budget)


class MkeyTable:
    MAX_MKEYS = 65536

    def __init__(self, memory: MemoryBudget | None = None) -> None:
        self._mkeys: dict[int, _Mkey] = {}
        self._indexes: set[int] = set()  # the live mkeys' indexes
        self.memory = memory or MemoryBudget.unlimited()

    def __len__(self) -> int:
        return len(self._mkeys)

    def __iter__(self) -> Iterator[int]:
        return iter(self._mkeys)

    def view(self, mkey: int) -> memoryview | None:
        """The memory of `mkey`, whoever's it is (the firmware's own view)."""
        m = self._mkeys.get(mkey)
        return m.view if m else None

    def _find(self, mkey: int, principal: str | None) -> _Mkey | None:
        """`mkey` as `principal`'s command sees it: None unless it is its own."""
        m = self._mkeys.get(mkey)
        return m if m is not None and m.principal == principal else None

    def _new_mkey(self) -> int:
        # A free index (never 0) with a random key byte; the table holds at
        # most MAX_MKEYS of 2^24 indexes, so a draw rarely needs repeating.
        while True:
            mkey = secrets.randbits(32)
            if mkey >> 8 and mkey >> 8 not in self._indexes:
                return mkey

    def add(self, view: memoryview, owner: str, principal: str | None = None) -> int:
        mkey = self._new_mkey()
        self._mkeys[mkey] = _Mkey(view.cast("B"), owner, principal)
        self._indexes.add(mkey >> 8)
        return mkey

    def allocate(self, length: int) -> memoryview:
        """Zeroed memory the firmware will hold for an mkey, charged to the
        budget (OutOfMemory: refused, nothing charged).  `hold` it once the
        mkey exists, or credit it back."""
        self.memory.charge(length, f"{length} bytes of firmware-held host memory")
        try:
            return memoryview(bytearray(length))
        except MemoryError:
            self.memory.credit(length)
            raise OutOfMemory(f"no memory for {length} bytes of host memory") from None

    def hold(self, mkey: int, length: int) -> None:
        """`mkey`'s memory came from `allocate`: credited when it is destroyed."""
        self._mkeys[mkey].held = length

    def remove(self, mkey: int, principal: str | None = None) -> bool:
        """Destroy `principal`'s `mkey`: whether it had it."""
        m = self._find(mkey, principal)
        if m is None:
            return False
        del self._mkeys[mkey]
        self._indexes.discard(mkey >> 8)
        self.memory.credit(m.held)
        return True

    def destroy_owned(self, owner: str) -> int:
        gone = [(k, m.principal) for k, m in self._mkeys.items() if m.owner == owner]
        for k, principal in gone:
            self.remove(k, principal)
        return len(gone)

    def host_range(
        self, mkey: int, va: int, size: int, principal: str | None = None
    ) -> memoryview | CmdResult:
        """The bytes [va, va + size) of `principal`'s mkey, or the command's
        failure (another principal's mkey fails as one that does not exist)."""
        m = self._find(mkey, principal)
        if m is None:
            return _unknown(mkey)
        if va < 0 or size < 0:
            return CmdResult(CmdStatus.BAD_PARAM_ERR, Syndrome.FIELD_RANGE, "negative va or size")
        if va + size > len(m.view):
            return CmdResult(
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.MKEY_RANGE,
                f"va {va} + size {size} exceeds mkey {mkey:#x} of {len(m.view)} bytes",
            )
        return m.view[va : va + size]


def _unknown(mkey: int) -> CmdResult:
    return CmdResult(CmdStatus.BAD_RES_ERR, Syndrome.UNKNOWN_MKEY, f"no mkey {mkey:#x}")


def create_mkey(fw: FirmwareState, cmd: CreateMkeyIn) -> MkeyResult:
    table = fw.mkeys
    if cmd.view.readonly:
        return cmd.result(
            CmdStatus.BAD_PARAM_ERR, Syndrome.FIELD_RANGE, "host memory must be writable"
        )
    if len(table) >= table.MAX_MKEYS:
        return cmd.result(
            CmdStatus.LIM_ERR, Syndrome.TOO_MANY_MKEYS, f"at most {table.MAX_MKEYS} mkeys"
        )
    return MkeyResult(mkey=table.add(cmd.view, cmd.owner, cmd.principal))


def destroy_mkey(fw: FirmwareState, cmd: DestroyMkeyIn) -> CmdResult:
    if not fw.mkeys.remove(cmd.mkey, cmd.principal):
        return _unknown(cmd.mkey)
    return CmdResult()
