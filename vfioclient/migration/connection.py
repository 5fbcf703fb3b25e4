"""The byte stream between two migration agents, as QEMU's `-incoming
tcp:HOST:PORT` / `unix:PATH`: addresses, TLS contexts from grpcsvc.tls'
settings, the listener and the dialer, and a `Connection` whose reads land
straight in the caller's buffer (a user memory slot: no copy between the
socket and the memory the driver writes from).

A Connection is an asyncio BufferedProtocol: while a reader waits in
`recv_into(view)` the transport receives into `view` itself; bytes that come
while no one waits go to a small overflow buffer (reading pauses when it
holds more than READ_AHEAD).  Writes keep the transport's buffer empty before
`drain` returns (the transport pauses us while it buffers anything), so a
slot written out may be reused as soon as `drain` returns, whatever the
event loop (uvloop keeps references to the buffers it is given; asyncio's
TLS transport encrypts them at once).  `idle_timeout_s` bounds every wait for bytes: a
silent or half-open peer ends in TimeoutError, never a hang."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from grpcsvc.tls import ClientTls, TlsError, check_listen, prepare_unix_socket

READ_AHEAD = 256 << 10  # overflow bytes held before reading pauses
SCRATCH = 64 << 10


@dataclass(frozen=True)
class Address:
    """`tcp:HOST:PORT` (plain HOST:PORT too) or `unix:PATH`."""

    kind: str  # "tcp" | "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Address:
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if path.startswith("//"):
                path = path[2:]
            if not path:
                raise ValueError(f"{text!r}: unix: needs a path")
            return cls("unix", path=path)
        rest = text[len("tcp:") :] if text.startswith("tcp:") else text
        host, sep, port = rest.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{text!r} is not tcp:HOST:PORT, HOST:PORT or unix:PATH")
        return cls("tcp", host=host, port=int(port))

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def listen_form(self) -> str:
        """As grpcsvc.tls.check_listen reads listen addresses."""
        return f"unix:{self.path}" if self.kind == "unix" else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ListenerTls:
    """The listener's certificate and key; `client_ca` requires client
    certificates signed by it (mutual TLS)."""

    cert: str
    key: str
    client_ca: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(self.cert, self.key)
            if self.client_ca:
                ctx.load_verify_locations(self.client_ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as e:
            raise TlsError(f"the listener's TLS files do not load: {e}") from None
        return ctx


def listener_tls(
    tls: ClientTls | None, cert: str | None = None, key: str | None = None
) -> ListenerTls | None:
    """The destination agent's listener TLS from vfioctl's client settings:
    it presents `cert`/`key` (default: the client certificate) and requires
    client certificates signed by the CA when there is one."""
    cert = cert or (tls.cert if tls else None)
    key = key or (tls.key if tls else None)
    if cert is None and key is None:
        if tls is not None and tls.ca:
            raise TlsError(
                "a TLS listener needs a certificate and key (--tls-cert/--tls-key or "
                "--incoming-tls-cert/--incoming-tls-key); with only a CA it would be plaintext"
            )
        return None
    if cert is None or key is None:
        raise TlsError("the listener's certificate and key go together")
    return ListenerTls(cert, key, tls.ca if tls else None)


def dialer_tls(tls: ClientTls | None) -> ssl.SSLContext | None:
    """The source agent's TLS: verify the listener against the CA, present
    the client certificate (mutual TLS)."""
    if tls is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=tls.ca)
        if tls.cert and tls.key:
            ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"the agent channel's TLS files do not load: {e}") from None
    return ctx


class Connection(asyncio.BufferedProtocol):
    def __init__(
        self, idle_timeout_s: float, on_made: Callable[[Connection], None] | None = None
    ) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._on_made = on_made
        self.transport: asyncio.Transport | None = None
        self._scratch = bytearray(SCRATCH)
        self._scratch_view = memoryview(self._scratch)
        self._extra = bytearray()
        self._target: memoryview | None = None
        self._waiter: asyncio.Future[int] | None = None
        self._direct = False
        self._eof = False
        self._lost: BaseException | None = None
        self._closed = asyncio.get_running_loop().create_future()
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = False

    # protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are no asyncio.Transport subclasses, but behave as one)
        self.transport = cast(asyncio.Transport, transport)
        # Paused while anything is buffered: asyncio's TLS transport pauses at
        # size >= high (0 would pause it for good), the others at size > high.
        tls = transport.get_extra_info("sslcontext") is not None
        self.transport.set_write_buffer_limits(high=1 if tls else 0, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self._on_made is not None:  # after the TLS handshake, when there is one
            self._on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None and not self._extra:
            self._direct = True
            return self._target
        self._direct = False
        # A memoryview: asyncio's TLS transport reads on into buf[offset:],
        # which for a bytearray would be a copy.
        return self._scratch_view

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct:
            self._direct = False
            self._wake(nbytes)
            return
        self._extra += self._scratch_view[:nbytes]
        if self._target is not None:
            self._wake(self._take_extra(self._target))
        if len(self._extra) > READ_AHEAD and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake(0)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("the connection closed")
        self._eof = True
        self._wake(0)
        self._writable.set()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # reading

    def _wake(self, n: int) -> None:
        self._target = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(n)
        self._waiter = None

    def _take_extra(self, view: memoryview) -> int:
        n = min(len(view), len(self._extra))
        view[:n] = self._extra[:n]
        del self._extra[:n]
        if self._paused and len(self._extra) <= READ_AHEAD // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return n

    async def recv_into(self, view: memoryview) -> int:
        """Up to len(view) bytes into `view`: how many; 0 at the end of the
        stream.  TimeoutError after idle_timeout_s without a byte."""
        if not view:
            return 0
        if self._extra:
            return self._take_extra(view)
        if self._eof:
            return 0
        fut = self._waiter = asyncio.get_running_loop().create_future()
        self._target = view
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        try:
            return await asyncio.wait_for(fut, self.idle_timeout_s)
        finally:
            self._target = None
            self._waiter = None

    # writing

    async def send(self, *parts: bytes | memoryview) -> None:
        """Write `parts` in order; returns once the transport holds none of
        them (they are in the kernel's socket buffer)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection closed")
        for p in parts:
            self.transport.write(p)
        await self.drain()

    async def drain(self) -> None:
        if not self._writable.is_set():
            await asyncio.wait_for(self._writable.wait(), self.idle_timeout_s)
        if self._lost is not None and self.transport is not None and self.transport.is_closing():
            raise ConnectionResetError(f"the connection closed: {self._lost}")

    @property
    def peer(self) -> str:
        if self.transport is None:
            return "?"
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            return f"{peer[0]}:{peer[1]}"
        return str(peer or "local")

    async def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self.transport is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._closed), 5)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def dial(
    address: Address, tls: ClientTls | None, *, idle_timeout_s: float, connect_timeout_s: float
) -> Connection:
    """Connect to a destination agent (over TLS when `tls` is given)."""
    loop = asyncio.get_running_loop()
    ctx = dialer_tls(tls)

    def factory() -> Connection:
        return Connection(idle_timeout_s)

    conn: Connection
    if address.kind == "unix":
        _, conn = await asyncio.wait_for(
            loop.create_unix_connection(
                factory, address.path, ssl=ctx, server_hostname="localhost" if ctx else None
            ),
            connect_timeout_s,
        )
    else:
        _, conn = await asyncio.wait_for(
            loop.create_connection(factory, address.host, address.port, ssl=ctx),
            connect_timeout_s,
        )
    return conn


