"""The source agent's side of a migration across hosts: the destinations are
behind a destination agent (incoming.py) reached over one connection, as
QEMU's source reaches `qemu -incoming`.  The migration stream goes out on it
(wire.py), the return path comes back on it: READY (every destination
RESUMING, each side's data path), SWITCHOVER_ACK (counted by the source's
SwitchoverAck only for the generation it was requested with), LOADED (with
the destination digests), RUNNING (the end of the downtime), ERROR (a
destination failure and its errno).

Each device's data moves between the source driver and this process through
this process's user memory (usermem.py) and goes from a buffer straight onto
the socket; multifd (several channels) is not offered across hosts."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from grpcsvc.tls import ClientTls

from ..usermem import Slot
from . import wire
from .connection import Address, Connection, dial
from .link import DestinationLink, Destinations
from .options import MigrationOptions, OutgoingDevice
from .report import MigrationError, MigrationReport
from .stream import InitDataSent, Marker, StreamItem

if TYPE_CHECKING:
    from .device import DeviceMigration

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0  # the longest wait for the destination agent (its LOAD included)


class RemoteLink(DestinationLink):
    """One device's section on the connection."""

    per_side = True

    def __init__(self, remote: RemoteDestinations, section: int, ready: wire.ReadyDevice) -> None:
        self.remote = remote
        self.section = section
        self.data_path = ready.data_path
        self.verifies = ready.verify

    async def send(self, item: StreamItem) -> None:
        r = self.remote
        r.check()
        try:
            if isinstance(item, Slot):
                try:
                    await r.conn.send(wire.data_header(self.section, len(item)), item.view)
                finally:
                    item.release()  # the transport holds none of it once send returns
            elif isinstance(item, bytes):
                await r.conn.send(wire.data_header(self.section, len(item)), item)
            elif isinstance(item, InitDataSent):
                await r.conn.send(wire.init_data_sent(self.section, item.generation))
            else:
                assert item is Marker.END
                await r.conn.send(wire.end_of_state(self.section))
        except (OSError, TimeoutError) as e:
            # The destination's reason first, when it gave one before closing.
            await asyncio.wait([r.failed], timeout=1.0)
            r.check()
            raise MigrationError(f"the stream to {r.address} failed: {e}") from e

    def check(self) -> None:
        self.remote.check()

    @property
    def failed(self) -> asyncio.Future[None]:
        return self.remote.failed

    async def written(self) -> None:
        self.remote.check()  # COMPLETE -> LOADED waits for the rest


