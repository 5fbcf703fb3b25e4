"""The destination agent, as `qemu -incoming`: it listens, and for each
connection loads one migration into devices of its own driver.

Per connection: the header names the devices (refused, with an ERROR on the
return path and nothing changed, if one is not the agent's DST, is busy with
another migration, or verification is required and the agent has no
firmware to ask); each device is opened, checked for STOP_COPY, given this
host's user memory (mapped by the driver, else the gRPC path) and set
RESUMING; READY goes back.  Then the stream: DEV_DATA_STATE payloads are
received straight into a free buffer that the driver writes from
(WriteFromStream), INIT_DATA_SENT is approved on the return path once
everything before it is written, END_OF_STATE ends the device's data;
COMPLETE stops every device (the driver loads and validates), LOADED goes
back with the digests; RUN starts them (RUNNING_P2P, RUNNING) and RUNNING
goes back.

Any failure (a bad stream, a load the driver refuses, ABORT, the source gone,
a silent peer past the idle timeout) ends the connection with an ERROR (when
the source is still there to hear it) and resets every destination: RESUMING
aborted, nothing left open."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..client import VfioClient, VfioClientError
from ..uapi import MigState
from . import wire
from .connection import Address, Connection, ListenerTls, listen
from .destination import DestinationDevice
from .memory import check_data_path, user_memory
from .report import MigrationError, format_bytes
from .stream import InitDataSent, Marker

log = logging.getLogger(__name__)

S = MigState

DigestSource = Callable[[str], Awaitable[str]]  # a device's digest (its firmware's)


@dataclass
class IncomingOptions:
    stream_depth: int = 16  # buffers per device between the socket and the driver
    data_path: str = "auto"  # as MigrationOptions.data_path, for this side
    idle_timeout_s: float = 60.0  # silence on the connection that ends it
    max_payload: int = wire.MAX_PAYLOAD  # the largest buffer a source may ask for


@dataclass
class IncomingDeviceReport:
    name: str  # the destination device
    source: str  # the source's name for it
    section: int
    data_path: str = ""
    bytes_written: int = 0
    init_data_sent: int = 0
    acks: int = 0
    digest: str = ""


@dataclass
class IncomingReport:
    """The destination agent's side of one migration."""

    status: str = "connected"  # connected | refused | resuming | loaded | completed | failed
    error: str | None = None
    errno: int | None = None
    peer: str = ""
    devices: list[IncomingDeviceReport] = field(default_factory=list)
    # The destination digests are taken (the source asked, and we can).
    verify: bool = False
    setup_s: float = 0.0  # the header to READY
    load_s: float = 0.0  # COMPLETE to LOADED (the load and the digests)
    start_s: float = 0.0  # RUN to RUNNING
    total_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def incoming_text(r: dict[str, Any]) -> str:
    """The destination agent's report for a person."""
    status = r["status"] + (f": {r['error']}" if r.get("error") else "")
    lines = [f"incoming migration from {r.get('peer') or '?'} {status}"]
    lines.append(
        f"  time       total {r.get('total_s', 0.0):.3f} s: setup {r.get('setup_s', 0.0):.3f} s, "
        f"load {r.get('load_s', 0.0):.3f} s, start {r.get('start_s', 0.0):.3f} s"
    )
    for d in r.get("devices", []):
        lines.append(
            f"  device     {d['name']} (from {d['source']}): "
            f"{format_bytes(d['bytes_written'])} written, "
            f"{d['acks']} switchover-acks, data path {d['data_path'] or '-'}"
            + (f", digest {d['digest']}" if d.get("digest") else "")
        )
    return "\n".join(lines)


class _Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = code


class _FromSource(MigrationError):
    """The source ended the migration (ABORT, or gone): no ERROR to send back."""


