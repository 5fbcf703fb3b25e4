"""--log-format json: one JSON object per line, with the identifiers of what
the line is about (device, stream, errno; vhca_id and opcode for the firmware)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from driver.vfio.uapi import MigState
from fwemu.link.grpc import GrpcLink
from grpcsvc import spawn
from grpcsvc.spawn import DRIVER, FWEMU
from tests.support import tls_mode
from vfioclient import VfioClient, VfioClientError

pytestmark = pytest.mark.grpc

JSON_LOGS = ("--listen", "127.0.0.1:0", "--loop", "asyncio", "--log-format", "json")


def start(command: list[str], *args: str) -> tuple[subprocess.Popen[str], str]:
    """In the run's mode (tests/support/tls_mode.py)."""
    tls = tls_mode.server_args()
    proc, target = spawn.start([*command, *JSON_LOGS, "--log-level", "info", *args, *tls])
    return proc, tls_mode.serving(target)


def stop(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """The service's log lines, each of which must be JSON."""
    _, err = spawn.stop(proc)
    docs = [json.loads(ln) for ln in err.splitlines() if ln.strip()]
    for d in docs:
        assert {"time", "level", "logger", "message"} <= d.keys()
    return docs


async def test_driver_logs_state_changes_and_errors_with_identifiers() -> None:
    proc, target = start(DRIVER, "--vfs", "1", "--size", "64KiB", "--dirty-rate", "0")
    try:
        async with await VfioClient.connect(target) as c:
            (dev,) = await c.list_devices()
            fd = await c.open_device(dev.name)
            await c.set_state(fd, MigState.STOP)
            data_fd = await c.set_state(fd, MigState.STOP_COPY)
            assert data_fd is not None
            with pytest.raises(VfioClientError):
                await c.device_feature(fd, 0xFFFF, b"")  # no such feature
            await c.set_state(fd, MigState.STOP)
    finally:
        docs = stop(proc)
    states = [(d["from_state"], d["to_state"]) for d in docs if "from_state" in d]
    assert states == [  # one line per arc of the FSM
        ("RUNNING", "RUNNING_P2P"),
        ("RUNNING_P2P", "STOP"),
        ("STOP", "STOP_COPY"),
        ("STOP_COPY", "STOP"),
    ]
    assert all(d["device"] == dev.name for d in docs if "from_state" in d)
    copy = next(d for d in docs if d.get("to_state") == "STOP_COPY")
    assert copy["stream"] is not None  # the saving stream the arc opened
    (err,) = [d for d in docs if "errno" in d]
    assert err["device"] == dev.name and err["operation"] and err["errno"].startswith("E")
    assert err["client"]


async def test_firmware_logs_failed_commands_and_suspends() -> None:
    proc, target = start(FWEMU, "--vfs", "1", "--size", "64KiB", "--dirty-rate", "0")
    try:
        link = await GrpcLink.connect(target, tls=tls_mode.client_tls(target))  # the admin
        try:
            await link.resume_vhca(1, op_mod=0)  # not suspended: BAD_RES_STATE_ERR
            await link.suspend_vhca(1, op_mod=0)
        finally:
            await link.close()
    finally:
        docs = stop(proc)
    failed = [d for d in docs if d.get("status") == "BAD_RES_STATE_ERR"]
    assert failed and failed[0]["vhca_id"] == 1 and failed[0]["opcode"] == "RESUME_VHCA"
    assert any(d.get("opcode") == "SUSPEND_VHCA" and d["initiator_suspended"] for d in docs)
