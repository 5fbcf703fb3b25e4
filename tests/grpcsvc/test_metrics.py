"""The gRPC metrics interceptors (grpcsvc.metrics) against a probe service of
the four call types: go-grpc-prometheus's series, names and labels, every
message counted once, each call handled once with the code its client gets,
client counts matching server counts, and calls behaving as without the
interceptors.  Metrics are read over the HTTP endpoint, as Prometheus would."""

from __future__ import annotations

import asyncio
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from grpcsvc.errors import error_info
from grpcsvc.metrics import (
    HANDLING_BUCKETS,
    GrpcClientMetrics,
    GrpcServerMetrics,
    _when_finished,
    start_metrics_http,
)
from grpcsvc.server import ListenError
from tests.support.promtool import check_metrics

from .conftest import (
    BIDI_STREAM,
    CLIENT_STREAM,
    DETAIL_KEY,
    ENDING_CODE,
    KIND,
    METHODS,
    REGISTERED,
    SERVER_STREAM,
    SERVICE,
    UNARY,
    Msg,
    Rig,
    request,
    serve,
)

pytestmark = pytest.mark.grpc

SIDES = ("server", "client")
STREAMED_REQUESTS = (CLIENT_STREAM, BIDI_STREAM)


def labels(name: str, service: str = SERVICE) -> dict[str, str]:
    return {"grpc_type": KIND[name], "grpc_service": service, "grpc_method": name}


def requests_for(name: str, k: int, n: int, ending: str) -> list[Msg]:
    """The requests of a call that streams `n` responses and ends with `ending`
    (`k` of them when requests are streamed)."""
    return [request(n, ending)] * (k if name in STREAMED_REQUESTS else 1)


def expected(name: str, k: int, n: int, ending: str) -> tuple[int, int, grpc.StatusCode]:
    """Requests and responses a call moves, and its code."""
    if name in STREAMED_REQUESTS and k == 0:
        n, ending = 0, "ok"  # no request to say otherwise
    code = ENDING_CODE[ending]
    sent = k if name in STREAMED_REQUESTS else 1
    responses = {
        UNARY: int(code is grpc.StatusCode.OK),
        CLIENT_STREAM: int(code is grpc.StatusCode.OK),
        SERVER_STREAM: n,
        BIDI_STREAM: k + n,
    }[name]
    return sent, responses, code


async def hang_after(requests: list[Msg], sent: asyncio.Event) -> AsyncIterator[Msg]:
    for r in requests:
        yield r
    sent.set()
    await asyncio.Event().wait()


async def test_a_unary_call_as_go_grpc_prometheus_counts_it(rig: Rig) -> None:
    assert await rig.run(UNARY, [request()]) == (["done"], grpc.StatusCode.OK)
    s = await rig.settled()
    ls = labels(UNARY)
    for side in SIDES:
        assert s.types[f"grpc_{side}_started"] == "counter"
        assert s.types[f"grpc_{side}_handling_seconds"] == "histogram"
        assert s.label_sets(f"grpc_{side}_started_total") == [ls]
        assert s.label_sets(f"grpc_{side}_handled_total") == [{**ls, "grpc_code": "OK"}]
        for series in ("started", "handled", "msg_received", "msg_sent"):
            assert s.sum(f"grpc_{side}_{series}_total", **ls) == 1, (side, series)
        assert s.sum(f"grpc_{side}_handling_seconds_count", **ls) == 1
        buckets = sorted(
            float(b["le"]) for b in s.label_sets(f"grpc_{side}_handling_seconds_bucket")
        )
        assert buckets == [*HANDLING_BUCKETS, float("inf")]
        assert 0 < s.sum(f"grpc_{side}_handling_seconds_sum", **ls) < 5


