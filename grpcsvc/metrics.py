"""gRPC metrics for Prometheus, as go-grpc-prometheus names them, for grpc.aio
servers and channels, and the HTTP endpoint that serves them.

Series (one label set per method: `grpc_type`, `grpc_service`, `grpc_method`):
`grpc_{server,client}_started_total`, `..._handled_total` (plus `grpc_code`),
`..._msg_received_total`, `..._msg_sent_total` and the histogram
`..._handling_seconds`, with go-grpc-prometheus's help texts and buckets, so
that its dashboards and alerts apply unchanged.

What grpc.aio makes particular, and how it is counted:

* Server: a handler is a coroutine (unary response) or an async generator
  (streamed response).  The interceptor returns a handler of the same kind
  wrapping the original.  A streamed response counts as sent when grpc asks
  for the next one (it asks only once the previous one is written), a
  streamed request when the handler takes it.  The handled code is what the
  client gets: OK, the code given to `context.set_code` or `context.abort`
  (which raises `grpc.aio.AbortError`), UNKNOWN for any other exception
  (unless a code was set: grpc sends that one), CANCELLED when the client goes
  away (the handler gets `CancelledError`, or `GeneratorExit` at a `yield`),
  DEADLINE_EXCEEDED when the deadline passed (however the handler ended).
  One case grpc.aio hides: a client that cancels a request stream gives the
  handler waiting for the next request an end of stream, not an error; if the
  handler then returns before grpc cancels it, it counts as it returned (OK)
  while its client counts CANCELLED.  Handlers streaming through
  `context.write` are counted without their messages.  Sync handlers (run in
  grpc's thread pool) are served untouched and uncounted: their context does
  not tell the status code, so their counts could not be right.
* Client: the continuation returns the call at once, so the interceptor never
  awaits it (that would hold back `write` and the response stream).  A done
  callback on the call counts it handled; a streamed response goes through an
  async iterator that counts it (grpc.aio then reads the call through that
  iterator, and `read()`, `cancel()`, `code()` and errors still reach the
  caller unchanged).

Every instance registers into the registry it is given: tests run several
servers in one process, so nothing goes to prometheus_client's global one.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from .server import ListenError, split_host_port

if TYPE_CHECKING:
    # grpc-stubs types the client interceptors' continuations as returning the
    # response, not an awaitable call; the classes below say what grpc.aio does.
    _ServerInterceptorBase = grpc.aio.ServerInterceptor[object, object]
    _UnaryUnaryBase = object
    _UnaryStreamBase = object
    _StreamUnaryBase = object
    _StreamStreamBase = object
else:
    _ServerInterceptorBase = grpc.aio.ServerInterceptor
    _UnaryUnaryBase = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStreamBase = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnaryBase = grpc.aio.StreamUnaryClientInterceptor
    _StreamStreamBase = grpc.aio.StreamStreamClientInterceptor

_T = TypeVar("_T")

# go-grpc-prometheus's default (prometheus.DefBuckets), not prometheus_client's.
HANDLING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_LABELS = ("grpc_type", "grpc_service", "grpc_method")
_OK = grpc.StatusCode.OK


def _grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


def _split_method(full_method: str) -> tuple[str, str]:
    """Service and method of "/vfio.v1.Vfio/Read", as go-grpc-prometheus splits them."""
    service, sep, method = full_method.removeprefix("/").partition("/")
    return (service, method) if sep else ("unknown", "unknown")


class _Method:
    """The series of one method on one side, their label children looked up once."""

    __slots__ = ("_by_code", "_handled", "_labels", "received", "seconds", "sent", "started")

    def __init__(self, metrics: _Metrics, labels: tuple[str, str, str]) -> None:
        self._labels = labels
        self._handled = metrics.handled
        self._by_code: dict[grpc.StatusCode, Counter] = {}
        self.started = metrics.started.labels(*labels)
        self.received = metrics.received.labels(*labels)
        self.sent = metrics.sent.labels(*labels)
        self.seconds = metrics.seconds.labels(*labels) if metrics.seconds is not None else None

    def begin(self) -> float:
        self.started.inc()
        return time.perf_counter() if self.seconds is not None else 0.0

    def end(self, began: float, code: grpc.StatusCode) -> None:
        handled = self._by_code.get(code)
        if handled is None:
            handled = self._by_code[code] = self._handled.labels(*self._labels, code.name)
        handled.inc()
        if self.seconds is not None:
            self.seconds.observe(time.perf_counter() - began)


class _Metrics:
    """The five series of one side ("server" or "client") in one registry."""

    def __init__(self, registry: CollectorRegistry, side: str, handling_seconds: bool) -> None:
        by = "on the server" if side == "server" else "by the client"
        self.started = Counter(
            f"grpc_{side}_started", f"Total number of RPCs started {by}.", _LABELS,
            registry=registry,
        )  # fmt: skip
        self.handled = Counter(
            f"grpc_{side}_handled",
            f"Total number of RPCs completed {by}, regardless of success or failure.",
            (*_LABELS, "grpc_code"),
            registry=registry,
        )
        self.received = Counter(
            f"grpc_{side}_msg_received",
            f"Total number of RPC stream messages received {by}.",
            _LABELS,
            registry=registry,
        )
        self.sent = Counter(
            f"grpc_{side}_msg_sent",
            f"Total number of gRPC stream messages sent {by}.",
            _LABELS,
            registry=registry,
        )
        self.seconds = (
            Histogram(
                f"grpc_{side}_handling_seconds",
                f"Histogram of response latency (seconds) of gRPC calls {by}, "
                "from start to final status.",
                _LABELS,
                buckets=HANDLING_BUCKETS,
                registry=registry,
            )
            if handling_seconds
            else None
        )
        self._methods: dict[tuple[str, str], _Method] = {}

    def method(self, full_method: str, kind: str) -> _Method:
        m = self._methods.get((full_method, kind))
        if m is None:
            labels = (kind, *_split_method(full_method))
            m = self._methods[full_method, kind] = _Method(self, labels)
        return m


class _Counted(AsyncIterator[_T]):
    """Counts each item as it is taken from `source`."""

    __slots__ = ("_inc", "_next")

    def __init__(self, source: AsyncIterable[_T], inc: Callable[[], None]) -> None:
        self._next = source.__aiter__().__anext__
        self._inc = inc

    def __aiter__(self) -> AsyncIterator[_T]:
        return self

    async def __anext__(self) -> _T:
        item = await self._next()
        self._inc()
        return item


class _CountedWhenWritten(AsyncIterator[_T]):
    """Client requests: an item counts when the next one is asked for, since
    grpc.aio's writer asks only once it wrote the previous one (and stops
    asking when a write fails).  Takes what grpc.aio takes: sync or async."""

    __slots__ = ("_anext", "_inc", "_next", "_taken")

    def __init__(self, source: AsyncIterable[_T] | Iterable[_T], inc: Callable[[], None]) -> None:
        self._inc = inc
        self._taken = False
        if isinstance(source, AsyncIterable):
            self._anext: Callable[[], Awaitable[_T]] | None = source.__aiter__().__anext__
            self._next: Callable[[], _T] | None = None
        else:
            self._anext, self._next = None, iter(source).__next__

    def __aiter__(self) -> AsyncIterator[_T]:
        return self

    async def __anext__(self) -> _T:
        if self._taken:
            self._inc()
            self._taken = False
        if self._anext is not None:
            item = await self._anext()
        else:
            assert self._next is not None
            try:
                item = self._next()
            except StopIteration:
                raise StopAsyncIteration from None
        self._taken = True
        return item


# --- server ---------------------------------------------------------------

_Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_MAKE_HANDLER: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _server_code(context: _Context, error: BaseException | None) -> grpc.StatusCode:
    """The status the client gets, as grpc.aio's server decides it."""
    remaining: float | None = context.time_remaining()  # 0 once passed, None without one
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED  # whatever the handler did after it
    code: grpc.StatusCode | None = context.code()  # None until set_code or abort
    if error is None:
        return code or _OK
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    # AbortError: abort set the code.  Any other exception: UNKNOWN, unless a code was set.
    return grpc.StatusCode.UNKNOWN if code is None or code is _OK else code