class _Reader:
    """Events off the connection, and payloads straight into a buffer."""

    def __init__(self, conn: Connection, decoder: wire.Decoder) -> None:
        self.conn, self.decoder = conn, decoder
        self._scratch = bytearray(64 << 10)

    async def _more(self, view: memoryview) -> int:
        try:
            n = await self.conn.recv_into(view)
        except TimeoutError:
            raise _FromSource(
                f"nothing from the source for {self.conn.idle_timeout_s:g} s",
                errno=errno.ETIMEDOUT,
            ) from None
        except OSError as e:
            raise _FromSource(f"the source's connection failed: {e}", errno=errno.ECONNRESET) from e
        if n == 0:
            try:
                self.decoder.eof()
            except wire.WireError as e:
                raise _FromSource(
                    f"the source closed the connection mid-migration ({e})", errno=errno.ECONNRESET
                ) from None
        return n

    async def event(self) -> wire.Event:
        while True:
            ev = self.decoder.next_event()
            if ev is not None:
                return ev
            n = await self._more(memoryview(self._scratch))
            self.decoder.feed(memoryview(self._scratch)[:n])

    async def payload_into(self, view: memoryview) -> None:
        """The current DEV_DATA_STATE's payload, all of it, into `view`."""
        off, dec = 0, self.decoder
        while dec.payload_remaining:
            if dec.buffered:
                ev = dec.next_event()
                assert isinstance(ev, wire.Payload)
                view[off : off + len(ev.data)] = ev.data
                off += len(ev.data)
            else:
                n = await self._more(view[off : off + dec.payload_remaining])
                dec.payload_taken(n)
                off += n


