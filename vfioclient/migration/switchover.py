"""The return path's switchover-ack (QEMU's vfio_switchover_ack_needed /
qemu_loadvm_approve_switchover), shared by every device of a migration."""

from __future__ import annotations


class SwitchoverAck:
    """The return path's switchover-ack, re-usable as in QEMU 11.1: a device
    requests an ack (again after a REINIT); the destination approves the
    request it has seen INIT_DATA_SENT for.  Requests carry a generation, so
    an approval for an INIT_DATA_SENT sent before a re-arm does not count."""

    def __init__(self) -> None:
        self._generation: dict[str, int] = {}
        self._pending: set[str] = set()
        self.decided = False

    def request(self, device: str) -> int:
        gen = self._generation.get(device, 0) + 1
        self._generation[device] = gen
        self._pending.add(device)
        return gen

    def generation(self, device: str) -> int:
        return self._generation.get(device, 0)

    def approve(self, device: str, generation: int) -> bool:
        if generation != self._generation.get(device):
            return False
        self._pending.discard(device)
        return True

    @property
    def all_acked(self) -> bool:
        return not self._pending

    @property
    def pending(self) -> frozenset[str]:
        return frozenset(self._pending)
