"""A fixture recording the services added to any grpc.aio server with
add_registered_method_handlers while a test runs (grpcsvc.generic says why
the services add none)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest


@pytest.fixture
def registrations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The services added with add_registered_method_handlers to any grpc.aio
    server made while the test runs."""
    seen: list[str] = []
    real = grpc.aio.server

    def spying(*args: Any, **kwargs: Any) -> grpc.aio.Server:
        server = real(*args, **kwargs)
        add = server.add_registered_method_handlers  # type: ignore[attr-defined]

        def recorded(service: str, handlers: Any) -> None:
            seen.append(service)
            add(service, handlers)

        server.add_registered_method_handlers = recorded  # type: ignore[attr-defined]
        return server

    monkeypatch.setattr(grpc.aio, "server", spying)
    yield seen


async def assert_unknown_method_unimplemented(channel: grpc.aio.Channel, service: str) -> None:
    """A method `service` does not have is UNIMPLEMENTED, as with registered
    handlers (the generic handler answers None for it)."""
    missing = channel.unary_unary(f"/{service}/NoSuchMethod", lambda b: b, lambda b: b)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await missing(b"", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