class IncomingAgent:
    """Serves migrations into devices of `client`'s driver (only into `only`
    when given), one at a time per device."""

    def __init__(
        self,
        client: VfioClient,
        *,
        only: str | None = None,
        options: IncomingOptions | None = None,
        digest: DigestSource | None = None,
        on_report: Callable[[IncomingReport], None] | None = None,
    ) -> None:
        self.client = client
        self.only = only
        self.options = options or IncomingOptions()
        check_data_path(self.options.data_path)
        self.digest = digest
        self.on_report = on_report
        self.busy: set[str] = set()
        self.reports: list[IncomingReport] = []
        self.finished = asyncio.Event()  # an accepted migration ended (one-shot agents stop)

    def _refusal(self, h: wire.Header) -> None:
        names = [d.destination for d in h.devices]
        if len(set(names)) != len(names):
            raise _Refused(errno.EINVAL, "a device is named twice")
        for name in names:
            if self.only is not None and name != self.only:
                raise _Refused(
                    errno.EINVAL,
                    f"this agent accepts a migration into {self.only} only, not into {name}",
                )
            if name in self.busy:
                raise _Refused(
                    errno.EBUSY, f"{name} is busy with another migration: try again when it ends"
                )
        if h.verify == "yes" and self.digest is None:
            raise _Refused(
                errno.ENOTSUP,
                "verification is required and this agent has no firmware Scenario service "
                "to ask for digests (start it with --firmware)",
            )

    async def handle(self, conn: Connection) -> IncomingReport:
        """One connection: one migration, or a refusal."""
        t0 = time.monotonic()
        rep = IncomingReport(peer=conn.peer)
        reader = _Reader(conn, wire.Decoder("forward", max_payload=self.options.max_payload))
        halves: list[DestinationDevice] = []
        fds: list[int] = []
        taken: list[str] = []
        try:
            try:
                header = await reader.event()
                assert isinstance(header, wire.Header)  # the decoder's first event
                self._refusal(header)
            except (_Refused, wire.WireError, _FromSource) as e:
                # Not a migration into our devices (yet): nothing changed; a
                # one-shot agent keeps waiting for its migration.
                code = e.errno if not isinstance(e, wire.WireError) else errno.EPROTO
                reason = (
                    str(e) if not isinstance(e, wire.WireError) else f"bad migration stream: {e}"
                )
                rep.status, rep.error, rep.errno = "refused", reason, code
                log.warning("refused a migration from %s: %s", rep.peer, reason)
                if not isinstance(e, _FromSource):
                    with contextlib.suppress(OSError, TimeoutError):
                        await asyncio.wait_for(
                            conn.send(wire.error(code or errno.EIO, reason)), 2.0
                        )
                return rep
            taken = [d.destination for d in header.devices]
            self.busy.update(taken)  # no await since the check: check, then commit
            rep.status = "resuming"
            rep.devices = [
                IncomingDeviceReport(d.destination, d.source, d.section) for d in header.devices
            ]
            await self._setup(conn, header, rep, halves, fds)
            rep.setup_s = time.monotonic() - t0
            await self._watch(self._receive(conn, reader, halves, rep), halves)
            rep.status = "completed"
        except BaseException as e:
            await self._fail(conn, e, rep, halves)
            if not isinstance(e, Exception):
                raise
        finally:
            for h in halves:
                await h.close_data_fd()
                await h.close_user_memory()
            for fd in fds:
                with contextlib.suppress(VfioClientError):
                    await self.client.close(fd)
            self.busy.difference_update(taken)
            rep.total_s = time.monotonic() - t0
            self.reports.append(rep)
            if self.on_report is not None:
                self.on_report(rep)
            if rep.status != "refused":
                self.finished.set()
        return rep

    async def _fail(
        self,
        conn: Connection,
        e: BaseException,
        rep: IncomingReport,
        halves: list[DestinationDevice],
    ) -> None:
        code = getattr(e, "errno", None) or (
            errno.EPROTO if isinstance(e, wire.WireError) else errno.EIO
        )
        if isinstance(e, asyncio.CancelledError):
            code, reason = errno.ECANCELED, "the destination agent is stopping"
        else:
            reason = str(e) or type(e).__name__
        if isinstance(e, wire.WireError):
            reason = f"bad migration stream: {reason}"
        gone = isinstance(e, _FromSource | ConnectionError)
        if isinstance(e, ConnectionError):  # our reply found the source gone
            code, reason = errno.ECONNRESET, f"the source closed the connection mid-migration ({e})"
        rep.status, rep.error, rep.errno = "failed", reason, code
        log.warning("incoming migration from %s failed: %s", rep.peer, reason)
        if not gone:
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(conn.send(wire.error(code, reason)), 2.0)
        conn.abort()  # the source hears no more of this stream
        for h in halves:
            await h.abort()

    async def _setup(
        self,
        conn: Connection,
        header: wire.Header,
        rep: IncomingReport,
        halves: list[DestinationDevice],
        fds: list[int],
    ) -> None:
        """load_setup of every device; READY."""
        o = self.options
        verify = rep.verify = header.verify != "no" and self.digest is not None
        for spec, r in zip(header.devices, rep.devices, strict=True):
            fd = await self.client.open_device(spec.destination)
            fds.append(fd)
            h = DestinationDevice(
                self.client,
                fd,
                spec.destination,
                stream_depth=o.stream_depth,
                approve=self._approver(conn, spec.section, r),
            )
            halves.append(h)
            await h.discover()
            h.slots, _ = await user_memory(
                spec.destination, o.data_path, spec.buffer_size, max(2, o.stream_depth),
                [self.client],
            )  # fmt: skip
            r.data_path = "shm" if h.slots is not None else "grpc"
            await h.setup()
        await conn.send(
            wire.ready([wire.ReadyDevice(r.section, r.data_path, verify) for r in rep.devices])
        )

    def _approver(
        self, conn: Connection, section: int, r: IncomingDeviceReport
    ) -> Callable[[int], Awaitable[None]]:
        async def approve(generation: int) -> None:
            await conn.send(wire.switchover_ack(section, generation))
            r.acks += 1

        return approve

    async def _watch(self, receiving: Awaitable[None], halves: list[DestinationDevice]) -> None:
        """Receive until RUN; a loader failing meanwhile (the driver refused
        a write or a LOAD) ends it at once, with that failure."""
        task = asyncio.ensure_future(receiving)
        watched: set[asyncio.Future[Any]] = {task, *(h.loader for h in halves)}
        try:
            while not task.done():
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                for f in done - {task}:
                    watched.discard(f)
                    for h in halves:
                        h.check()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        task.result()

    async def _receive(
        self,
        conn: Connection,
        reader: _Reader,
        halves: list[DestinationDevice],
        rep: IncomingReport,
    ) -> None:
        while True:
            ev = await reader.event()
            if isinstance(ev, wire.DataHeader):
                h = halves[ev.section]
                if h.slots is not None:
                    slot = await h.free_slot()
                    slot.length = ev.length
                    try:
                        await reader.payload_into(slot.view)
                    except BaseException:
                        slot.release()
                        raise
                    await h.feed(slot)
                else:
                    buf = bytearray(ev.length)
                    await reader.payload_into(memoryview(buf))
                    await h.feed(bytes(buf))
                rep.devices[ev.section].bytes_written += ev.length
            elif isinstance(ev, wire.InitDataSent):
                rep.devices[ev.section].init_data_sent += 1
                await halves[ev.section].feed(InitDataSent(ev.generation))
            elif isinstance(ev, wire.EndOfState):
                await halves[ev.section].feed(Marker.END)
            elif isinstance(ev, wire.SetupState):
                pass
            elif isinstance(ev, wire.Complete):
                await self._complete(conn, halves, rep)
            elif isinstance(ev, wire.Run):
                t = time.monotonic()
                for h in halves:
                    if h.p2p:
                        await h.set_state(S.RUNNING_P2P, None)
                for h in halves:
                    await h.set_state(S.RUNNING, None)
                await conn.send(wire.running())
                rep.start_s = time.monotonic() - t
                return
            elif isinstance(ev, wire.Abort):
                raise _FromSource(f"the source aborted: {ev.reason}", errno=ev.errno or None)
            else:
                raise wire.WireError(f"{type(ev).__name__} is not expected now")

    async def _complete(
        self, conn: Connection, halves: list[DestinationDevice], rep: IncomingReport
    ) -> None:
        """Every device written (load_cleanup done), RESUMING -> STOP (the
        driver loads and validates), the digests while they are stopped."""
        t = time.monotonic()
        for h in halves:
            await h.loaded()
        for h in halves:
            await h.set_state(S.STOP, None)
        rep.status = "loaded"
        digests: dict[int, str] = {}
        t_digest = time.monotonic()
        if self.digest is not None and rep.verify:  # not when the source said no
            for i, h in enumerate(halves):
                digests[i] = rep.devices[i].digest = await self.digest(h.name)
        # The source counts this as verification, not downtime (as its own digests).
        await conn.send(wire.loaded(digests, time.monotonic() - t_digest))
        rep.load_s = time.monotonic() - t


