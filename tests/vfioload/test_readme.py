"""README, "Load tests": its commands run as written, but for the port (a
free one instead of 50052) and the duration (5 s instead of 30 s): the
driver, a single-process run, then a master with two workers.  Each run
exits 0 (no failure) and writes its CSV."""

from __future__ import annotations

import csv
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import tls_mode

pytestmark = pytest.mark.grpc

ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 90


def commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Load tests (vfio-loadtest)", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    .venv/bin/")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def argv(line: str, port: int) -> tuple[list[str], bool]:
    background = line.endswith(" &")
    line = line.removesuffix(" &").replace("127.0.0.1:50052", f"127.0.0.1:{port}")
    words = [ROOT / w if w.startswith(".venv/") else w for w in shlex.split(line)]
    return [str(w).replace("30s", "5s") for w in words], background


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["Type"]]


@pytest.mark.skipif(tls_mode.enabled(), reason="the README's commands are plaintext, on loopback")
def test_the_readme_load_test_commands_run(tmp_path: Path) -> None:
    lines = commands()
    assert len(lines) == 5 and lines[0].startswith(".venv/bin/vfio-driver serve"), lines
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VFIO_TLS_")}
    started: list[subprocess.Popen[bytes]] = []
    try:
        driver, _ = argv(lines[0], port)
        with (tmp_path / "driver.log").open("wb") as log:  # a pipe left unread would block it
            started.append(subprocess.Popen(driver, cwd=tmp_path, env=env, stderr=log))
        deadline = time.monotonic() + 30
        while True:  # serving once the port answers
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the README's driver did not start"
            time.sleep(0.1)
        single, _ = argv(lines[1], port)
        subprocess.run(single, cwd=tmp_path, env=env, check=True, timeout=BOUND_S)
        assert {r["Type"] for r in rows(tmp_path / "run_stats.csv")} == {"reinit-loop", "faults"}
        (tmp_path / "run_stats.csv").unlink()
        waited: list[subprocess.Popen[bytes]] = []
        for line in lines[2:]:
            cmd, background = argv(line, port)
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env)
            (started if background else waited).append(proc)
        assert all(p.wait(timeout=BOUND_S) == 0 for p in waited)
        master = started[1]
        assert master.wait(timeout=BOUND_S) == 0
        kinds = {r["Type"] for r in rows(tmp_path / "run_stats.csv")}
        assert kinds == {"reinit-loop", "migration", "precopy-hammer", "faults"}
    finally:
        for p in reversed(started):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