Handler = Callable[[Connection], Awaitable[None]]


async def listen(
    address: Address,
    handler: Handler,
    tls: ListenerTls | None,
    *,
    insecure: bool = False,
    socket_mode: int = 0o600,
    idle_timeout_s: float,
) -> tuple[asyncio.Server, Address]:
    """Serve `handler` for each connection on `address`; the server and the
    address it is bound to (port 0 resolved).  Off-host without TLS is
    refused (TlsError) unless `insecure`, as the services do."""
    if tls is None:
        check_listen(address.listen_form, None, insecure)
    loop = asyncio.get_running_loop()
    ctx = tls.context() if tls is not None else None
    tasks: set[asyncio.Task[None]] = set()

    def made(conn: Connection) -> None:
        task = loop.create_task(_serve_one(conn, handler))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def factory() -> Connection:
        return Connection(idle_timeout_s, made)

    handshake = idle_timeout_s if ctx is not None else None
    if address.kind == "unix":
        prepare_unix_socket(address.path)
        server = await loop.create_unix_server(
            factory, address.path, ssl=ctx, ssl_handshake_timeout=handshake
        )
        os.chmod(address.path, socket_mode)
        return server, address
    server = await loop.create_server(
        factory, address.host, address.port, ssl=ctx, ssl_handshake_timeout=handshake
    )
    port = server.sockets[0].getsockname()[1]
    return server, Address("tcp", host=address.host, port=port)


async def _serve_one(conn: Connection, handler: Handler) -> None:
    try:
        await handler(conn)
    finally:
        await conn.close()
