"""A blocking VfioClient, on gRPC's synchronous stack: for scripts, threads
and gevent programs (Locust).

    with SyncVfioClient.connect("127.0.0.1:50052") as c:
        fd = c.open_device("0000:81:00.1")
        data_fd = c.set_state(fd, MigState.STOP_COPY)
        image = c.read_all(data_fd)

The methods are VfioClient's, blocking, with the same requests, answers and
errors (vfioclient.calls: a failed call raises VfioClientError, an OSError
with the kernel's errno).  No event loop and no thread of its own: a call
runs in its caller's thread (or greenlet), and one client may be used from
several at once.

Under gevent (Locust runs each user in a greenlet), grpc must be told before
it makes anything, right after gevent's patching:

    from gevent import monkey
    monkey.patch_all()
    import grpc.experimental.gevent
    grpc.experimental.gevent.init_gevent()

grpc then waits for each call's completion in a thread of gevent's hub
threadpool (`gevent.get_hub().threadpool`, maxsize 10 by default, one of
them grpc's own for as long as a channel exists) and the other greenlets run
meanwhile.  Calls beyond the pool's size wait their turn; a wait that depends
on another greenlet's call (following `events` for what another user does, a
blocking read) needs a free thread for that call, so give the pool one per
greenlet that may be waiting at once (`gevent.get_hub().threadpool.maxsize
= N`).  The client keeps no call of its own waiting: the Session is opened
and left open without anyone reading it (a single-threaded unary stream),
so a client holds no thread of the pool between calls.  Without
init_gevent() every call would stop all greenlets while it waits, and a
`write` would never finish (its requests come from a greenlet that cannot
run): `connect` refuses with RuntimeError when gevent has patched threading
but grpc was not told.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar, cast, get_args, get_type_hints

import grpc
import grpc.experimental

from driver.api.events import Event
from driver.api.v1 import vfio_pb2_grpc as pbg
from grpcsvc.options import CHANNEL_OPTIONS
from grpcsvc.tls import sync_channel

from . import calls
from .calls import VfioClientError
from .ioctls import SEQUENCE_RPCS
from .transport import FROM_ENV, TlsChoice, resolve_tls

P = ParamSpec("P")
T = TypeVar("T")

__all__ = ["SyncVfioClient", "VfioClientError"]

# Unary-stream calls (Session, ReadStream, Events) read by their caller, not
# by the channel's spin thread: under gevent that thread would hold a thread
# of the hub's pool for as long as the Session lives, and nine clients would
# take all ten (the calls queued behind them never run).
CLIENT_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, True),
]


def check_gevent() -> None:
    """RuntimeError if gevent has patched threading but grpc's gevent
    integration is off (every call would block all greenlets, and hang)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return
    cygrpc = importlib.import_module("grpc._cython.cygrpc")
    if not getattr(cygrpc, "g_gevent_activated", True):
        raise RuntimeError(
            "gevent has patched threading, but grpc does not know: call "
            "grpc.experimental.gevent.init_gevent() after gevent.monkey.patch_all() "
            "and before making any client"
        )


def _blocking(
    build: Callable[P, calls.Unary[T]], doc: str | None = None
) -> Callable[Concatenate[SyncVfioClient, P], T]:
    """The method that carries out the call `build` makes, and waits for it."""

    def method(self: SyncVfioClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._unary(build(*args, **kwargs))

    sig = inspect.signature(build)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    (answer,) = get_args(get_type_hints(build)["return"])  # Unary[T]: T
    method.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[self_param, *sig.parameters.values()], return_annotation=answer
    )
    method.__name__ = build.__name__
    method.__qualname__ = f"SyncVfioClient.{build.__name__}"
    method.__doc__ = doc if doc is not None else build.__doc__
    return method


