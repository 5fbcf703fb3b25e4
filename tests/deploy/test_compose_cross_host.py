"""deploy/compose.yaml's `cross-host` profile: a second host (driver-b, its
firmware embedded), its standing incoming agent (agent-b) and a one-shot
source agent (migrate-cross-host), as QEMU and libvirt migrate across hosts.

What is checked here: the agents' commands are vfioctl's `migrate --incoming
LISTEN` (standing: no DST) and `migrate SRC DST --to tcp:HOST:PORT` through
vfioctl's own parser; the source dials the incoming agent's listen port by its
compose name, which the agents' certificate names; each agent runs in its
driver's IPC namespace (so shares its /dev/shm, where its segments are) and
dials that driver; mutual TLS with a certificate of the `certs` job for client
and server authentication, whose principal holds no role; the health check
connects to the agent's port; the REINIT is armed on the migrated VF, inside
its first precopy, on a VF no other job or scenario event touches; host B's
VFs are the size of the migrated one. The shared helpers are test_compose.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from driver.shards import parse_pci_name
from fwemu.scenario import ScenarioFile, load_scenario_file
from grpcsvc import tls
from tests.deploy.test_compose import (
    CROSS_HOST,
    SERVICES,
    _compose_service,
    _local,
    certs_job,
    host_path,
    parse_command,
    pki_files,
    port,
)
from vfioclient.cli.certs import principal

AGENT, SOURCE, REINIT, HOST_B = "agent-b", "migrate-cross-host", "cross-host-reinit", "driver-b"
# The devices the default profile's demo migrates (`vfioctl demo`: the first
# two migratable VFs, 1 to 2): the cross-host migration leaves them alone.
DEMO_VFS = (1, 2)


def agent() -> argparse.Namespace:
    return parse_command(SERVICES[AGENT]["command"])


def source() -> argparse.Namespace:
    return parse_command(SERVICES[SOURCE]["command"])


def tcp(address: str) -> tuple[str, int]:
    """(host, port) of a `tcp:HOST:PORT` migration address."""
    kind, _, rest = address.partition(":")
    assert kind == "tcp", address
    host, _, number = rest.rpartition(":")
    return host, int(number)


def docker_size(text: str) -> int:
    """A compose size (shm_size: a number and b, k, m or g)."""
    units = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(text[:-1]) * units[text[-1].lower()]


def scenario() -> ScenarioFile:
    fwemu = SERVICES["fwemu"]
    return load_scenario_file(str(host_path(fwemu, parse_command(fwemu["command"]).scenario)))


def vf_size(doc: ScenarioFile, vhca_id: int) -> int:
    """The size of VF `vhca_id` of a scenario (vhca ids 1, 2, ... in its groups' order)."""
    first = 1
    for group in doc.vfs:
        if first <= vhca_id < first + group.count:
            return int(group.size if group.size is not None else doc.defaults.size or 0)
        first += group.count
    pytest.fail(f"the scenario has no VF {vhca_id}")


def test_the_incoming_agent_is_a_standing_vfioctl_migrate_incoming() -> None:
    """`vfioctl --driver ADDR migrate --incoming tcp:0.0.0.0:PORT`: no DST, so
    it serves migrations one after another; a restarted one comes back."""
    args = agent()
    assert SERVICES[AGENT]["command"][0] == "vfioctl" and args.command == "migrate"
    host, number = tcp(args.incoming)
    assert host == "0.0.0.0" and 0 < number < 65536
    # No positional (with --incoming, the one positional would be DST): each
    # migration names its destination.
    assert args.src is None and args.dst is None and args.to is None
    assert SERVICES[AGENT]["restart"] == "unless-stopped"


def test_the_source_agent_migrates_to_the_incoming_agent_by_its_compose_name() -> None:
    """`vfioctl --driver ADDR migrate SRC DST --to tcp:agent-b:PORT`, verified."""
    args = source()
    assert SERVICES[SOURCE]["command"][0] == "vfioctl" and args.command == "migrate"
    assert args.incoming is None
    assert tcp(args.to) == (AGENT, tcp(agent().incoming)[1])
    assert args.verify == "yes"
    assert SERVICES[SOURCE]["restart"] == "no"
    assert SERVICES[SOURCE]["depends_on"][AGENT] == {"condition": "service_healthy"}


def test_each_agent_shares_the_ipc_namespace_of_the_driver_it_dials() -> None:
    """Its segments are in /dev/shm, which the driver must map: the agent
    joins its driver's IPC namespace (Docker and podman share /dev/shm with
    it), which the driver makes shareable, with room for the segments."""
    for name, args in ((AGENT, agent()), (SOURCE, source())):
        driver_host, _, _ = args.driver.rpartition(":")
        assert SERVICES[name]["ipc"] == f"service:{driver_host}", name
        driver = SERVICES[driver_host]
        assert driver["ipc"] == "shareable", driver_host
        assert docker_size(driver["shm_size"]) > 64 << 20, "more than Docker's default"
        assert parse_command(driver["command"]).shm_dir in (None, "/dev/shm"), driver_host
    assert SERVICES[AGENT]["depends_on"][HOST_B] == {"condition": "service_healthy"}
    # Nothing else joins a namespace: the default profile is as it was.
    joined = {n for n, s in SERVICES.items() if str(s.get("ipc", "")).startswith("service:")}
    assert joined == {AGENT, SOURCE}


def test_the_incoming_agents_health_check_connects_to_its_listen_port() -> None:
    test = SERVICES[AGENT]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert f"('127.0.0.1', {tcp(agent().incoming)[1]})" in test[3]
    compile(test[3], "healthcheck", "exec")


def test_the_agents_are_mutual_tls_clients_and_the_listener_presents_the_server_certificate() -> (
    None
):
    """Both agents are clients with a certificate of the certs job
    (VFIO_TLS_*: to their drivers, and the source to agent-b); agent-b's
    listener presents the job's server certificate (--incoming-tls-*), which
    names the host the source dials, and requires a client certificate of
    the CA (the CA in VFIO_TLS_CA): no plaintext on the compose network."""
    written = pki_files()
    job = certs_job()
    for name in (AGENT, SOURCE):
        env = SERVICES[name]["environment"]
        assert written[env[tls.ENV_CA]] == "ca", name
        cert, key = written[env[tls.ENV_CERT]], written[env[tls.ENV_KEY]]
        assert cert == key and cert in job.client and cert != "server", name
    assert SERVICES[AGENT]["environment"] == SERVICES[SOURCE]["environment"], "one principal"
    args = agent()
    assert written[args.incoming_tls_cert] == written[args.incoming_tls_key] == "server"
    assert tcp(source().to)[0] in job.server_host
    assert not args.insecure


def test_the_agents_principal_holds_no_role() -> None:
    """A migration client of the drivers (it reaches the devices it opens,
    and their digests as their holder), no admin and no firmware driver."""
    written = pki_files()
    agent_principal = principal(written[SERVICES[AGENT]["environment"][tls.ENV_CERT]])
    for name in ("fwemu", "driver", HOST_B):
        assert agent_principal not in parse_command(SERVICES[name]["command"]).admin_principals
    assert agent_principal not in parse_command(SERVICES["fwemu"]["command"]).driver_principals


def test_the_reinit_is_armed_on_the_migrated_vf_inside_its_first_precopy() -> None:
    """The arming job reconfigures the source VF after fewer saved bytes than
    the VF holds (its first precopy saves at least its state), on a VF of
    fwemu's scenario without events of its own that the demo does not use;
    it runs, as the admin, before the source agent starts."""
    reinit = parse_command(SERVICES[REINIT]["command"])
    args = source()
    assert reinit.command == "scenario" and reinit.scenario_command == "reconfigure"
    assert reinit.vf == args.src
    assert reinit.firmware == args.firmware
    shard, vhca = parse_pci_name(args.src)
    assert shard == 0 and vhca not in DEMO_VFS
    doc = scenario()
    assert not [e for e in doc.events if e.vf in (vhca, "all")], "the VF has events already"
    assert 0 < reinit.after_saved_bytes < vf_size(doc, vhca)
    assert SERVICES[SOURCE]["depends_on"][REINIT] == {"condition": "service_completed_successfully"}
    assert principal(pki_files()[SERVICES[REINIT]["environment"][tls.ENV_CERT]]) in (
        parse_command(SERVICES["fwemu"]["command"]).admin_principals
    )


def test_host_b_has_the_destination_and_its_digest() -> None:
    """driver-b embeds its firmware (no --firmware) with VFs of the migrated
    VF's size and serves that firmware's Scenario service, where agent-b
    reads the destination's digest (and reports it to the source)."""
    b = parse_command(SERVICES[HOST_B]["command"])
    assert b.firmware is None and b.firmware_shards is None and b.scenario_service
    args = source()
    shard, dst_vhca = parse_pci_name(args.dst)
    assert shard == 0 and 1 <= dst_vhca <= b.vfs
    assert b.size == vf_size(scenario(), parse_pci_name(args.src)[1])
    # agent-b reads the destination's digest from its --driver: driver-b.
    assert agent().driver == f"{HOST_B}:{port(b.listen)}" and agent().firmware is None


def test_the_profile_is_self_contained() -> None:
    """Every service of the profile is in it alone; what it depends on is
    either in it or in the default profile (certs, fwemu, driver)."""
    for name in CROSS_HOST:
        assert SERVICES[name]["profiles"] == ["cross-host"]
        for needed in SERVICES[name].get("depends_on", {}):
            assert needed in CROSS_HOST or "profiles" not in SERVICES[needed], (name, needed)


# --- the profile replayed as processes -----------------------------------------------------------


def _env(name: str, certs: Path) -> dict[str, str]:
    """The service's environment for this host (its /certs files from `certs`)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VFIO_TLS_")}
    env = SERVICES[name].get("environment", {})
    return {**clean, **{k: _local([v], certs, {})[0] for k, v in env.items()}}


def _vfioctl(name: str, certs: Path, addresses: dict[str, str]) -> list[str]:
    """A vfioctl service's command for this host: `tcp:HOST:PORT` addresses too."""
    argv = _local(SERVICES[name]["command"], certs, addresses)
    out = []
    for word in argv[1:]:
        kind, colon, rest = word.partition(":")
        if kind == "tcp" and colon:
            word = "tcp:" + ("127.0.0.1:0" if rest.startswith("0.0.0.0:") else addresses[rest])
        out.append(word)
    return [sys.executable, "-m", "vfioclient.cli", *out]


@contextlib.contextmanager
def _incoming_agent(certs: Path, addresses: dict[str, str]) -> Iterator[str]:
    """agent-b as a process: the HOST:PORT it listens on (from its one line)."""
    proc = subprocess.Popen(
        _vfioctl(AGENT, certs, addresses),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(AGENT, certs),
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert " on tcp:127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        yield line.rsplit("tcp:", 1)[1].strip()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "a standing agent exits 0 on SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.grpc
@pytest.mark.timeout(240)
def test_the_profile_runs_as_the_file_says(tmp_path: Path) -> None:
    """The certs job, fwemu, driver and driver-b with their commands, agent-b,
    the REINIT's arming job and the source agent with theirs: the migration
    completes, verified (equal digests), with the reconfiguration's initial
    data sent again during precopy; agent-b keeps serving after it, and
    stops with exit 0 on SIGTERM. (One host here: the agents and drivers
    share /dev/shm, as the IPC namespaces make them in containers.)"""
    certs = tmp_path / "certs"
    job = _local(SERVICES["certs"]["command"], certs, {})
    job[job.index("/certs")] = str(certs)
    done = subprocess.run(
        [sys.executable, "-m", "vfioclient.cli", *job[1:]],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with contextlib.ExitStack() as stack:
        fw = stack.enter_context(_compose_service("fwemu", certs, {}))
        drv = stack.enter_context(_compose_service("driver", certs, {"fwemu:50051": fw}))
        drv_b = stack.enter_context(_compose_service(HOST_B, certs, {}))
        addresses = {"fwemu:50051": fw, "driver:50052": drv, "driver-b:50052": drv_b}
        agent_b = stack.enter_context(_incoming_agent(certs, addresses))
        addresses[f"{AGENT}:{tcp(agent().incoming)[1]}"] = agent_b
        for name in (REINIT, SOURCE):
            argv = _vfioctl(name, certs, addresses)
            if name == SOURCE:
                argv.insert(argv.index("--driver"), "--json")
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=120, check=False,
                env=_env(name, certs),
            )  # fmt: skip
            assert done.returncode == 0, (name, done.stdout, done.stderr)
        report = json.loads(done.stdout)
        assert report["status"] == "completed" and report["verified"] is True
        (device,) = report["devices"]
        assert device["source_digest"] == device["destination_digest"] != ""
        # The reconfiguration's new initial data went again: more than the VF.
        assert report["precopy_bytes"] > vf_size(scenario(), parse_pci_name(source().src)[1])
