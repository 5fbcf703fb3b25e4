"""Both halves in this process (one host, or one orchestrator for two
drivers): the stream is a bounded queue per device (the destination half's),
the return path the shared SwitchoverAck, and the user memory one segment
both drivers map (a buffer read by the source driver is written by the
destination driver from the same pages)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..client import VfioClient
from ..uapi import MigState
from .destination import DestinationDevice
from .link import DestinationLink, Destinations
from .options import DevicePair
from .stream import StreamItem

if TYPE_CHECKING:
    from .device import DeviceMigration

S = MigState


class LocalLink(DestinationLink):
    """A device's destination half in this process."""

    def __init__(self, d: DeviceMigration, pair: DevicePair) -> None:
        self.device = d
        self.half = DestinationDevice(
            pair.destination,
            pair.destination_fd,
            d.name,
            stream_depth=d.options.stream_depth,
            approve=self._approve,
            multifd=d.multifd,
        )

    async def _approve(self, generation: int) -> None:
        d = self.device
        if d.options.on_switchover_ack is not None:
            await d.options.on_switchover_ack(d)
        if d.ack.approve(d.name, generation):
            d.report.acks += 1

    @property
    def memory_clients(self) -> Sequence[VfioClient]:
        return (self.half.client,)

    def memory_mapped(self, mapped: bool) -> None:
        self.data_path = "shm" if mapped else "grpc"

    async def start(self) -> None:
        await self.half.setup()

    async def send(self, item: StreamItem) -> None:
        await self.half.feed(item)

    def check(self) -> None:
        self.half.check()

    @property
    def failed(self) -> asyncio.Future[None]:
        return self.half.loader

    async def written(self) -> None:
        await self.half.loaded()


def _half(d: DeviceMigration) -> DestinationDevice:
    assert isinstance(d.link, LocalLink)
    return d.link.half


class LocalDestinations(Destinations):
    async def setup(self, devices: Sequence[DeviceMigration]) -> None:
        for d in devices:
            await _half(d).discover()

    async def complete(self, devices: Sequence[DeviceMigration]) -> None:
        if not self.stop_before_start:
            return  # start() takes them out of RESUMING, as QEMU's vm start does
        for d in devices:  # RESUMING -> STOP: the driver loads and validates
            await _half(d).set_state(S.STOP, None)

    async def start(self, devices: Sequence[DeviceMigration]) -> None:
        for d in devices:
            if _half(d).p2p:
                await _half(d).set_state(S.RUNNING_P2P, None)
        for d in devices:
            await _half(d).set_state(S.RUNNING, None)

    async def abort(self, devices: Sequence[DeviceMigration], error: BaseException) -> None:
        for d in devices:
            await _half(d).abort()