async def test_grpc_type_service_and_method_labels_of_the_four_call_types(rig: Rig) -> None:
    for name in METHODS:
        await rig.run(name, requests_for(name, 2, 2, "ok"))
    s = await rig.settled()
    for side in SIDES:
        got = sorted(s.label_sets(f"grpc_{side}_started_total"), key=lambda ls: ls["grpc_method"])
        assert got == sorted((labels(n) for n in METHODS), key=lambda ls: ls["grpc_method"])
    assert {ls["grpc_type"] for ls in got} == {
        "unary",
        "client_stream",
        "server_stream",
        "bidi_stream",
    }


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    name=st.sampled_from(METHODS),
    k=st.integers(0, 40),
    n=st.integers(0, 40),
    ending=st.sampled_from(list(ENDING_CODE)),
    sync_requests=st.booleans(),
)
async def test_every_message_counted_once_and_every_call_handled_once(
    rig: Rig, name: str, k: int, n: int, ending: str, sync_requests: bool
) -> None:
    """Property: for any call type, number of messages each way and ending,
    the server counts what the client counts: started == handled == 1 with
    the code the client got, requests sent == received, responses sent ==
    received == what the caller iterated, one handling time each side."""
    before = await rig.settled()
    requests = requests_for(name, k, n, ending)
    source: Any = iter(requests) if sync_requests else _aiter(requests)
    if name not in STREAMED_REQUESTS:
        source = requests
    responses, code = await rig.run(name, source)
    sent, received, want = expected(name, k, n, ending)
    assert (len(responses), code) == (received, want)

    d = (await rig.settled()).delta(before)
    ls = labels(name)
    for side in SIDES:
        assert d.sum(f"grpc_{side}_started_total", **ls) == 1
        assert d.sum(f"grpc_{side}_handled_total", **ls, grpc_code=want.name) == 1
        assert d.sum(f"grpc_{side}_handling_seconds_count", **ls) == 1
    assert d.sum("grpc_client_msg_sent_total", **ls) == sent
    assert d.sum("grpc_server_msg_received_total", **ls) == sent
    assert d.sum("grpc_server_msg_sent_total", **ls) == received
    assert d.sum("grpc_client_msg_received_total", **ls) == received


async def _aiter(items: list[Msg]) -> AsyncIterator[Msg]:
    for i in items:
        yield i


@pytest.mark.parametrize("ending", list(ENDING_CODE))
@pytest.mark.parametrize("name", METHODS)
async def test_handled_code_is_the_code_the_client_gets(rig: Rig, name: str, ending: str) -> None:
    """OK on return, the set_code code, the abort code (AbortError), UNKNOWN
    for an exception: the same on both sides, and what the caller sees."""
    _, code = await rig.run(name, requests_for(name, 1, 1, ending))
    assert code == ENDING_CODE[ending]
    s = await rig.settled()
    for side in SIDES:
        handled = s.label_sets(f"grpc_{side}_handled_total")
        assert handled == [{**labels(name), "grpc_code": code.name}], side


@pytest.mark.parametrize("name", METHODS)
async def test_registered_methods_are_counted_like_generic_ones(rig: Rig, name: str) -> None:
    """Generated code registers with add_registered_method_handlers."""
    requests = requests_for(name, 3, 2, "ok")
    sent, received, _ = expected(name, 3, 2, "ok")
    responses, code = await rig.run(name, requests, service=REGISTERED)
    assert (len(responses), code) == (received, grpc.StatusCode.OK)
    s = await rig.settled()
    ls = labels(name, REGISTERED)
    for side in SIDES:
        assert s.sum(f"grpc_{side}_handled_total", **ls, grpc_code="OK") == 1
    assert s.sum("grpc_server_msg_received_total", **ls) == sent
    assert s.sum("grpc_client_msg_received_total", **ls) == received


