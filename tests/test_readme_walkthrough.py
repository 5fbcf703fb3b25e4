"""A fresh clone's walk through the README's commands (issue 18): the
`vfioctl`, `fwemu` and `vfio-driver` lines of its code blocks, run as
written but for the addresses (every service on a free port of 127.0.0.1,
the README's addresses mapped to those) and the files (in a temporary
directory, with `examples/` linked into it), and what the text around each
promises checked in what they print.

Every code block of the README is either walked here (COVERED: what is run
and checked) or left to another test or to CI (EXCLUDED: why); a block that
is neither fails `test_every_readme_block_is_walked_or_excluded`, so a new
example cannot go untested unnoticed.  Synopsis lines (`list | show DEV |
...`, `[--json]`) are run in each form they name, with devices and files
chosen here."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from driver.shards import pci_name
from fwemu.scenario import parse_scenario
from tests.support import tls_mode
from tests.vfioclient.cli.test_events_audit import Follower

pytestmark = pytest.mark.grpc

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the .venv/bin of this run
PROGRAMS = ("vfioctl", "fwemu", "vfio-driver")
BOUND = 60
MiB = 1 << 20


@dataclass(frozen=True)
class Block:
    """A code block of the README: where it starts, its section, its lines
    (indentation removed; a command continued with a backslash is one line)."""

    line: int
    section: str
    lines: tuple[str, ...]

    @property
    def first(self) -> str:
        return self.lines[0]


def readme_blocks() -> list[Block]:
    """Every code block: indented ones (after a blank line) and fenced ones."""
    found: list[Block] = []
    section = ""
    current: list[str] = []
    start = 0
    fence: list[str] | None = None
    previous_blank = True

    def close() -> None:
        if current:
            width = min(len(x) - len(x.lstrip()) for x in current if x.strip())
            joined: list[str] = []
            for raw in current:
                text = raw[width:].rstrip()
                if joined and joined[-1].endswith("\\"):
                    joined[-1] = joined[-1][:-1].rstrip() + " " + text.strip()
                elif text:
                    joined.append(text)
            found.append(Block(start, section, tuple(joined)))
            current.clear()

    for number, raw in enumerate((ROOT / "README.md").read_text().splitlines(), start=1):
        if fence is not None:
            if raw.startswith("```"):
                found.append(Block(start, section, tuple(fence)))
                fence = None
            else:
                fence.append(raw)
            continue
        if raw.startswith("```"):
            close()
            fence, start = [], number
            continue
        if raw.startswith("#"):
            section = raw
        if raw.startswith("    ") and (current or previous_blank):
            if not current:
                start = number
            current.append(raw)
        elif current and not raw.strip():
            current.append(raw)
        else:
            close()
        previous_blank = not raw.strip()
    close()
    return found


# Each README block, by the start of its first line: what the walk runs and checks.
COVERED = {
    ".venv/bin/fwemu serve --listen 127.0.0.1:50051 --vfs 8": (
        "both fwemu serve lines (8 VFs of 16 MiB; examples/reinit.yaml's VFs), and `fwemu "
        "demo` against the first (equal digests)"
    ),
    ".venv/bin/fwemu serve --listen 0.0.0.0:50051 --tls-cert fw.pem": (
        "with a `vfioctl certs` PKI: the admin and the driver principal list every VF, "
        "another principal none, a plaintext client is refused"
    ),
    ".venv/bin/vfio-driver serve --listen 127.0.0.1:50052 --firmware": (
        "the driver over examples/reinit.yaml's fwemu (the vfioctl lines run against it), "
        "and the embedded one (2 devices)"
    ),
    ".venv/bin/vfioctl demo [": (
        "demo (embedded, --json: its REINIT seen, equal digests) and demo --driver "
        "--scenario against the driver over fwemu; list, show, save, load (no audit "
        "finding); migrate (completes; not verifying: that driver serves no Scenario); "
        "every scenario action named"
    ),
    ".venv/bin/vfioctl --driver 127.0.0.1:50052 migrate 0000:81:00.2": (
        "each migration's report lists the REINIT at setup and equal digests; the second "
        "as often as `vfioctl events` shows the driver answering REINIT"
    ),
    "vfioctl certs DIR": "certs DIR with --server-host, --client and --days, then --keep-ca",
    "vfioctl certs pki$": (
        "the PKI, fwemu and the driver with mutual TLS (0.0.0.0 as 127.0.0.1), and vfioctl "
        "list over it"
    ),
    "vfioctl --driver HOST:PORT [--json] [--timeout S] exam": "run as the example below",
    "vfio-driver serve --scenario-service --vfs 0 &": (
        "the exam of `vfioctl migrate`: every trap passed"
    ),
    ".venv/bin/fwemu serve --vfs 8 --metrics-listen": (
        "both services with --metrics-listen (and --listen on a free port, the README's "
        "default addresses mapped): their /metrics name the families of the table"
    ),
    ".venv/bin/vfioctl --driver 127.0.0.1:50052 events": (
        "events --device --json during a migration; audit --json at the end: no findings"
    ),
    "seed: 42": "parsed by fwemu's scenario loader; its after_saved_bytes under its VFs' size",
}

# Each README block walked elsewhere or not here, and why.
EXCLUDED = {
    "python3.11 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/vfioctl": (
        "set-up, which CI runs; `vfioctl demo` itself is walked with the vfioctl lines"
    ),
    "python3.11 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/ruff": (
        "the test suite's own set-up, which CI runs"
    ),
    "from gevent import monkey": "Python, not a command: tests/vfioclient/test_sync_gevent.py",
    "vfio-driver serve --listen 127.0.0.1:50061": (
        "tests/vfioclient/cli/test_migrate_agents.py::test_the_readme_across_hosts_example_runs"
    ),
    ".venv/bin/vfio-driver serve --scenario-service --vfs 2 &": (
        "tests/examples/ (Node.js and grpcurl) run these lines"
    ),
    ".venv/bin/vfio-driver serve --listen 127.0.0.1:50052 --vfs 0 --scenario-service &": (
        "tests/vfioload/test_readme.py runs these lines"
    ),
    "docker build -f deploy/Dockerfile -t vfio-mlx5-emu:0.1.0": (
        "needs a Docker engine and a kind cluster; tests/deploy/k8s checks the manifests"
    ),
    "kubectl -n vfio get pods": "needs a cluster; tests/deploy/k8s checks the manifests",
    "vfioctl certs pki --server-host '*.fwemu.vfio.svc.cluster.local'": (
        "needs a cluster (kubectl); tests/deploy/k8s checks the Secrets' names"
    ),
    "kubectl apply -k deploy/k8s/overlays/small-loadtest": "needs a cluster; tests/deploy/k8s",
    "kubectl -n vfio port-forward svc/vfio-driver 50052 &": "needs a cluster; tests/deploy/k8s",
    "docker build -f deploy/Dockerfile -t vfio-mlx5-emu .": (
        "needs a Docker engine; tests/deploy/test_dockerfile.py replays the build"
    ),
    "docker build -f deploy/Dockerfile --build-arg": (
        "needs a Docker engine; tests/deploy/test_dockerfile.py replays it with a load run"
    ),
    "docker run --rm -p 50051:50051": (
        "needs a Docker engine; tests/deploy/test_dockerfile.py runs the image's commands"
    ),
    "docker compose -f deploy/compose.yaml up": (
        "needs a Docker engine; tests/deploy/test_compose.py replays the services"
    ),
    "podman system service": (
        "needs podman and docker-compose; deploy/smoke.sh runs the stack with them"
    ),
    "docker compose -f deploy/compose.yaml --profile cross-host": (
        "needs a Docker engine; tests/deploy/test_compose_cross_host.py replays the profile"
    ),
    "docker compose -f deploy/compose.yaml cp": (
        "needs the compose stack's certs volume; tests/deploy/test_compose.py"
    ),
    ".venv/bin/python benchmarks/fwemu_bench.py": (
        "benchmarks, minutes long: tests/test_readme_benchmarks.py checks their options"
    ),
}


def starts(block: Block, key: str) -> bool:
    """Whether `key` names the block: the start of its first line, or (ending
    with $) all of it."""
    return block.first == key[:-1] if key.endswith("$") else block.first.startswith(key)


def matching(block: Block) -> list[str]:
    return [key for key in (*COVERED, *EXCLUDED) if starts(block, key)]


def find(key: str) -> Block:
    (block,) = [b for b in readme_blocks() if starts(b, key)]
    return block


def test_every_readme_block_is_walked_or_excluded() -> None:
    blocks = readme_blocks()
    assert len(blocks) > 20, "the README's code blocks were not found"
    unsorted = [f"line {b.line}: {b.first}" for b in blocks if not matching(b)]
    assert not unsorted, f"README blocks neither walked nor excluded (add them): {unsorted}"
    ambiguous = [f"line {b.line}: {matching(b)}" for b in blocks if len(matching(b)) > 1]
    assert not ambiguous, ambiguous
    stale = [k for k in (*COVERED, *EXCLUDED) if not any(starts(b, k) for b in blocks)]
    assert not stale, f"no README block starts so any more: {stale}"
    assert not set(COVERED) & set(EXCLUDED)


# --- the walk ------------------------------------------------------------------------------


@dataclass
class Service:
    proc: subprocess.Popen[str]
    log: Path
    target: str  # 127.0.0.1:PORT


class Walk:
    """Runs README lines in `tmp`: the programs from this run's .venv/bin,
    the README's addresses replaced by the ones the services got."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        (tmp / "examples").symlink_to(ROOT / "examples")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("VFIO_TLS_")}
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.addresses: dict[str, str] = {}
        self.services: list[Service] = []

    def argv(self, line: str) -> list[str]:
        for old in sorted(self.addresses, key=len, reverse=True):
            line = line.replace(old, self.addresses[old])
        words = shlex.split(line.removesuffix(" &"), comments=True)
        name = words[0].removeprefix(".venv/bin/")
        assert name in PROGRAMS, line
        return [str(BIN / name), *words[1:]]

    def serve(self, line: str, listen: str, *, add_listen: bool = False, also: str = "") -> Service:
        """Start the service of `line` on a free port instead of `listen`
        (or, `add_listen`, with --listen on one: the line has none, `listen`
        is its default); from then on `listen` (and `also`, another name of
        the same HOST:PORT) means it."""
        if add_listen:
            line = line.removesuffix(" &") + " --listen 127.0.0.1:0"
        else:
            assert listen in line, (listen, line)
            line = line.replace(listen, "127.0.0.1:0")
        log = self.tmp / f"service{len(self.services)}.log"
        with log.open("w") as err:
            proc = subprocess.Popen(
                self.argv(line), cwd=self.tmp, env=self.env, stdout=subprocess.PIPE,
                stderr=err, text=True,
            )  # fmt: skip
        service = Service(proc, log, "")
        self.services.append(service)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "serving" in first, (line, first, log.read_text())
        service.target = first.rsplit(" on ", 1)[1].strip()
        port = service.target.rsplit(":", 1)[1]
        for name in (listen, also):
            if name:
                self.addresses[name] = f"{name.rsplit(':', 1)[0]}:{port}"
        return service

    def stop(self, service: Service) -> None:
        """SIGTERM, as an operator stops it: it exits 0."""
        service.proc.terminate()
        assert service.proc.wait(BOUND) == 0, service.log.read_text()

    def run(self, line: str, *, ok: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            self.argv(line), cwd=self.tmp, env=self.env, capture_output=True, text=True,
            timeout=BOUND,
        )  # fmt: skip
        if ok:
            assert p.returncode == 0, (line, p.stdout, p.stderr)
        return p

    def doc(self, line: str) -> Any:
        return json.loads(self.run(line).stdout)

    def close(self) -> None:
        for service in self.services:
            if service.proc.poll() is None:
                service.proc.terminate()
                try:
                    service.proc.wait(15)
                except subprocess.TimeoutExpired:
                    service.proc.kill()
                    service.proc.wait()
            if service.proc.stdout is not None:
                service.proc.stdout.close()


