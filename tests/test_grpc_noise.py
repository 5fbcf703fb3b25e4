"""The test process drops only the stale gRPC poller's callback errors from
asyncio's log (tests/support/grpc_noise.py): every other exception a loop
reports still reaches the test's stderr."""

from __future__ import annotations

import asyncio
import logging

import pytest
import uvloop


def _report(loop: asyncio.AbstractEventLoop, callback: str) -> None:
    try:
        raise BlockingIOError(11, "Resource temporarily unavailable")
    except BlockingIOError as e:
        loop.call_exception_handler(
            {"message": f"Exception in callback {callback}", "exception": e}
        )


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_only_the_grpc_poller_callbacks_errors_are_dropped(
    new_loop: object, caplog: pytest.LogCaptureFixture
) -> None:
    loop = new_loop()  # type: ignore[operator]
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            _report(loop, "PollerCompletionQueue._handle_events(<uvloop.Loop running=True>)")
            _report(loop, "Server._serve(<uvloop.Loop running=True>)")
    finally:
        loop.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert messages == ["Exception in callback Server._serve(<uvloop.Loop running=True>)"]