def _server_requests(request: Any, m: _Method, streaming: bool) -> Any:
    if streaming:
        return _Counted(request, m.received.inc)
    m.received.inc()
    return request


def _serve_unary_response(
    behavior: Callable[[Any, _Context], Awaitable[Any]], m: _Method, request_streaming: bool,
    count_sent: bool,
) -> Callable[[Any, _Context], Awaitable[Any]]:  # fmt: skip
    async def serve(request: Any, context: _Context) -> Any:
        began = m.begin()
        try:
            response = await behavior(_server_requests(request, m, request_streaming), context)
        except BaseException as e:
            m.end(began, _server_code(context, e))
            raise
        code = _server_code(context, None)
        if count_sent and code is _OK:
            m.sent.inc()
        m.end(began, code)
        return response

    return serve


def _serve_stream_response(
    behavior: Callable[[Any, _Context], AsyncGenerator[Any, None]],
    m: _Method,
    request_streaming: bool,
) -> Callable[[Any, _Context], AsyncGenerator[Any, None]]:
    async def serve(request: Any, context: _Context) -> AsyncGenerator[Any, None]:
        began = m.begin()
        try:
            # aclosing: when grpc closes this generator (client gone), the
            # handler's own generator is closed right away too, not at GC.
            async with contextlib.aclosing(
                behavior(_server_requests(request, m, request_streaming), context)
            ) as responses:
                async for response in responses:
                    yield response
                    m.sent.inc()  # grpc asks for the next one once this one is written
        except BaseException as e:
            m.end(began, _server_code(context, e))
            raise
        m.end(began, _server_code(context, None))

    return serve