@pytest.fixture(name="walk")
def walk_fixture(tmp_path: Path) -> Iterator[Walk]:
    w = Walk(tmp_path)
    try:
        yield w
    finally:
        w.close()


def synopsis(line: str, prefix: str) -> list[str]:
    """The forms a synopsis line names after `prefix`: `a | b X | c`."""
    assert line.startswith(prefix), (prefix, line)
    return [form.strip() for form in line[len(prefix) :].split("|")]


skip_in_tls = pytest.mark.skipif(
    tls_mode.enabled(), reason="the README's commands are plaintext unless they say otherwise"
)


@skip_in_tls
@pytest.mark.timeout(180)
def test_the_firmware_the_driver_and_vfioctl_as_the_readme_runs_them(walk: Walk) -> None:
    # "The firmware service": 8 VFs of 16 MiB, the firmware-level demo against it.
    fw_lines = find(".venv/bin/fwemu serve --listen 127.0.0.1:50051 --vfs 8").lines
    assert [x.split()[1] for x in fw_lines] == ["serve", "serve", "demo"], fw_lines
    first = walk.serve(fw_lines[0], "127.0.0.1:50051")
    vfs = walk.doc(f"vfioctl --json scenario --firmware {first.target} vfs")
    assert [v["config"]["size"] for v in vfs["vfs"]] == [16 * MiB] * 8, vfs
    demo = walk.run(fw_lines[2])
    assert "digests equal" in demo.stdout, demo.stdout
    walk.stop(first)
    # The same port, examples/reinit.yaml: the driver over it serves its 8 VFs.
    walk.serve(fw_lines[1], "127.0.0.1:50051")
    drv_lines = find(".venv/bin/vfio-driver serve --listen 127.0.0.1:50052 --firmware").lines
    assert len(drv_lines) == 2, drv_lines
    embedded = walk.serve(drv_lines[1], "127.0.0.1:50052")
    listed = walk.doc(f"vfioctl --driver {embedded.target} --json list")
    assert [d["migratable"] for d in listed["devices"]] == [True, True], listed
    walk.stop(embedded)
    walk.serve(drv_lines[0], "127.0.0.1:50052")

    # "vfioctl and the client library": the synopsis lines, each form.
    demo_line, data_line, migrate_line, scenario_line = find(".venv/bin/vfioctl demo [").lines
    assert demo_line.startswith(".venv/bin/vfioctl demo [--driver HOST:PORT --scenario HOST:PORT]")
    result = walk.doc(".venv/bin/vfioctl demo --json")
    assert result["reinit_seen"] and result["equal"], result["notes"]
    text = walk.run(
        ".venv/bin/vfioctl demo --driver 127.0.0.1:50052 --scenario 127.0.0.1:50051"
    ).stdout
    assert "the demo reconfigured 0000:81:00.1" in text and "REINIT" in text, text
    assert "verified   digests equal" in text

    prefix = ".venv/bin/vfioctl --driver 127.0.0.1:50052 "
    assert synopsis(data_line, prefix) == ["list", "show DEV", "save DEV FILE", "load DEV FILE"]
    devices = walk.doc(prefix + "--json list")["devices"]
    assert [d["name"] for d in devices] == [pci_name(n) for n in range(1, 9)]
    assert walk.doc(prefix + "--json show 0000:81:00.4")["state"] == "RUNNING"
    saved = walk.doc(prefix + "--json save 0000:81:00.4 vf4.img")
    loaded = walk.doc(prefix + f"--json load {pci_name(8)} vf4.img")
    assert loaded["bytes"] == saved["bytes"] == (walk.tmp / "vf4.img").stat().st_size > 16 * MiB

    assert migrate_line.startswith(prefix + "migrate SRC DST [--dst-driver HOST:PORT] [--json]")
    plain = walk.run(
        prefix + "--json migrate 0000:81:00.4 0000:81:00.3 --dst-driver 127.0.0.1:50052"
    )
    report = json.loads(plain.stdout)
    assert report["status"] == "completed" and not report["verified"]
    assert "not verifying" in plain.stderr  # the driver serves no Scenario service

    actions = synopsis(scenario_line.removesuffix(" ..."), prefix + "scenario ")
    assert actions == ["reconfigure", "configure", "reset", "fault", "digest", "vfs"], actions
    fw = "scenario --firmware 127.0.0.1:50051 "
    assert len(walk.doc(prefix + "--json " + fw + "vfs")["vfs"]) == 8
    walk.run(prefix + fw + "configure 5 --dirty-rate 1MiB --reconfig-rate 0")
    walk.run(prefix + fw + "reset 5")
    walk.run(prefix + fw + "fault 5 delay --delay 0.01")
    digests = walk.doc(prefix + "--json " + fw + "digest 1 2")
    assert len(digests["digests"]) == 2, digests
    # reconfigure: the README's own example below.

    # The REINIT examples: VF 2 of examples/reinit.yaml, then VF 6 armed by hand
    # (as written: its report, and `vfioctl events` following it, README
    # "Events and audit", show as many REINITs).
    armed = find(".venv/bin/vfioctl --driver 127.0.0.1:50052 migrate 0000:81:00.2").lines
    assert len(armed) == 3 and " reconfigure 6 --after-saved-bytes 4MiB" in armed[1], armed
    events_line, audit_line = find(".venv/bin/vfioctl --driver 127.0.0.1:50052 events").lines
    assert events_line.endswith("events [--device DEV] [--json]")
    assert audit_line.endswith("audit [DEV] [--json]")
    walk.run(armed[1])
    for line in (armed[0], armed[2]):
        src = line.split(" migrate ")[1].split()[0]
        follower = Follower(*walk.argv(
            events_line.replace("[--device DEV] [--json]", f"--device {src} --json")
        )[1:])  # fmt: skip
        try:
            out = walk.run(line).stdout
            lines = follower.until(lambda line: '"from_state": "STOP_COPY"' in line)
        finally:
            follower.kill()
        reported = re.findall(rf"REINIT     {re.escape(src)} at .* \((\w[\w-]*)\)", out)
        answered = [
            e for e in map(json.loads, lines) if e["kind"] == "precopy_info" and e["reinit"]
        ]
        assert reported == ["setup"] and len(answered) == 1, (out, answered)
        assert "verified   digests equal" in out, out
    audit = walk.doc(audit_line.replace("[DEV] [--json]", "--json"))
    assert audit["findings"] == [] and audit["counts"] == {}, audit
    audit = walk.doc(audit_line.replace("[DEV] [--json]", f"{pci_name(8)} --json"))
    assert audit["device"] == pci_name(8) and audit["findings"] == []


