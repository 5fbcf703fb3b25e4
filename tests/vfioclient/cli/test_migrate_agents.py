"""vfioctl's two agents as processes (issue 16): `migrate --incoming LISTEN
[DST]` beside one `vfio-driver serve` and `migrate SRC DST --to URI` beside
another; the one-shot and the standing agent, the DST mismatch, a source
gone mid-stream, the listen policy, and the README's "Across hosts" example.
In the mTLS pass the agent presents the PKI's server certificate
(--incoming-tls-cert) and requires the admin's, which every vfioctl here
presents from VFIO_TLS_*."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from driver.shards import pci_name
from tests.support import tls_mode
from tests.support.tls import ADMIN
from tests.support.vfioctl_driver import Driver
from vfioclient.migration import Address, wire
from vfioclient.migration.connection import dial

pytestmark = pytest.mark.grpc

ROOT = Path(__file__).resolve().parents[3]
VFIOCTL = [sys.executable, "-m", "vfioclient.cli"]
BOUND = 60


@pytest.fixture(name="drivers")
def drivers_fixture() -> Iterator[tuple[Driver, Driver]]:
    a = Driver.start(vfs=2)
    try:
        b = Driver.start(vfs=2)
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def tls_args() -> list[str]:
    if not tls_mode.enabled():
        return []
    pki = tls_mode.session_pki()
    return ["--incoming-tls-cert", str(pki.server.cert), "--incoming-tls-key", str(pki.server.key)]


class Agent:
    """`vfioctl --driver D migrate --incoming tcp:127.0.0.1:0 [DST]`."""

    def __init__(
        self, driver: Driver, *more: str, json_out: bool = False, timeout: float = 300
    ) -> None:
        argv = [*VFIOCTL, "--driver", driver.target, *(["--json"] if json_out else [])]
        argv += [
            "--timeout",
            str(timeout),
            "migrate",
            "--incoming",
            "tcp:127.0.0.1:0",
            *more,
            *tls_args(),
        ]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if json_out:
            self.uri = json.loads(line)["listening"]
        else:
            assert "serving incoming migrations" in line, line + self.proc.stderr.read()  # type: ignore[union-attr]
            self.uri = line.rsplit(" on ", 1)[1].strip()

    def finish(self, *, term: bool = False) -> tuple[int, str, str]:
        if term:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=BOUND)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def source(
    driver: Driver, src: str, dst: str, uri: str, *more: str
) -> subprocess.CompletedProcess[str]:
    argv = [*VFIOCTL, "--driver", driver.target, "--json", "migrate", src, dst, "--to", uri, *more]
    return subprocess.run(argv, capture_output=True, text=True, timeout=BOUND)


def test_one_shot_agent_migrates_verified_and_exits_0(drivers: tuple[Driver, Driver]) -> None:
    a, b = drivers
    agent = Agent(b, pci_name(1))
    try:
        s = source(a, pci_name(1), pci_name(1), agent.uri)
        assert s.returncode == 0, s.stderr
        doc = json.loads(s.stdout)
        assert doc["status"] == "completed" and doc["verified"], doc
        assert doc["channel"] == agent.uri
        (dev,) = doc["devices"]
        assert dev["data_path"] == "shm (source), shm (destination)"
        assert dev["source_digest"] == dev["destination_digest"]
        rc, out, err = agent.finish()
        assert rc == 0, err
        assert "completed" in out and dev["destination_digest"] in out
    finally:
        agent.kill()
    assert a.digests(1) == b.digests(1)


def test_standing_agent_serves_one_after_another_until_sigterm(
    drivers: tuple[Driver, Driver],
) -> None:
    a, b = drivers
    agent = Agent(b, json_out=True)
    try:
        for n in (1, 2):
            s = source(a, pci_name(n), pci_name(n), agent.uri)
            assert s.returncode == 0, s.stderr
        rc, out, err = agent.finish(term=True)
        assert rc == 0, err
        reports = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert [(r["status"], r["devices"][0]["name"]) for r in reports] == [
            ("completed", pci_name(1)),
            ("completed", pci_name(2)),
        ]
    finally:
        agent.kill()
    assert a.digests(1, 2) == b.digests(1, 2)


def test_a_destination_other_than_the_agents_is_refused(drivers: tuple[Driver, Driver]) -> None:
    a, b = drivers
    agent = Agent(b, pci_name(1))
    try:
        s = source(a, pci_name(1), pci_name(2), agent.uri)
        assert s.returncode == 1
        assert f"accepts a migration into {pci_name(1)} only, not into {pci_name(2)}" in s.stderr
        assert "EINVAL" in s.stderr
        # still waiting for its own migration, which then goes through
        s = source(a, pci_name(1), pci_name(1), agent.uri)
        assert s.returncode == 0, s.stderr
        rc, _, err = agent.finish()
        assert rc == 0, err
    finally:
        agent.kill()


def test_a_one_shot_agent_whose_source_dies_mid_stream_exits_1(
    drivers: tuple[Driver, Driver],
) -> None:
    _, b = drivers
    agent = Agent(b, pci_name(1))

    async def half_a_migration() -> None:
        tls = tls_mode.session_pki().client_tls(ADMIN) if tls_mode.enabled() else None
        conn = await dial(Address.parse(agent.uri), tls, idle_timeout_s=10, connect_timeout_s=5)
        await conn.send(wire.header([wire.DeviceSpec(0, "gone", pci_name(1), 1 << 20)]))
        await conn.send(wire.setup_state(0), wire.data_header(0, 1 << 20), b"\0" * 4096)
        conn.abort()  # the source process dies

    try:
        asyncio.run(half_a_migration())
        rc, out, err = agent.finish()
        assert rc == 1
        assert "closed the connection mid-migration" in err and "ECONNRESET" in err
        assert "failed" in out
    finally:
        agent.kill()
    assert b.digests(1) == b.digests(1)  # the destination VF still answers: it was reset


def test_listening_off_host_without_tls_is_refused(drivers: tuple[Driver, Driver]) -> None:
    _, b = drivers
    env = {k: v for k, v in os.environ.items() if not k.startswith("VFIO_TLS_")}
    argv = [*VFIOCTL, "--driver", b.target, "migrate", "--incoming", "tcp:0.0.0.0:0", pci_name(1)]
    if tls_mode.enabled():
        pytest.skip("the driver requires a client certificate: this is the plaintext case")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=BOUND, env=env)
    assert p.returncode == 1
    assert "refusing to listen on 0.0.0.0:0 without TLS" in p.stderr and "--insecure" in p.stderr


def test_usage_errors_exit_2(drivers: tuple[Driver, Driver]) -> None:
    a, _ = drivers
    absurd_timeouts = [
        ["migrate", "--incoming", "tcp:127.0.0.1:0", "--idle-timeout", t]
        for t in ("nan", "-1", "0", "inf", "1e999")
    ]
    for argv in (
        ["migrate", "--incoming", "tcp:127.0.0.1:0", "X", "Y"],
        ["migrate", "X"],
        *absurd_timeouts,
    ):
        p = subprocess.run(
            [*VFIOCTL, "--driver", a.target, *argv], capture_output=True, text=True, timeout=BOUND
        )
        assert p.returncode == 2, p.stderr


# --- the README's example ------------------------------------------------------------------


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Across hosts", 1)[1].split("\n#", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    vfio")]


@pytest.mark.skipif(tls_mode.enabled(), reason="the README's commands are plaintext, on loopback")
def test_the_readme_across_hosts_example_runs(tmp_path: Path) -> None:
    """The README's commands as written, on free ports: two drivers, the
    destination agent, the source agent; both agents exit 0."""
    lines = readme_commands()
    assert [line.split()[0] for line in lines] == [
        "vfio-driver",
        "vfio-driver",
        "vfioctl",
        "vfioctl",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VFIO_TLS_")}
    bin_dir = Path(sys.executable).parent
    ports: dict[str, str] = {}
    procs: list[subprocess.Popen[str]] = []

    def argv(line: str) -> list[str]:
        for old, new in ports.items():
            line = line.replace(old, new)
        words = shlex.split(line.removesuffix(" &"))
        return [str(bin_dir / words[0]), *words[1:]]

    try:
        for line in lines[:2]:  # the drivers: on port 0, learn where they are
            port = re.search(r"127\.0\.0\.1:(\d+)", line)
            assert port is not None
            words = argv(line.replace(port.group(0), "127.0.0.1:0"))
            p = subprocess.Popen(
                words, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
            )
            procs.append(p)
            assert p.stdout is not None
            ports[port.group(0)] = p.stdout.readline().rsplit(" on ", 1)[1].strip()
        listen = re.search(r"tcp:127\.0\.0\.1:(\d+)", lines[2])
        assert listen is not None
        agent_line = lines[2].replace(listen.group(0), "tcp:127.0.0.1:0")
        agent = subprocess.Popen(
            argv(agent_line), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        procs.append(agent)
        assert agent.stdout is not None
        ports[listen.group(0)] = agent.stdout.readline().rsplit(" on ", 1)[1].strip()
        s = subprocess.run(argv(lines[3]), capture_output=True, text=True, timeout=BOUND, env=env)
        assert s.returncode == 0, s.stderr
        assert "migration completed" in s.stdout and "digests equal" in s.stdout
        out, err = agent.communicate(timeout=BOUND)
        assert agent.returncode == 0, err
        assert "completed" in out
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.communicate(timeout=BOUND)


def test_a_standing_agent_asks_each_devices_shard_for_its_digest(
    drivers: tuple[Driver, Driver],
) -> None:
    """Without a DST and --firmware, the standing agent (as in a driver pod)
    asks each destination's shard, by its PCI domain, for the digest: a
    shard map naming driver b verifies; one naming a dead port fails the
    migration (ENOTSUP) instead of quietly asking --driver."""
    a, b = drivers
    good = Agent(b, "--firmware-shards", b.target, json_out=True)
    try:
        s = source(a, pci_name(1), pci_name(1), good.uri, "--verify", "yes")
        assert s.returncode == 0, s.stderr
        (dev,) = json.loads(s.stdout)["devices"]
        assert dev["destination_digest"] and dev["destination_digest"] == dev["source_digest"]
    finally:
        good.finish(term=True)
        good.kill()
    bad = Agent(b, "--firmware-shards", "127.0.0.1:1", json_out=True)
    try:
        s = source(a, pci_name(2), pci_name(2), bad.uri, "--verify", "yes")
        assert s.returncode != 0
        assert "127.0.0.1:1" in s.stdout + s.stderr
    finally:
        bad.finish(term=True)
        bad.kill()


def test_an_agent_outlives_the_global_timeout(drivers: tuple[Driver, Driver]) -> None:
    """--timeout bounds a command's calls, not an agent's life: it serves a
    migration that comes after its --timeout has passed."""
    a, b = drivers
    agent = Agent(b, json_out=True, timeout=2)
    try:
        time.sleep(3)
        assert agent.proc.poll() is None, agent.proc.communicate()
        s = source(a, pci_name(1), pci_name(1), agent.uri)
        assert s.returncode == 0, s.stderr
    finally:
        rc, _, err = agent.finish(term=True)
        agent.kill()
    assert rc == 0, err


def test_an_absurd_listen_address_is_refused_clearly(drivers: tuple[Driver, Driver]) -> None:
    _, b = drivers
    for listen in ("tcp:127.0.0.1:99999", "tcp:127.0.0.1:-1", "ftp:x", "tcp::", "unix:"):
        p = subprocess.run(
            [*VFIOCTL, "--driver", b.target, "migrate", "--incoming", listen, *tls_args()],
            capture_output=True,
            text=True,
            timeout=BOUND,
        )
        assert p.returncode != 0, (listen, p.stdout)
        assert "Traceback" not in p.stderr and "vfioctl: error:" in p.stderr, (listen, p.stderr)