class _ServerInterceptor(_ServerInterceptorBase):
    def __init__(self, metrics: _Metrics) -> None:
        self._metrics = metrics
        # method -> (the handler found, its counting wrapper): grpc hands out the
        # same handler object for a method, so the wrapper is built once.
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    async def intercept_service(  # type: ignore[override]  # stubs: never None
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, method: str, h: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        req, resp = h.request_streaming, h.response_streaming
        behavior: Any
        if req:
            behavior = h.stream_stream if resp else h.stream_unary
        else:
            behavior = h.unary_stream if resp else h.unary_unary
        if not (inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior)):
            return h  # sync handler: see the module docstring
        m = self._metrics.method(method, _grpc_type(req, resp))
        if inspect.isasyncgenfunction(behavior):
            serve: Any = _serve_stream_response(behavior, m, req)
        else:
            # A streamed response through context.write: counted without its messages.
            serve = _serve_unary_response(behavior, m, req, count_sent=not resp)
        return _MAKE_HANDLER[req, resp](
            serve,
            request_deserializer=h.request_deserializer,
            response_serializer=h.response_serializer,
        )


class GrpcServerMetrics:
    """go-grpc-prometheus's server series in `registry`; pass `interceptor` to
    `grpc.aio.server(interceptors=...)` (or `GrpcService`)."""

    def __init__(self, registry: CollectorRegistry, *, handling_seconds: bool = True) -> None:
        self._interceptor = _ServerInterceptor(_Metrics(registry, "server", handling_seconds))

    @property
    def interceptor(self) -> grpc.aio.ServerInterceptor[object, object]:
        return self._interceptor


# --- client ---------------------------------------------------------------

_Continuation = Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]]


def _when_finished(call: grpc.aio.Call, count: Callable[[grpc.StatusCode], None]) -> None:
    """Count a finished call with its code, at once: `code()` is a coroutine,
    but on a finished grpc.aio call it returns without suspending."""
    pending = call.code()
    try:
        pending.send(None)
    except StopIteration as finished:
        count(finished.value)
        return
    pending.close()
    # Not seen with grpc.aio's own calls: a call object of some other
    # interceptor that wants to wait.  Ask it in a task, kept until it ends.
    task = asyncio.ensure_future(call.code())
    _asking.add(task)
    task.add_done_callback(_asking.discard)
    task.add_done_callback(lambda t: count(_task_code(t)))