def test_the_scenario_file_example_parses_and_its_saved_bytes_come_in_a_first_migration() -> None:
    block = find("seed: 42")
    doc = parse_scenario("\n".join(block.lines), "README")
    assert doc.vfs and doc.defaults.size is not None and len(doc.events) >= 3
    counted = [e for e in doc.events if e.after_saved_bytes is not None]
    assert counted, "the example shows after_saved_bytes"
    for e in counted:  # under the VF's size: inside its first migration's first SAVE
        assert e.vf != "all" and 0 < int(e.after_saved_bytes or 0) < int(doc.defaults.size)


@skip_in_tls
@pytest.mark.timeout(120)
def test_the_tls_examples_as_the_readme_runs_them(walk: Walk) -> None:
    # `vfioctl certs DIR ...`: a PKI, then the same CA kept.
    (certs,) = find("vfioctl certs DIR").lines
    assert certs.startswith("vfioctl certs DIR [--server-host NAME ...] [--client NAME ...]")
    assert certs.endswith("[--days N] [--keep-ca | --force]")
    lab = "vfioctl certs lab --server-host localhost --client lab-admin --client vfio-driver "
    walk.run(lab + "--client tenant --days 30")
    ca = (walk.tmp / "lab" / "ca.pem").read_bytes()
    walk.run(lab + "--client tenant --days 30 --keep-ca")
    assert (walk.tmp / "lab" / "ca.pem").read_bytes() == ca
    assert walk.run(lab + "--client tenant", ok=False).returncode == 1  # EEXIST: the CA is there

    # "The firmware service": fwemu with mutual TLS, its admins and drivers.
    for name, source in (("fw.pem", "server.pem"), ("fw.key", "server.key"), ("ca.pem", "ca.pem")):
        (walk.tmp / name).write_bytes((walk.tmp / "lab" / source).read_bytes())
    (tls_fw,) = find(".venv/bin/fwemu serve --listen 0.0.0.0:50051 --tls-cert fw.pem").lines
    fw = walk.serve(tls_fw, "0.0.0.0:50051")

    def vfs(who: str) -> subprocess.CompletedProcess[str]:
        tls = f"--tls-ca ca.pem --tls-cert lab/{who}.pem --tls-key lab/{who}.key " if who else ""
        return walk.run(f"vfioctl {tls}--json scenario --firmware {fw.target} vfs", ok=False)

    listed = {who: vfs(who) for who in ("lab-admin", "vfio-driver", "tenant")}
    assert all(p.returncode == 0 for p in listed.values()), listed
    counts = {who: len(json.loads(p.stdout)["vfs"]) for who, p in listed.items()}
    assert counts == {"lab-admin": 4, "vfio-driver": 4, "tenant": 0}, counts
    assert vfs("").returncode == 1  # plaintext: no handshake
    walk.stop(fw)

    # "vfioctl and the client library": both services and a client over mutual TLS.
    lines = find("vfioctl certs pki$").lines
    assert [x.split()[0] for x in lines] == ["vfioctl", "fwemu", "vfio-driver", "vfioctl"]
    walk.run(lines[0])
    walk.serve(lines[1], "0.0.0.0:50051", also="localhost:50051")
    walk.serve(lines[2], "0.0.0.0:50052", also="localhost:50052")
    out = walk.run(lines[3]).stdout
    assert "0000:81:00.1" in out, out
    plaintext = walk.run("vfioctl --driver localhost:50052 list", ok=False)
    assert plaintext.returncode == 1 and "--tls-ca" in plaintext.stderr, plaintext.stderr