@pytest.mark.parametrize("how", ["call.cancel", "task.cancel"])
@pytest.mark.parametrize("name", METHODS)
async def test_client_cancel_counts_cancelled_on_both_sides(rig: Rig, name: str, how: str) -> None:
    """The handler gets CancelledError (or GeneratorExit at a yield): CANCELLED,
    the messages that moved before counted on both sides."""
    sent_all = asyncio.Event()
    if name in STREAMED_REQUESTS:
        # The handler waits after the end of stream it reads: see grpcsvc.metrics.
        call = rig.start(name, hang_after([request(0, "hang")] * 3, sent_all))
    else:
        call = rig.start(name, [request(2, "hang")])
        sent_all.set()
    received: list[str] = []

    async def consume() -> None:
        if name in (UNARY, CLIENT_STREAM):
            await call
        else:
            async for r in call:
                received.append(r.text)

    task = asyncio.ensure_future(consume())
    await sent_all.wait()
    ls = labels(name)
    sent, responses = (3, 3) if name == BIDI_STREAM else (3, 0) if name == CLIENT_STREAM else (1, 2)
    if name == UNARY:
        responses = 0
    while (await rig.samples()).sum("grpc_server_msg_received_total", **ls) < sent or len(
        received
    ) < responses:
        await asyncio.sleep(0.01)
    if how == "call.cancel":
        call.cancel()
    else:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert call.cancelled()
    assert await call.code() == grpc.StatusCode.CANCELLED

    s = await rig.settled()
    for side in SIDES:
        handled = s.label_sets(f"grpc_{side}_handled_total")
        assert handled == [{**ls, "grpc_code": "CANCELLED"}], side
    assert s.sum("grpc_client_msg_sent_total", **ls) == sent
    assert s.sum("grpc_server_msg_received_total", **ls) == sent
    assert s.sum("grpc_server_msg_sent_total", **ls) == responses
    assert s.sum("grpc_client_msg_received_total", **ls) == responses