_asking: set[asyncio.Future[grpc.StatusCode]] = set()


def _task_code(task: asyncio.Future[grpc.StatusCode]) -> grpc.StatusCode:
    if task.cancelled():
        return grpc.StatusCode.CANCELLED
    return task.result() if task.exception() is None else grpc.StatusCode.UNKNOWN


class _ClientInterceptor:
    """One call type's interceptor; the grpc.aio method of each type is `intercept`."""

    request_streaming = False
    response_streaming = False

    def __init__(self, metrics: _Metrics) -> None:
        self._metrics = metrics
        self._kind = _grpc_type(self.request_streaming, self.response_streaming)
        self._methods: dict[str | bytes, _Method] = {}

    def _method(self, details: grpc.aio.ClientCallDetails) -> _Method:
        key: str | bytes = details.method  # bytes in grpc.aio, whatever the stubs say
        m = self._methods.get(key)
        if m is None:
            name = key.decode() if isinstance(key, bytes) else key
            m = self._methods[key] = self._metrics.method(name, self._kind)
        return m

    async def intercept(
        self, continuation: _Continuation, client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:  # fmt: skip
        m = self._method(client_call_details)
        began = m.begin()
        if self.request_streaming:
            request = _CountedWhenWritten(request, m.sent.inc)
        else:
            m.sent.inc()
        try:
            call = await continuation(client_call_details, request)
        except BaseException as e:
            m.end(began, _error_code(e))
            raise

        def count(code: grpc.StatusCode) -> None:
            if code is _OK and not self.response_streaming:
                m.received.inc()
            m.end(began, code)

        if call.done():  # also a response an inner interceptor made up, which has no callbacks
            _when_finished(call, count)
        else:
            call.add_done_callback(lambda finished: _when_finished(finished, count))
        # A response stream: grpc.aio reads the call through the iterator returned.
        return _Counted(call, m.received.inc) if self.response_streaming else call


def _error_code(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code()
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _UnaryUnary(_ClientInterceptor, _UnaryUnaryBase):
    intercept_unary_unary = _ClientInterceptor.intercept


class _UnaryStream(_ClientInterceptor, _UnaryStreamBase):
    response_streaming = True
    intercept_unary_stream = _ClientInterceptor.intercept


class _StreamUnary(_ClientInterceptor, _StreamUnaryBase):
    request_streaming = True
    intercept_stream_unary = _ClientInterceptor.intercept


class _StreamStream(_ClientInterceptor, _StreamStreamBase):
    request_streaming = response_streaming = True
    intercept_stream_stream = _ClientInterceptor.intercept


class GrpcClientMetrics:
    """go-grpc-prometheus's client series in `registry`; pass `interceptors()` to
    `grpc.aio.insecure_channel(target, interceptors=...)`."""

    def __init__(self, registry: CollectorRegistry, *, handling_seconds: bool = True) -> None:
        metrics = _Metrics(registry, "client", handling_seconds)
        self._interceptors = [
            _UnaryUnary(metrics),
            _UnaryStream(metrics),
            _StreamUnary(metrics),
            _StreamStream(metrics),
        ]

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [cast(grpc.aio.ClientInterceptor, i) for i in self._interceptors]


# --- HTTP endpoint --------------------------------------------------------


class MetricsEndpoint:
    """prometheus_client's HTTP server for one registry, in a daemon thread;
    every path (`/metrics` included) serves the exposition."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_port

    def stop(self) -> None:
        """Shut down and join the thread (idempotent)."""
        # serve_forever looks for a shutdown request every 0.5 s, or when its
        # socket wakes it: a listening socket shut down wakes it at once.
        with contextlib.suppress(OSError):
            self._server.socket.shutdown(socket.SHUT_RDWR)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def start_metrics_http(listen: str, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve `registry` over HTTP on HOST:PORT (port 0: any free port)."""
    host, port = split_host_port(listen)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:  # a taken port, a host that does not resolve or is not ours
        raise ListenError(f"cannot serve metrics on {listen}: {e.strerror or e}") from None
    return MetricsEndpoint(server, thread)
