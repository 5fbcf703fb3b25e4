"""A probe service of the four call types, served and called through the gRPC
metrics interceptors, and the metrics read back over HTTP.

Messages are `Msg`, with hand-written (de)serializers, so that a wrapped
handler that lost them would fail (grpc would pass bytes, or choke on a Msg;
not str: grpc encodes a str before its serializer sees it).  A request says
how the call ends: "N:ENDING" streams N responses (server and bidi streams;
the bidi stream echoes each request first), then ENDING: ok, abort (NOT_FOUND
with trailing metadata), rich (FAILED_PRECONDITION with an ErrorInfo), raise
(an exception in the handler), code (set_code ALREADY_EXISTS, then return) or
hang (until cancelled).  Streamed requests end as their last one says.

Every test runs on asyncio's loop and on uvloop (the services' loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import uvloop
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from grpcsvc.errors import abort as rich_abort
from grpcsvc.metrics import (
    GrpcClientMetrics,
    GrpcServerMetrics,
    MetricsEndpoint,
    start_metrics_http,
)

SERVICE = "metrics.test.v1.Probe"
REGISTERED = "metrics.test.v1.RegisteredProbe"  # the generated code's way of registering
UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI_STREAM = "Unary", "ServerStream", "ClientStream", "Bidi"
KIND = {
    UNARY: "unary",
    SERVER_STREAM: "server_stream",
    CLIENT_STREAM: "client_stream",
    BIDI_STREAM: "bidi_stream",
}
METHODS = list(KIND)

ENDING_CODE = {
    "ok": grpc.StatusCode.OK,
    "abort": grpc.StatusCode.NOT_FOUND,
    "rich": grpc.StatusCode.FAILED_PRECONDITION,
    "raise": grpc.StatusCode.UNKNOWN,
    "code": grpc.StatusCode.ALREADY_EXISTS,
}
DETAIL_KEY = "probe-detail"

Context = grpc.aio.ServicerContext[Any, Any]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@dataclass(frozen=True)
class Msg:
    text: str

    def to_wire(self) -> bytes:
        return self.text.encode()

    @classmethod
    def from_wire(cls, data: bytes) -> Msg:
        return cls(data.decode())


DONE = Msg("done")


def request(n: int = 0, ending: str = "ok") -> Msg:
    return Msg(f"{n}:{ending}")


def _parse(message: Msg) -> tuple[int, str]:
    n, _, ending = message.text.partition(":")
    return int(n), ending


async def _finish(ending: str, context: Context) -> None:
    if ending == "abort":
        await context.abort(
            grpc.StatusCode.NOT_FOUND, "no such probe", trailing_metadata=((DETAIL_KEY, "abort"),)
        )
    elif ending == "rich":
        await rich_abort(
            context, grpc.StatusCode.FAILED_PRECONDITION, "not now", reason="EBUSY", domain="probe"
        )
    elif ending == "raise":
        raise RuntimeError("probe handler bug")
    elif ending == "code":
        context.set_code(grpc.StatusCode.ALREADY_EXISTS)
        context.set_details("set by the handler")
    elif ending == "hang":
        await asyncio.Event().wait()


async def _unary(message: Msg, context: Context) -> Msg:
    await _finish(_parse(message)[1], context)
    return DONE


async def _server_stream(message: Msg, context: Context) -> AsyncIterator[Msg]:
    n, ending = _parse(message)
    for i in range(n):
        yield Msg(str(i))
    await _finish(ending, context)


async def _client_stream(messages: AsyncIterator[Msg], context: Context) -> Msg:
    last = request()
    async for m in messages:
        last = m
    await _finish(_parse(last)[1], context)
    return DONE


async def _bidi(messages: AsyncIterator[Msg], context: Context) -> AsyncIterator[Msg]:
    last = request()
    async for m in messages:
        last = m
        yield m
    n, ending = _parse(last)
    for i in range(n):
        yield Msg(str(i))
    await _finish(ending, context)


def _recorded(handler: Callable[..., Any], ends: list[float | None]) -> Callable[..., Any]:
    """`handler`, which records the time left to its deadline as it ends (the
    server's own view: from the timeout the client sent, by the server's clock)."""
    if inspect.isasyncgenfunction(handler):

        async def stream(request: Any, context: Context) -> AsyncIterator[Msg]:
            try:
                async with contextlib.aclosing(handler(request, context)) as responses:
                    async for r in responses:
                        yield r
            finally:
                ends.append(context.time_remaining())

        return stream

    async def call(request: Any, context: Context) -> Msg:
        try:
            response: Msg = await handler(request, context)
            return response
        finally:
            ends.append(context.time_remaining())

    return call


def _handlers(ends: list[float | None]) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    codec: dict[str, Callable[..., Any]] = {
        "request_deserializer": Msg.from_wire,
        "response_serializer": Msg.to_wire,
    }
    return {
        UNARY: grpc.unary_unary_rpc_method_handler(_recorded(_unary, ends), **codec),
        SERVER_STREAM: grpc.unary_stream_rpc_method_handler(
            _recorded(_server_stream, ends), **codec
        ),
        CLIENT_STREAM: grpc.stream_unary_rpc_method_handler(
            _recorded(_client_stream, ends), **codec
        ),
        BIDI_STREAM: grpc.stream_stream_rpc_method_handler(_recorded(_bidi, ends), **codec),
    }


class Samples:
    """One scrape: sample values by name and labels."""

    def __init__(self, exposition: str) -> None:
        self.exposition = exposition
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(exposition):
            self.types[family.name] = family.type
            for s in family.samples:
                self.values[s.name, frozenset(s.labels.items())] = s.value

    def sum(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and want <= ls)

    def label_sets(self, name: str) -> list[dict[str, str]]:
        return [dict(ls) for (n, ls) in self.values if n == name]

    def delta(self, before: Samples) -> Samples:
        out = Samples("")
        out.types = self.types
        out.values = {k: v - before.values.get(k, 0.0) for k, v in self.values.items()}
        return out


def unsettled(s: Samples) -> list[str]:
    """Label sets whose calls are started but not all handled (or the reverse)."""
    out = []
    for side in ("server", "client"):
        for labels in s.label_sets(f"grpc_{side}_started_total"):
            started = s.sum(f"grpc_{side}_started_total", **labels)
            handled = s.sum(f"grpc_{side}_handled_total", **labels)
            if started != handled:
                out.append(f"{side} {labels}: started {started}, handled {handled}")
    return out


@dataclass
class Rig:
    registry: CollectorRegistry
    server: grpc.aio.Server
    channel: grpc.aio.Channel
    endpoint: MetricsEndpoint
    port: int
    plain: grpc.aio.Channel  # no interceptors: what a call does without them
    ends: list[float | None]  # each handler's time left to its deadline as it ended
    multicallables: dict[tuple[str, str, bool], Any] = field(default_factory=dict)

    def method(self, name: str, *, service: str = SERVICE, plain: bool = False) -> Any:
        key = (service, name, plain)
        if key not in self.multicallables:
            channel = self.plain if plain else self.channel
            make = {
                UNARY: channel.unary_unary,
                SERVER_STREAM: channel.unary_stream,
                CLIENT_STREAM: channel.stream_unary,
                BIDI_STREAM: channel.stream_stream,
            }[name]
            self.multicallables[key] = make(
                f"/{service}/{name}",
                request_serializer=Msg.to_wire,
                response_deserializer=Msg.from_wire,
                _registered_method=service == REGISTERED,  # type: ignore[call-arg]
            )
        return self.multicallables[key]

    def start(self, name: str, requests: Iterable[Msg] | AsyncIterator[Msg], **kw: Any) -> Any:
        """Start a call: the first request for unary requests, all of them otherwise."""
        if name in (UNARY, SERVER_STREAM):
            (first,) = requests  # type: ignore[misc]
            return self.method(name, **kw)(first)
        return self.method(name, **kw)(requests)

    async def run(
        self, name: str, requests: Iterable[Msg] | AsyncIterator[Msg], **kw: Any
    ) -> tuple[list[str], grpc.StatusCode]:
        """Make a call to its end: the texts of the responses received and the final code."""
        call = self.start(name, requests, **kw)
        responses: list[str] = []
        try:
            if name in (UNARY, CLIENT_STREAM):
                responses.append((await call).text)
            else:
                async for r in call:
                    responses.append(r.text)
        except grpc.aio.AioRpcError as e:
            return responses, e.code()
        return responses, grpc.StatusCode.OK

    async def scrape(self, path: str = "/metrics") -> str:
        def get() -> str:
            url = f"http://127.0.0.1:{self.endpoint.port}{path}"
            with urllib.request.urlopen(url, timeout=5) as r:
                body: bytes = r.read()
                return body.decode()

        return await asyncio.to_thread(get)

    async def samples(self) -> Samples:
        return Samples(await self.scrape())

    async def settled(self, timeout: float = 5.0) -> Samples:
        """A scrape once every call started is handled, on both sides (the
        server may count a call just after its client saw the status)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            s = await self.samples()
            left = unsettled(s)
            if not left:
                return s
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("calls never all handled: " + "; ".join(left))
            await asyncio.sleep(0.01)


async def serve(
    registry: CollectorRegistry, ends: list[float | None] | None = None, **metrics: Any
) -> tuple[grpc.aio.Server, int]:
    ends = [] if ends is None else ends
    server = grpc.aio.server(interceptors=[GrpcServerMetrics(registry, **metrics).interceptor])
    handlers = _handlers(ends)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(REGISTERED, handlers)  # type: ignore[attr-defined]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    registry = CollectorRegistry()
    ends: list[float | None] = []
    server, port = await serve(registry, ends)
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(
        target, interceptors=GrpcClientMetrics(registry).interceptors()
    )
    plain = grpc.aio.insecure_channel(target)
    endpoint = start_metrics_http("127.0.0.1:0", registry)
    try:
        yield Rig(registry, server, channel, endpoint, port, plain, ends)
    finally:
        await channel.close(None)
        await plain.close(None)
        await server.stop(None)
        await asyncio.to_thread(endpoint.stop)