@pytest.mark.parametrize("name", METHODS)
async def test_deadline_counts_deadline_exceeded_on_both_sides(rig: Rig, name: str) -> None:
    """The server learns of a deadline only by its own clock, from the timeout
    the client sent.  Now and then (once in some thousand calls, under load)
    the client's cancel at its own deadline reaches the server first: the
    server then has a cancel before its deadline, and counts what grpc gives
    it for one.  Such a call proves nothing here and is made again; a call
    whose handler saw the deadline pass must count DEADLINE_EXCEEDED."""
    ls = labels(name)
    for _ in range(5):
        before = await rig.settled()
        call = rig.method(name)(
            request(0, "hang")
            if name in (UNARY, SERVER_STREAM)
            else hang_after([], asyncio.Event()),
            timeout=0.2,
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            if name in (UNARY, CLIENT_STREAM):
                await call
            else:
                async for _ in call:
                    pass
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        s = (await rig.settled()).delta(before)
        counted = {
            side: [
                c
                for c in grpc.StatusCode
                if s.sum(f"grpc_{side}_handled_total", **ls, grpc_code=c.name)
            ]
            for side in SIDES
        }
        for side in SIDES:
            assert s.sum(f"grpc_{side}_handled_total", **ls) == 1, side
        assert counted["client"] == [grpc.StatusCode.DEADLINE_EXCEEDED]
        left = rig.ends[-1]
        assert left is not None
        if left <= 0:
            assert counted["server"] == [grpc.StatusCode.DEADLINE_EXCEEDED]
            return
        # The client's cancel came first: ended by it (a request stream's end,
        # or CancelledError), or by the deadline passing after the handler ended.
        assert counted["server"][0] in (
            grpc.StatusCode.OK,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ), counted
    pytest.fail("in 5 calls the server never saw its deadline pass before the client's cancel")


async def _outcome(rig: Rig, name: str, ending: str, *, plain: bool) -> dict[str, Any]:
    """What a caller can learn of a failed call, from the error and the call."""
    call = rig.start(name, requests_for(name, 2, 2, ending), plain=plain)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        if name in (UNARY, CLIENT_STREAM):
            await call
        else:
            async for r in call:
                received.append(r.text)
    e = raised.value
    return {
        "type": type(e),
        "code": e.code(),
        "details": e.details(),
        "trailing": list(e.trailing_metadata()),
        "info": error_info(e),
        "received": received,
        "call.code": await call.code(),
        "call.details": await call.details(),
        "call.trailing": list(await call.trailing_metadata()),
        "call.done": call.done(),
        "call.cancelled": call.cancelled(),
    }


@pytest.mark.parametrize("ending", ["abort", "rich", "raise", "code"])
@pytest.mark.parametrize("name", METHODS)
async def test_errors_reach_the_caller_as_without_the_interceptors(
    rig: Rig, name: str, ending: str
) -> None:
    """AioRpcError with its code, details and trailing metadata (rich error
    details included), and the call's own accessors, are what a channel
    without interceptors gives."""
    with_metrics = await _outcome(rig, name, ending, plain=False)
    assert with_metrics == await _outcome(rig, name, ending, plain=True)
    if ending == "abort":
        assert (DETAIL_KEY, "abort") in with_metrics["trailing"]
    if ending == "rich":
        assert (with_metrics["info"].reason, with_metrics["info"].domain) == ("EBUSY", "probe")


async def test_reader_writer_api_is_counted(rig: Rig) -> None:
    """call.write / done_writing / read, as vfioclient reads its Session."""
    call = rig.method(BIDI_STREAM)()
    for _ in range(3):
        await call.write(request(2, "ok"))
    assert [await call.read() for _ in range(3)] == [request(2, "ok")] * 3
    await call.done_writing()
    assert [await call.read() for _ in range(2)] == [Msg("0"), Msg("1")]
    assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
    assert await call.code() == grpc.StatusCode.OK

    writer = rig.method(CLIENT_STREAM)()
    await writer.write(request())
    await writer.write(request())
    await writer.done_writing()
    assert await writer == Msg("done")

    s = await rig.settled()
    bidi, client = labels(BIDI_STREAM), labels(CLIENT_STREAM)
    assert s.sum("grpc_client_msg_sent_total", **bidi) == 3
    assert s.sum("grpc_client_msg_received_total", **bidi) == 5
    assert s.sum("grpc_server_msg_sent_total", **bidi) == 5
    assert s.sum("grpc_client_msg_sent_total", **client) == 2
    assert s.sum("grpc_server_msg_received_total", **client) == 2


async def test_unknown_methods_pass_through(rig: Rig) -> None:
    """The server has nothing to count (no handler); the client counts
    the call UNIMPLEMENTED, as go-grpc-prometheus's client does."""
    nothing = rig.channel.unary_unary("/metrics.test.v1.Probe/Nothing", None, None)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await nothing(b"")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    s = await rig.settled()
    assert s.label_sets("grpc_server_started_total") == []
    assert s.label_sets("grpc_client_handled_total") == [
        {**labels(UNARY), "grpc_method": "Nothing", "grpc_code": "UNIMPLEMENTED"}
    ]


async def test_handlers_that_are_not_coroutines_or_async_generators() -> None:
    """A coroutine streaming through context.write is counted without its
    messages; a sync handler (grpc's thread pool) is served untouched."""

    async def written(message: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        for _ in range(3):
            await context.write(message)

    def sync_unary(message: bytes, context: grpc.ServicerContext) -> bytes:
        return message

    registry = CollectorRegistry()
    server = grpc.aio.server(interceptors=[GrpcServerMetrics(registry).interceptor])
    handlers = {
        "Written": grpc.unary_stream_rpc_method_handler(written),
        "Sync": grpc.unary_unary_rpc_method_handler(sync_unary),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            written_call = channel.unary_stream("/t.T/Written", None, None)
            assert [m async for m in written_call(b"w")] == [b"w"] * 3
            assert await channel.unary_unary("/t.T/Sync", None, None)(b"s") == b"s"
    finally:
        await server.stop(None)
    value = registry.get_sample_value
    written_labels = {"grpc_type": "server_stream", "grpc_service": "t.T", "grpc_method": "Written"}
    assert value("grpc_server_handled_total", {**written_labels, "grpc_code": "OK"}) == 1
    assert value("grpc_server_msg_received_total", written_labels) == 1
    assert value("grpc_server_msg_sent_total", written_labels) == 0
    sync_labels = {"grpc_type": "unary", "grpc_service": "t.T", "grpc_method": "Sync"}
    assert value("grpc_server_started_total", sync_labels) is None


async def test_handling_seconds_off_leaves_the_histogram_out() -> None:
    registry = CollectorRegistry()
    server, port = await serve(registry, handling_seconds=False)
    client = GrpcClientMetrics(registry, handling_seconds=False)
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=client.interceptors()
        ) as channel:
            call = channel.unary_unary(f"/{SERVICE}/{UNARY}", Msg.to_wire, Msg.from_wire)
            assert await call(request()) == Msg("done")
    finally:
        await server.stop(None)
    names = {m.name for m in registry.collect()}
    assert not {n for n in names if "seconds" in n}
    assert {"grpc_server_handled", "grpc_client_handled"} <= names


async def test_each_registry_counts_its_own_server(rig: Rig) -> None:
    """Several servers in one process, each with its registry."""
    other_registry = CollectorRegistry()
    other, port = await serve(other_registry)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/{UNARY}", Msg.to_wire, Msg.from_wire)
            for _ in range(2):
                await call(request())
        await rig.run(UNARY, [request()])
    finally:
        await other.stop(None)
    key = {**labels(UNARY), "grpc_code": "OK"}
    assert other_registry.get_sample_value("grpc_server_handled_total", key) == 2
    assert (await rig.settled()).sum("grpc_server_handled_total", **key) == 1


async def test_the_endpoint_serves_the_registry_at_metrics(rig: Rig) -> None:
    await rig.run(UNARY, [request()])
    await rig.settled()
    assert rig.endpoint.port > 0
    body = await rig.scrape("/metrics")
    assert "# TYPE grpc_server_handled_total counter" in body
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="Unary"' in body


async def test_endpoint_listen_errors_are_clear(rig: Rig) -> None:
    registry = CollectorRegistry()
    with pytest.raises(ListenError, match=r"(?i)address already in use"):
        start_metrics_http(f"127.0.0.1:{rig.endpoint.port}", registry)
    with pytest.raises(ListenError, match="not HOST:PORT"):
        start_metrics_http("127.0.0.1", registry)
    with pytest.raises(ListenError, match="not HOST:PORT"):
        start_metrics_http("127.0.0.1:99999", registry)
    with pytest.raises(ListenError, match=r"cannot serve metrics on no-such-host\.invalid:0"):
        start_metrics_http("no-such-host.invalid:0", registry)


async def test_a_stopped_endpoint_no_longer_answers() -> None:
    endpoint = start_metrics_http("127.0.0.1:0", CollectorRegistry())
    port = endpoint.port
    await asyncio.to_thread(endpoint.stop)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/metrics", None, 2)
    with socket.create_server(("127.0.0.1", port)):  # the port is free again
        pass


async def test_promtool_accepts_the_exposition(rig: Rig) -> None:
    for name in METHODS:
        for ending in ENDING_CODE:
            await rig.run(name, requests_for(name, 2, 2, ending))
    await rig.run(UNARY, [request()], service=REGISTERED)
    check_metrics((await rig.settled()).exposition)


class _SlowCall:
    """A call object whose code() waits, unlike grpc.aio's finished calls."""

    async def code(self) -> grpc.StatusCode:
        await asyncio.sleep(0)
        return grpc.StatusCode.ABORTED


async def test_a_call_whose_code_waits_is_still_counted() -> None:
    counted: list[grpc.StatusCode] = []
    _when_finished(_SlowCall(), counted.append)  # type: ignore[arg-type]
    assert counted == []
    for _ in range(3):
        await asyncio.sleep(0)
    assert counted == [grpc.StatusCode.ABORTED]


def test_promtool_findings_fail_the_test() -> None:
    with pytest.raises(pytest.fail.Exception, match="_total"):
        check_metrics("# HELP foo A counter.\n# TYPE foo counter\nfoo 1\n")


def test_without_promtool_ci_fails_and_a_local_run_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, **kw: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        check_metrics("")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run"):
        check_metrics("")
