"""Record what moves through user memory (ReadInto / WriteFrom and their
streams), for tests
that check the bytes a migration moved on the shm data path as they check
Read / ReadStream / Write on the gRPC one.

Each client's mappings are opened here too, by name, when MapUserMemory
returns (the orchestrator unlinks the file only after its maps), so the bytes
a ReadInto put at an address, and those a WriteFrom takes, can be read."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from fwemu.hostmem import open_segment
from vfioclient import VfioClient

Sink = Callable[[int, bytes], None]  # (data fd, bytes)


def record_user_memory(
    src: VfioClient, dst: VfioClient, on_read: Sink | None = None, on_write: Sink | None = None
) -> None:
    """Wrap the clients' map_user_memory, src.read_into and dst.write_from."""
    spaces: dict[int, dict[int, memoryview]] = {}

    def bytes_at(client: VfioClient, addr: int, n: int) -> bytes:
        for base, view in spaces.get(id(client), {}).items():
            if base <= addr and addr + n <= base + len(view):
                return bytes(view[addr - base : addr - base + n])
        raise AssertionError(f"{addr:#x} is not in a mapping of ours")

    for c in {id(src): src, id(dst): dst}.values():
        mapper = c.map_user_memory

        async def map_(name: str, length: int, c: VfioClient = c, m: Any = mapper) -> int:
            addr: int = await m(name, length)
            spaces.setdefault(id(c), {})[addr] = open_segment(name, length).view
            return addr

        c.map_user_memory = map_  # type: ignore[method-assign]
    src_read_into, dst_write_from = src.read_into, dst.write_from

    async def read_into(fd: int, addr: int, count: int, **kw: Any) -> int:
        n: int = await src_read_into(fd, addr, count, **kw)
        if on_read is not None:
            on_read(fd, bytes_at(src, addr, n))
        return n

    async def write_from(fd: int, addr: int, count: int) -> int:
        if on_write is not None:
            on_write(fd, bytes_at(dst, addr, count))
        return await dst_write_from(fd, addr, count)

    src_read_stream, dst_write_stream = src.read_into_stream, dst.write_from_stream

    def read_into_stream(fd: int) -> Any:
        call = src_read_stream(fd)
        submitted: deque[int] = deque()
        submit, submit_many, result = call.submit, call.submit_many, call.result

        async def submit_(addr: int, count: int, **kw: Any) -> None:
            submitted.append(addr)
            await submit(addr, count, **kw)

        async def submit_many_(spans: list[tuple[int, int]]) -> None:
            submitted.extend(addr for addr, _ in spans)
            await submit_many(spans)

        async def result_() -> int | None:
            n = await result()
            if n is not None:
                addr = submitted.popleft()
                if n and on_read is not None:
                    on_read(fd, bytes_at(src, addr, n))
            return n

        call.submit, call.submit_many = submit_, submit_many_  # type: ignore[method-assign]
        call.result = result_  # type: ignore[method-assign]
        return call

    def write_from_stream(fd: int) -> Any:
        call = dst_write_stream(fd)
        submit, submit_many = call.submit, call.submit_many

        async def submit_(addr: int, count: int) -> None:
            if on_write is not None:
                on_write(fd, bytes_at(dst, addr, count))
            await submit(addr, count)

        async def submit_many_(spans: list[tuple[int, int]]) -> None:
            for addr, count in spans:
                if on_write is not None:
                    on_write(fd, bytes_at(dst, addr, count))
            await submit_many(spans)

        call.submit, call.submit_many = submit_, submit_many_  # type: ignore[method-assign]
        return call

    src.read_into = read_into  # type: ignore[method-assign]
    dst.write_from = write_from  # type: ignore[method-assign]
    src.read_into_stream = read_into_stream  # type: ignore[method-assign]
    dst.write_from_stream = write_from_stream  # type: ignore[method-assign]