class SyncVfioClient:
    """One client (a 'process') of a vfio-driver service, with blocking calls."""

    def __init__(
        self, target: str, *, client_id: str | None = None, tls: TlsChoice = FROM_ENV
    ) -> None:
        """A channel, no call yet: `connect` also opens the Session."""
        self.target = target
        self.client_id = client_id or calls.new_client_id()
        self._metadata = calls.client_metadata(self.client_id)
        self.tls = resolve_tls(tls)
        self._channel: grpc.Channel | None = sync_channel(
            target, self.tls, options=CLIENT_CHANNEL_OPTIONS
        )
        self._stub = pbg.VfioStub(self._channel)
        self._write = calls.write_method(self._channel)
        self._session: Any = None

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        client_id: str | None = None,
        timeout: float = 10.0,
        tls: TlsChoice = FROM_ENV,
    ) -> SyncVfioClient:
        """Connect and open the session (so this client's fds close with
        it); VfioClientError(ENOTCONN) if the driver does not answer within
        `timeout`.  `tls` as VfioClient's (default: VFIO_TLS_* if set)."""
        check_gevent()
        c = cls(target, client_id=client_id, tls=tls)
        try:
            c._session = c._open_session(timeout)
        except BaseException:
            c.close_client()
            raise
        return c

    def _open_session(self, timeout: float) -> Any:
        """The Session call, once its first answer came: left open, unread."""
        call: Any = self.stub.Session(calls.SESSION_REQUEST, metadata=self._metadata)
        timer = threading.Timer(timeout, call.cancel)
        timer.daemon = True
        timer.start()
        try:
            next(call)
        except grpc.RpcError as e:
            why = "timed out" if call.cancelled() else cast(grpc.Call, e).details()
            raise calls.unreachable(self.target, why or "") from None
        except StopIteration:
            raise calls.unreachable(self.target, "the session ended at once") from None
        finally:
            timer.cancel()
            timer.join()
        return call

    @property
    def stub(self) -> pbg.VfioStub:
        self._check_open()
        return self._stub

    def _check_open(self) -> None:
        if self._channel is None:
            raise calls.closed()

    def close_client(self) -> None:
        """End the session (the service closes this client's fds) and the channel."""
        channel, self._channel = self._channel, None
        if self._session is not None:
            self._session.cancel()
            self._session = None
        if channel is not None:
            channel.close()

    def __enter__(self) -> SyncVfioClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close_client()

    def _unary(self, call: calls.Unary[T]) -> T:
        """Carry out one of vfioclient.calls' unary calls."""
        try:
            m = getattr(self.stub, call.rpc)(call.request, metadata=self._metadata)
        except grpc.RpcError as e:
            return call.recover(calls.rpc_error(e))
        return call.decode(m)

    def _messages(self, call: Any, decode: Callable[[Any], T | None]) -> Generator[T, None, None]:
        """A response stream's messages as `decode` reads them (None: skipped);
        the call is cancelled when the caller stops iterating."""
        try:
            for m in call:
                item = decode(m)
                if item is not None:
                    yield item
        except grpc.RpcError as e:
            raise calls.rpc_error(e) from None
        finally:
            call.cancel()

    def ioctls(self, *seq: calls.Unary[Any]) -> list[Any]:
        """DeviceFeature and PrecopyInfo calls made one after another (as the
        async client's `ioctls`, on unary calls here): each one's answer, or
        the VfioClientError it failed with (a failure does not stop the rest)."""
        if not all(c.rpc in SEQUENCE_RPCS for c in seq):
            raise ValueError("only DeviceFeature and PrecopyInfo calls go in a sequence")
        out: list[Any] = []
        for c in seq:
            try:
                out.append(self._unary(c))
            except VfioClientError as e:
                out.append(e)
        return out

    # --- devices ---------------------------------------------------------------------

    list_devices = _blocking(calls.list_devices)
    open_device = _blocking(calls.open_device)
    close = _blocking(calls.close, "close(2) an fd (not the client: see `close_client`).")
    reset = _blocking(calls.reset)
    device_feature = _blocking(calls.device_feature)

    # --- migration features ------------------------------------------------------------

    migration_flags = _blocking(calls.migration_flags)
    probe = _blocking(calls.probe)
    dma_logging_supported = _blocking(calls.dma_logging_supported)
    enable_precopy_info_v2 = _blocking(calls.enable_precopy_info_v2)
    get_state = _blocking(calls.get_state)
    set_state = _blocking(calls.set_state)
    data_size = _blocking(calls.data_size)

    # --- data fds ----------------------------------------------------------------------

    read = _blocking(calls.read)
    precopy_info = _blocking(calls.precopy_info)

    def read_stream(
        self, fd: int, *, chunk_size: int = 1 << 20, limit: int = 0, nonblock: bool = False
    ) -> Iterator[bytes]:
        """read(2) repeatedly, server side: chunks until the end of stream (or,
        in PRE_COPY, until the data available now is sent: then ENOMSG)."""
        request = calls.read_stream_request(
            fd, chunk_size=chunk_size, limit=limit, nonblock=nonblock
        )
        return self._messages(self.stub.ReadStream(request, metadata=self._metadata), calls.chunk)

    def read_all(self, fd: int, chunk_size: int = 1 << 20) -> bytes:
        """Read a data fd to its end (STOP_COPY)."""
        return b"".join(self.read_stream(fd, chunk_size=chunk_size))

    def write(self, fd: int, chunks: bytes | Iterable[bytes]) -> int:
        """write(2) each chunk in order; the total taken.  An iterator is
        consumed as the call goes, by a thread of grpc's (a greenlet under
        gevent); an exception it raises ends the call and is raised here."""
        failed: list[BaseException] = []

        def requests() -> Iterator[Any]:
            try:
                yield from calls.write_requests(fd, chunks)
            except Exception as e:
                failed.append(e)
                raise

        self._check_open()
        try:
            m = self._write(requests(), metadata=self._metadata)
        except grpc.RpcError as e:
            if failed:
                raise failed[0] from None
            raise calls.rpc_error(e) from None
        return calls.written(m)

    # --- user memory (the local data path; see vfioclient/usermem.py) -------------------

    map_user_memory = _blocking(calls.map_user_memory)
    unmap_user_memory = _blocking(calls.unmap_user_memory)
    read_into = _blocking(calls.read_into)
    write_from = _blocking(calls.write_from)

    # --- events and audit --------------------------------------------------------------

    def events(self, device: str | None = None) -> Generator[Event, None, None]:
        """A device's events (every device's without one), as they happen,
        until the server stops.  Subscribed when this returns; close the
        iterator to stop following."""
        call: Any = self.stub.Events(calls.events_request(device), metadata=self._metadata)
        try:
            try:
                subscribed = calls.subscribed(call.initial_metadata())
            except grpc.RpcError as e:
                raise calls.rpc_error(e) from None
            if not subscribed:
                for _ in self._messages(call, calls.event):  # failed first (ENOENT): raises that
                    pass
                raise calls.not_subscribed()
        except BaseException:
            call.cancel()
            raise
        return self._messages(call, calls.event)

    audit = _blocking(calls.audit)