async def serve_incoming(
    client: VfioClient,
    listen_on: str | Address,
    *,
    only: str | None = None,
    once: bool = False,
    options: IncomingOptions | None = None,
    digest: DigestSource | None = None,
    tls: ListenerTls | None = None,
    insecure: bool = False,
    socket_mode: int = 0o600,
    on_listening: Callable[[Address], None] | None = None,
    on_report: Callable[[IncomingReport], None] | None = None,
    stop: asyncio.Event | None = None,
) -> list[IncomingReport]:
    """The destination agent on `listen_on` (tcp:HOST:PORT, HOST:PORT,
    unix:PATH) for `client`'s driver: serves migrations (into `only` when
    given) until `stop` is set, or with `once` until one accepted migration
    ended; the reports of the connections it served (refusals included:
    status "refused", nothing changed on the devices).  `on_listening` hears
    the bound address (port 0 resolved).  Off-host without TLS is refused
    (TlsError) unless `insecure`."""
    agent = IncomingAgent(client, only=only, options=options, digest=digest, on_report=on_report)
    o = agent.options
    address = Address.parse(listen_on) if isinstance(listen_on, str) else listen_on
    handlers: set[asyncio.Task[Any]] = set()

    async def handler(conn: Connection) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await agent.handle(conn)
        finally:
            handlers.discard(task)

    server, bound = await listen(
        address,
        handler,
        tls,
        insecure=insecure,
        socket_mode=socket_mode,
        idle_timeout_s=o.idle_timeout_s,
    )
    try:
        if on_listening is not None:
            on_listening(bound)
        waits: list[asyncio.Future[Any]] = []
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        if once:
            waits.append(asyncio.ensure_future(agent.finished.wait()))
        if not waits:
            waits.append(asyncio.get_running_loop().create_future())  # until cancelled
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
    finally:
        server.close()
        for t in list(handlers):  # a migration still going is aborted: destinations reset
            t.cancel()
        for t in list(handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await server.wait_closed()
    return agent.reports
