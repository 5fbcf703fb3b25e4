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
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from types import TracebackType
from typing import Any, TypeVar, cast

from driver.api.events import Event
from driver.vfio.uapi import MigState

from .client import (
    AuditReport,
    Device,
    EventStream,
    FeatureResult,
    PrecopyInfo,
    VfioClient,
    VfioClientError,
)

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


class SyncVfioClient:
    """One client (a 'process') of a vfio-driver service, with blocking calls."""

    def __init__(self, runner: _LoopThread, client: VfioClient) -> None:
        self._runner = runner
        self._client: VfioClient | None = client

    @classmethod
    def connect(
        cls, target: str, *, client_id: str | None = None, timeout: float = 10.0
    ) -> SyncVfioClient:
        """Connect and open the session; VfioClientError(ENOTCONN) if unreachable."""
        runner = _LoopThread(f"vfioclient-{target}")

        async def connect() -> VfioClient:
            return await VfioClient.connect(target, client_id=client_id, timeout=timeout)

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

    # --- devices ---------------------------------------------------------------------

    def list_devices(self) -> list[Device]:
        return self._run(self.client.list_devices())

    def open_device(self, name: str) -> int:
        return self._run(self.client.open_device(name))

    def close(self, fd: int) -> None:
        """close(2) an fd (not the client: see `close_client`)."""
        self._run(self.client.close(fd))

    def reset(self, fd: int) -> None:
        self._run(self.client.reset(fd))

    def device_feature(
        self,
        fd: int,
        flags: int,
        data: bytes = b"",
        *,
        argsz: int | None = None,
        user_memory: Mapping[int, bytes] | None = None,
    ) -> FeatureResult:
        return self._run(
            self.client.device_feature(fd, flags, data, argsz=argsz, user_memory=user_memory)
        )

    # --- migration features ------------------------------------------------------------

    def migration_flags(self, fd: int) -> int:
        return self._run(self.client.migration_flags(fd))

    def probe(self, fd: int, feature: int, ops: int = 0) -> bool:
        return self._run(self.client.probe(fd, feature, ops))

    def enable_precopy_info_v2(self, fd: int) -> bool:
        return self._run(self.client.enable_precopy_info_v2(fd))

    def get_state(self, fd: int) -> MigState:
        return self._run(self.client.get_state(fd))

    def set_state(self, fd: int, state: MigState) -> int | None:
        return self._run(self.client.set_state(fd, state))

    def data_size(self, fd: int) -> int:
        return self._run(self.client.data_size(fd))

    # --- data fds ----------------------------------------------------------------------

    def read(self, fd: int, count: int, *, nonblock: bool = False) -> bytes:
        return self._run(self.client.read(fd, count, nonblock=nonblock))

    def read_stream(
        self, fd: int, *, chunk_size: int = 1 << 20, limit: int = 0, nonblock: bool = False
    ) -> Iterator[bytes]:
        """Chunks until the end of the stream (or ENOMSG in PRE_COPY)."""
        agen = cast(
            AsyncGenerator[bytes, None],
            self.client.read_stream(fd, chunk_size=chunk_size, limit=limit, nonblock=nonblock),
        )

        async def step() -> tuple[bool, bytes]:
            try:
                return True, await agen.__anext__()
            except StopAsyncIteration:
                return False, b""

        try:
            while True:
                more, chunk = self._run(step())
                if not more:
                    return
                yield chunk
        finally:
            if not self._runner.loop.is_closed():
                self._run(agen.aclose())

    def read_all(self, fd: int, chunk_size: int = 1 << 20) -> bytes:
        """Read a data fd to its end (STOP_COPY)."""
        return b"".join(self.read_stream(fd, chunk_size=chunk_size))

    def write(self, fd: int, chunks: bytes | Iterable[bytes] | AsyncIterable[bytes]) -> int:
        """write(2) each chunk in order; a plain iterable is consumed in the loop thread."""
        if isinstance(chunks, bytes | bytearray | memoryview | AsyncIterable):
            return self._run(self.client.write(fd, chunks))
        return self._run(self.client.write(fd, list(chunks)))

    # --- user memory (the local data path; see vfioclient/usermem.py) -------------------

    def map_user_memory(self, shm_name: str, length: int) -> int:
        return self._run(self.client.map_user_memory(shm_name, length))

    def unmap_user_memory(self, addr: int) -> None:
        self._run(self.client.unmap_user_memory(addr))

    def read_into(self, fd: int, addr: int, count: int, *, nonblock: bool = False) -> int:
        return self._run(self.client.read_into(fd, addr, count, nonblock=nonblock))

    def write_from(self, fd: int, addr: int, count: int) -> int:
        return self._run(self.client.write_from(fd, addr, count))

    def precopy_info(self, fd: int, *, flags: int = 0, argsz: int = 24) -> PrecopyInfo:
        return self._run(self.client.precopy_info(fd, flags=flags, argsz=argsz))

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

        return self._follow(self._run(subscribe()))

    def _follow(self, stream: EventStream) -> Generator[Event, None, None]:
        async def step() -> Event | None:
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                return None

        try:
            while (ev := self._run(step())) is not None:
                yield ev
        finally:
            if not self._runner.loop.is_closed():
                self._run(stream.aclose())

    def audit(self, device: str | None = None) -> AuditReport:
        return self._run(self.client.audit(device))
