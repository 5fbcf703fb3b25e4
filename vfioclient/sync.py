"""A blocking VfioClient for scripts.

    with SyncVfioClient.connect("127.0.0.1:50052") as c:
        fd = c.open_device("0000:81:00.1")
        data_fd = c.set_state(fd, MigState.STOP_COPY)
        image = c.read_all(data_fd)

Every method of `VfioClient` is here, blocking.  The async client and all its
grpc.aio objects live on one private event loop, run by a dedicated thread;
calls are submitted to it with `asyncio.run_coroutine_threadsafe`, so grpc.aio
is only ever used from that one loop (never from the caller's thread or
loop).  Errors are the same `VfioClientError` (an OSError with the kernel's
errno).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
)
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from driver.api.events import Event

from .client import EventStream, VfioClient, VfioClientError
from .transport import FROM_ENV, TlsChoice

P = ParamSpec("P")
T = TypeVar("T")

__all__ = ["SyncVfioClient", "VfioClientError"]


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SyncVfioClient called from its own event loop thread")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)


def _blocking(
    method: Callable[Concatenate[VfioClient, P], Coroutine[Any, Any, T]], doc: str | None = None
) -> Callable[Concatenate[SyncVfioClient, P], T]:
    """`method` of the async client, called on the loop thread and waited for."""

    def call(self: SyncVfioClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(method(self.client, *args, **kwargs))

    call.__name__ = method.__name__
    call.__doc__ = doc if doc is not None else method.__doc__
    return call


class SyncVfioClient:
    """One client (a 'process') of a vfio-driver service, with blocking calls."""

    def __init__(self, runner: _LoopThread, client: VfioClient) -> None:
        self._runner = runner
        self._client: VfioClient | None = client

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        client_id: str | None = None,
        timeout: float = 10.0,
        tls: TlsChoice = FROM_ENV,
    ) -> SyncVfioClient:
        """Connect and open the session; VfioClientError(ENOTCONN) if
        unreachable.  `tls` as VfioClient's (default: VFIO_TLS_* if set)."""
        runner = _LoopThread(f"vfioclient-{target}")

        async def connect() -> VfioClient:
            return await VfioClient.connect(target, client_id=client_id, timeout=timeout, tls=tls)

        try:
            client = runner.run(connect())
        except BaseException:
            runner.stop()
            raise
        return cls(runner, client)

    @property
    def client(self) -> VfioClient:
        if self._client is None:
            raise VfioClientError(9, "the client is closed")  # EBADF
        return self._client

    @property
    def target(self) -> str:
        return self.client.target

    @property
    def client_id(self) -> str:
        return self.client.client_id

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def close_client(self) -> None:
        """End the session (the service closes this client's fds) and the loop."""
        client, self._client = self._client, None
        try:
            if client is not None:
                self._runner.run(client.aclose(), timeout=10.0)
        finally:
            self._runner.stop()

    def __enter__(self) -> SyncVfioClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close_client()

    def _iterate(
        self, items: AsyncIterator[T], close: Callable[[], Coroutine[Any, Any, None]]
    ) -> Generator[T, None, None]:
        """An async iterator of the loop thread, stepped from the caller's;
        `close` runs there when the caller stops iterating."""

        async def step() -> list[T]:
            try:
                return [await items.__anext__()]
            except StopAsyncIteration:
                return []

        try:
            while item := self._run(step()):
                yield item[0]
        finally:
            if not self._runner.loop.is_closed():
                self._run(close())

    # --- devices ---------------------------------------------------------------------

    list_devices = _blocking(VfioClient.list_devices)
    open_device = _blocking(VfioClient.open_device)
    close = _blocking(VfioClient.close, "close(2) an fd (not the client: see `close_client`).")
    reset = _blocking(VfioClient.reset)
    device_feature = _blocking(VfioClient.device_feature)

    # --- migration features ------------------------------------------------------------

    migration_flags = _blocking(VfioClient.migration_flags)
    probe = _blocking(VfioClient.probe)
    enable_precopy_info_v2 = _blocking(VfioClient.enable_precopy_info_v2)
    get_state = _blocking(VfioClient.get_state)
    set_state = _blocking(VfioClient.set_state)
    data_size = _blocking(VfioClient.data_size)

    # --- data fds ----------------------------------------------------------------------

    read = _blocking(VfioClient.read)

    def read_stream(
        self, fd: int, *, chunk_size: int = 1 << 20, limit: int = 0, nonblock: bool = False
    ) -> Iterator[bytes]:
        """Chunks until the end of the stream (or ENOMSG in PRE_COPY)."""
        agen = cast(
            AsyncGenerator[bytes, None],
            self.client.read_stream(fd, chunk_size=chunk_size, limit=limit, nonblock=nonblock),
        )
        return self._iterate(agen, agen.aclose)

    def read_all(self, fd: int, chunk_size: int = 1 << 20) -> bytes:
        """Read a data fd to its end (STOP_COPY)."""
        return b"".join(self.read_stream(fd, chunk_size=chunk_size))

    def write(self, fd: int, chunks: bytes | Iterable[bytes] | AsyncIterable[bytes]) -> int:
        """write(2) each chunk in order; a plain iterable is consumed in the loop thread."""
        if isinstance(chunks, bytes | bytearray | memoryview | AsyncIterable):
            return self._run(self.client.write(fd, chunks))
        return self._run(self.client.write(fd, list(chunks)))

    # --- user memory (the local data path; see vfioclient/usermem.py) -------------------

    map_user_memory = _blocking(VfioClient.map_user_memory)
    unmap_user_memory = _blocking(VfioClient.unmap_user_memory)
    read_into = _blocking(VfioClient.read_into)
    write_from = _blocking(VfioClient.write_from)
    precopy_info = _blocking(VfioClient.precopy_info)

    # --- events and audit --------------------------------------------------------------

    def events(self, device: str | None = None) -> Generator[Event, None, None]:
        """A device's events (every device's without one), as they happen,
        until the server stops.  Subscribed when this returns; close the
        iterator to stop following."""

        async def subscribe() -> EventStream:
            stream = self.client.events(device)
            try:
                await stream.ready()
            except BaseException:
                await stream.aclose()
                raise
            return stream

        stream = self._run(subscribe())
        return self._iterate(stream, stream.aclose)

    audit = _blocking(VfioClient.audit)