@skip_in_tls
@pytest.mark.timeout(120)
def test_the_exam_example_passes_every_trap(walk: Walk) -> None:
    (synopsis_line,) = find("vfioctl --driver HOST:PORT [--json] [--timeout S] exam").lines
    assert "exam --scenario HOST:PORT" in synopsis_line
    serve, exam = find("vfio-driver serve --scenario-service --vfs 0 &").lines
    walk.serve(serve, "127.0.0.1:50052", add_listen=True)
    p = walk.run(exam)
    doc = json.loads(p.stdout)
    assert doc["all_passed"] and doc["failed"] == 0, doc
    assert len(doc["traps"]) == 8 and all(t["fired"] for t in doc["traps"]), doc


@skip_in_tls
@pytest.mark.timeout(120)
def test_the_metrics_example_exports_the_tables_families(walk: Walk) -> None:
    fw_line, drv_line = find(".venv/bin/fwemu serve --vfs 8 --metrics-listen").lines
    ports = {}
    for readme in ("127.0.0.1:9101", "127.0.0.1:9102"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports[readme] = f"127.0.0.1:{sock.getsockname()[1]}"
    walk.addresses.update(ports)
    walk.serve(fw_line, "127.0.0.1:50051", add_listen=True)
    walk.serve(drv_line, "127.0.0.1:50052", add_listen=True)
    walk.run(".venv/bin/vfioctl --driver 127.0.0.1:50052 precopy-info 0000:81:00.1")
    exposed = ""
    for target in ports.values():
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=BOUND) as answer:
            exposed += answer.read().decode()
    text = (ROOT / "README.md").read_text()
    table = text.split("## Metrics and logs", 1)[1].split("\n## ", 1)[0]
    families = {
        name
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`([a-z_]+)(?:\{[^`]*\})?`", row.split("|")[1])
    }
    assert len(families) > 20, families
    missing = sorted(f for f in families if f not in exposed)
    assert not missing, f"the README's metrics not exported: {missing}"
