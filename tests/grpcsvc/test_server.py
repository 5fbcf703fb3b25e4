"""grpcsvc.server: the `serve` command's --listen, and a service's stop."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from grpcsvc.server import GrpcService, add_serve_command

pytestmark = pytest.mark.grpc


def test_the_serve_command_listens_where_told_by_default() -> None:
    p = argparse.ArgumentParser(prog="svc")
    sub = p.add_subparsers(dest="command", required=True)
    s = add_serve_command(sub, help="serve it", description="Serve it.", listen="127.0.0.1:5")
    s.add_argument("--other")
    assert p.parse_args(["serve"]).listen == "127.0.0.1:5"
    assert p.parse_args(["serve", "--listen", "[::1]:7"]).listen == "[::1]:7"
    assert s.format_help().index("--listen") < s.format_help().index("--other")  # first


async def test_on_stop_runs_once_stop_is_set_before_the_server_stops() -> None:
    service = GrpcService([], lambda server: None)
    await service.start("127.0.0.1:0")
    order: list[str] = []
    graceful_stop = service.stop

    async def stop_server(grace: float = 5.0) -> None:
        order.append("stop")
        await graceful_stop(grace)

    service.stop = stop_server  # type: ignore[method-assign]
    stop = asyncio.Event()
    serving = asyncio.ensure_future(
        service.serve_until(stop, 0, on_stop=lambda: order.append("on_stop"))
    )
    await asyncio.sleep(0.05)
    assert order == []
    stop.set()
    await asyncio.wait_for(serving, 10)
    assert order == ["on_stop", "stop"]


async def test_on_stop_does_not_run_when_the_server_ends_by_itself() -> None:
    service = GrpcService([], lambda server: None)
    await service.start("127.0.0.1:0")
    seen: list[int] = []
    serving = asyncio.ensure_future(
        service.serve_until(asyncio.Event(), 0, on_stop=lambda: seen.append(1))
    )
    await asyncio.sleep(0.05)
    await service.server.stop(0)
    await asyncio.wait_for(serving, 10)
    assert seen == []