class RemoteDestinations(Destinations):
    """A destination agent at `address`, over TLS with `tls`."""

    setup_alongside = True  # QEMU's source does not wait for `-incoming`'s load_setup

    def __init__(
        self,
        address: str | Address,
        options: MigrationOptions,
        devices: Sequence[OutgoingDevice],
        *,
        tls: ClientTls | None = None,
        verify: str = "auto",
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.address = Address.parse(address) if isinstance(address, str) else address
        self.channel = str(self.address)
        self.options = options
        self.outgoing = list(devices)
        self.tls = tls
        if verify not in wire.VERIFY_MODES:
            raise ValueError(f"verify must be one of {wire.VERIFY_MODES}")
        self.verify = verify if options.digests is not None else "no"
        self.idle_timeout_s = idle_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.note = note
        self._conn: Connection | None = None
        self._decoder: wire.Decoder | None = None
        self._reader: asyncio.Task[None] | None = None
        self._error: MigrationError | None = None
        self._loaded: asyncio.Future[wire.Loaded] | None = None
        self._running: asyncio.Future[None] | None = None
        self._devices: list[DeviceMigration] = []
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def conn(self) -> Connection:
        assert self._conn is not None
        return self._conn

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, error: MigrationError) -> None:
        if self._error is None:
            self._error = error
        if not self.failed.done():
            self.failed.set_result(None)

    # --- the return path ---------------------------------------------------------------

    async def _event(self) -> wire.Event:
        """The next return-path event (before the reader task runs)."""
        assert self._decoder is not None
        buf = bytearray(4096)
        while True:
            ev = self._decoder.next_event()
            if ev is not None:
                return ev
            n = await self.conn.recv_into(memoryview(buf))
            if n == 0:
                self._decoder.eof()  # raises: the return path cannot end before RUNNING
            self._decoder.feed(memoryview(buf)[:n])

    async def _return_path(self) -> None:
        try:
            while True:
                ev = await self._event()
                if isinstance(ev, wire.SwitchoverAck):
                    d = self._devices[ev.section]
                    if self.options.on_switchover_ack is not None:
                        await self.options.on_switchover_ack(d)
                    if d.ack.approve(d.name, ev.generation):
                        d.report.acks += 1
                elif isinstance(ev, wire.Loaded):
                    if self._loaded is not None and not self._loaded.done():
                        self._loaded.set_result(ev)
                elif isinstance(ev, wire.Running):
                    if self._running is not None and not self._running.done():
                        self._running.set_result(None)
                    return
                elif isinstance(ev, wire.Error):
                    self._fail(
                        MigrationError(
                            f"destination agent {self.address}: {ev.reason}", errno=ev.errno or None
                        )
                    )
                    return
                else:
                    raise wire.WireError(f"{type(ev).__name__} is not expected now")
        except asyncio.CancelledError:
            raise
        except wire.WireError as e:
            why = f"the return path from {self.address}: {e}"
            self._fail(MigrationError(why, errno=errno.EPROTO))
        except (OSError, TimeoutError) as e:
            self._fail(
                MigrationError(
                    f"the return path from {self.address} failed: {e or type(e).__name__}",
                    errno=errno.ECONNRESET,
                )
            )

    # --- Destinations ------------------------------------------------------------------

    async def setup(self, devices: Sequence[DeviceMigration]) -> None:
        if self.options.multifd_channels > 0:
            raise MigrationError("multifd is not offered across hosts (one stream per migration)")
        self._devices = list(devices)
        try:
            self._conn = await dial(
                self.address,
                self.tls,
                idle_timeout_s=self.idle_timeout_s,
                connect_timeout_s=self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as e:
            raise MigrationError(
                f"cannot reach the destination agent at {self.address}: {e or type(e).__name__}",
                errno=e.errno if isinstance(e, OSError) and e.errno else errno.ECONNREFUSED,
            ) from e
        self._decoder = wire.Decoder("return", sections=len(devices))
        specs = [
            wire.DeviceSpec(i, d.name, out.destination, d.buffer_size)
            for i, (d, out) in enumerate(zip(devices, self.outgoing, strict=True))
        ]
        try:
            await self.conn.send(wire.header(specs, self.verify))
            ev = await self._event()
        except (OSError, TimeoutError, wire.WireError) as e:
            raise MigrationError(
                f"no answer from the destination agent at {self.address}: {e or type(e).__name__}",
                errno=errno.EPROTO if isinstance(e, wire.WireError) else errno.ECONNRESET,
            ) from e
        if isinstance(ev, wire.Error):
            raise MigrationError(
                f"destination agent {self.address} refused: {ev.reason}", errno=ev.errno or None
            )
        if not isinstance(ev, wire.Ready):
            raise MigrationError(f"destination agent {self.address}: READY expected")
        for d, rd in zip(devices, ev.devices, strict=True):
            d.link = RemoteLink(self, rd.section, rd)
        if self.options.digests is not None and not all(rd.verify for rd in ev.devices):
            # --verify auto: the destination agent has no firmware to ask.
            why = f"not verifying: the destination agent at {self.address} gives no digests"
            log.info("%s", why)
            if self.note is not None:
                self.note(why)
            self.options.digests = None
        loop = asyncio.get_running_loop()
        self._loaded, self._running = loop.create_future(), loop.create_future()
        self._reader = asyncio.create_task(self._return_path(), name="return-path")
        for i in range(len(devices)):
            await self.conn.send(wire.setup_state(i))

    async def _command(self, message: bytes, answer: asyncio.Future[Any]) -> Any:
        self.check()
        try:
            await self.conn.send(message)
            await asyncio.wait(
                [answer, self.failed],
                timeout=self.idle_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            self.check()
            if not answer.done():
                raise TimeoutError(f"no answer in {self.idle_timeout_s:g} s")
            return answer.result()
        except (OSError, TimeoutError) as e:
            self.check()
            raise MigrationError(
                f"the destination agent at {self.address} did not answer: {e or type(e).__name__}",
                errno=errno.ETIMEDOUT if isinstance(e, TimeoutError) else errno.ECONNRESET,
            ) from e

    async def complete(self, devices: Sequence[DeviceMigration]) -> None:
        assert self._loaded is not None
        t = time.monotonic()
        loaded: wire.Loaded = await self._command(wire.complete(), self._loaded)
        # Never more than the wait itself, whatever the agent says.
        self.verify_s = min(loaded.digest_s, time.monotonic() - t)
        for i, d in enumerate(devices):
            d.link.digest = loaded.digests.get(i, "")

    async def start(self, devices: Sequence[DeviceMigration]) -> None:
        assert self._running is not None
        await self._command(wire.run(), self._running)

    async def abort(self, devices: Sequence[DeviceMigration], error: BaseException) -> None:
        """ABORT on the stream (the agent resets its destinations; a closed
        connection does the same)."""
        if self._conn is None:
            return
        code = getattr(error, "errno", None) or errno.ECANCELED
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.conn.send(wire.abort(code, str(error))), 2.0)

    async def close(self) -> None:
        if self._reader is not None:
            if not self._reader.done():
                self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._conn is not None:
            await self._conn.close()
        if not self.failed.done():
            self.failed.set_result(None)


async def migrate_to(
    devices: Sequence[OutgoingDevice],
    address: str,
    options: MigrationOptions,
    *,
    tls: ClientTls | None = None,
    verify: str = "auto",
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    note: Callable[[str], None] | None = None,
) -> MigrationReport:
    """Migrate every device to the destination agent at `address`
    (tcp:HOST:PORT, HOST:PORT, unix:PATH), each into the device it names on
    the agent's driver, with run.py's logic; raises MigrationError (its
    `report` filled in, its `errno` the destination's when it gave one)
    after leaving the sources RUNNING and the destinations reset.  `verify`
    is what the agent is asked for (auto: its digests if it can give them);
    `options.digests` then returns the source's digest beside
    `DeviceMigration.destination_digest`; `note` hears why it does not verify
    when the agent cannot."""
    from .run import Migration

    if not devices:
        raise ValueError("nothing to migrate")
    remote = RemoteDestinations(
        address,
        options,
        devices,
        tls=tls,
        verify=verify,
        idle_timeout_s=idle_timeout_s,
        note=note,
    )
    return await Migration(devices, options, remote).run()
