"""deploy/k8s: every driver pod runs a migration agent beside its driver
(container migration-agent), in every kustomization: a standing incoming
agent (`vfioctl --driver 127.0.0.1:50052 migrate --incoming tcp:0.0.0.0:4444`,
through vfioctl's own parser) on the named port `migration`, sharing the
pod's memory-backed /dev/shm with the driver (its segments, which the driver
maps), locked down as the driver is, with TCP probes on its port; that port
admits the driver pods only (NetworkPolicy, analysed as test_loadtest.py does);
with the mtls components the agent is a client with the Secret vfio-agent-tls
(no role) and its listener presents the server certificate, whose DNS names
cover the pod names source agents dial (<pod IP with dashes>.vfio-driver...).
"""

from __future__ import annotations

import argparse
import ipaddress

import pytest
import yaml

from grpcsvc.access import DEFAULT_DRIVER_PRINCIPAL
from tests.deploy.k8s.test_loadtest import admitted
from tests.deploy.k8s.test_manifests import (
    AGENT,
    DRIVER,
    K8S,
    KUSTOMIZATIONS,
    MTLS,
    SERVER_SECRET,
    UID,
    WITH_CERT_MANAGER,
    WITH_MTLS,
    Obj,
    container,
    container_env,
    issued_principal,
    mounted_secrets,
    name_matches,
    named_ports,
    one,
    rendered,
    secret_of,
    workload,
)
from vfioclient.cli import build_parser as vfioctl_parser

AGENT_SECRET = "vfio-agent-tls"
AGENT_PRINCIPAL = "spiffe://vfio-mlx5-emu/migration-agent"
SHM = "/dev/shm"


def driver_deployment(kustomization: str) -> tuple[tuple[Obj, ...], Obj]:
    objs = rendered(kustomization)
    return objs, one(objs, "Deployment", "vfio-driver")


def agent_args(dep: Obj) -> argparse.Namespace:
    """The agent's args through vfioctl's parser (the image's ENTRYPOINT stays)."""
    c = container(dep, AGENT)
    assert "command" not in c, "args only: the image's ENTRYPOINT (tini) stays PID 1"
    program, *argv = c["args"]
    assert program == "vfioctl"
    return vfioctl_parser().parse_args(argv)


def listen_port(incoming: str) -> tuple[str, int]:
    kind, _, rest = incoming.partition(":")
    assert kind == "tcp", incoming
    host, _, number = rest.rpartition(":")
    return host, int(number)


@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_every_driver_pod_runs_a_standing_incoming_agent_on_its_driver(
    kustomization: str,
) -> None:
    """A standing agent (no DST: it serves migrations until SIGTERM) on the
    named port `migration`, whose driver is this pod's over loopback."""
    objs, dep = driver_deployment(kustomization)
    pod = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["vfio-driver", AGENT]
    args = agent_args(dep)
    assert args.command == "migrate" and args.src is None and args.dst is None
    assert args.to is None
    host, number = listen_port(args.incoming)
    assert host == "0.0.0.0" and number == named_ports(dep, AGENT)["migration"]
    _, driver = workload(objs, "vfio-driver")
    assert args.driver == f"127.0.0.1:{driver.listen.rpartition(':')[2]}"
    assert container(dep, AGENT)["image"] == container(dep)["image"]


@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_the_agent_shares_a_bounded_memory_dev_shm_with_its_driver(kustomization: str) -> None:
    """Both mount one emptyDir (tmpfs, size-limited) at /dev/shm, the
    driver's --shm-dir (its default): what the agent creates there, the
    driver maps."""
    objs, dep = driver_deployment(kustomization)
    pod = dep["spec"]["template"]["spec"]
    mounts = {
        c["name"]: {m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in pod["containers"]
    }
    volume = mounts["vfio-driver"][SHM]
    assert mounts[AGENT][SHM] == volume
    (shm,) = [v for v in pod["volumes"] if v["name"] == volume]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert shm["emptyDir"]["sizeLimit"]
    assert workload(objs, "vfio-driver")[1].shm_dir in (None, SHM)


@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_the_agent_runs_locked_down_as_the_drivers_user(kustomization: str) -> None:
    """UID 10001 as the driver (its segments are mode 0600), the driver
    container's security settings, requests and limits, TCP probes on its
    port (it speaks no gRPC)."""
    _, dep = driver_deployment(kustomization)
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    agent = container(dep, AGENT)
    assert "runAsUser" not in agent["securityContext"], "the pod's: the driver's"
    assert agent["securityContext"] == container(dep)["securityContext"]
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True
    assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    for kind in ("requests", "limits"):
        assert set(agent["resources"][kind]) == {"cpu", "memory"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert agent[probe]["tcpSocket"] == {"port": "migration"}, probe


@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_the_agent_port_admits_the_driver_pods_only(kustomization: str) -> None:
    """Only driver pods (where source agents run) reach 4444; no one reaches
    it elsewhere. The analysis is test_loadtest.py's over every peer kind."""
    objs, dep = driver_deployment(kustomization)
    number = named_ports(dep, AGENT)["migration"]
    got = {(peer, w) for peer, w, p in admitted(objs) if p == number}
    assert got == {("driver", "vfio-driver")}
    policy = one(objs, "NetworkPolicy", "vfio-driver")
    (rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == number]
    assert rule["from"] == [{"podSelector": {"matchLabels": DRIVER}}]


@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_the_agent_has_the_drivers_shard_map(kustomization: str) -> None:
    """A source agent's --verify finds the source's firmware by the shard
    map, as the driver does."""
    objs, dep = driver_deployment(kustomization)
    namespace = dep["metadata"].get("namespace", "default")
    env = container_env(dep, objs, namespace, AGENT)
    assert (
        env["VFIO_FIRMWARE_SHARDS"] == container_env(dep, objs, namespace)["VFIO_FIRMWARE_SHARDS"]
    )


@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_the_agent_listens_with_tls_or_insecure_as_the_listen_policy_wants(
    kustomization: str,
) -> None:
    """Plaintext with --insecure in base (NetworkPolicy its only guard);
    with mtls a client certificate (vfioctl's global --tls-*) and the
    listener's certificate and key, no --insecure."""
    _, dep = driver_deployment(kustomization)
    args = agent_args(dep)
    if MTLS[kustomization] is None:
        assert args.insecure and args.tls_cert is None and args.incoming_tls_cert is None
        return
    assert not args.insecure
    assert args.tls_ca and args.tls_cert and args.tls_key
    assert args.incoming_tls_cert and args.incoming_tls_key


@pytest.mark.parametrize("kustomization", WITH_MTLS)
def test_the_agents_certificates_come_from_their_secrets(kustomization: str) -> None:
    """Its client certificate and CA from vfio-agent-tls; its listener's
    from vfio-server-tls (the pod's server certificate); its probes need none."""
    _, dep = driver_deployment(kustomization)
    args = agent_args(dep)
    for path in (args.tls_ca, args.tls_cert, args.tls_key):
        assert secret_of(dep, path, AGENT) == AGENT_SECRET, path
    for path in (args.incoming_tls_cert, args.incoming_tls_key):
        assert secret_of(dep, path, AGENT) == SERVER_SECRET, path
    assert AGENT_SECRET not in mounted_secrets(dep).values(), "the driver does not need it"


@pytest.mark.parametrize("kustomization", WITH_CERT_MANAGER)
def test_cert_manager_issues_the_agents_client_certificate_and_the_listeners_names(
    kustomization: str,
) -> None:
    """vfio-agent-tls: a client certificate whose principal holds no role
    (neither the drivers' admin nor fwemu's driver or admin); the server
    certificate names what a source agent dials: a driver pod's name through
    the headless Service (<pod IP with dashes>.vfio-driver.<ns>.svc...), not
    a firmware shard's, and loopback."""
    objs, dep = driver_deployment(kustomization)
    certs = {c["spec"]["secretName"]: c for c in objs if c["kind"] == "Certificate"}
    agent = certs[AGENT_SECRET]["spec"]
    assert issued_principal(certs[AGENT_SECRET]) == AGENT_PRINCIPAL
    assert "client auth" in agent["usages"] and "server auth" not in agent["usages"]
    _, drv = workload(objs, "vfio-driver")
    _, fw = workload(objs, "fwemu")
    roles = drv.admin_principals | fw.admin_principals | fw.driver_principals
    assert AGENT_PRINCIPAL not in roles | {DEFAULT_DRIVER_PRINCIPAL}
    namespace = dep["metadata"]["namespace"]
    server = certs[SERVER_SECRET]["spec"]
    pod_ip = ipaddress.ip_address("10.244.1.7")
    pod_name = f"{str(pod_ip).replace('.', '-')}.vfio-driver.{namespace}.svc.cluster.local"
    assert any(name_matches(p, pod_name) for p in server["dnsNames"]), pod_name
    assert not any(name_matches(p, str(pod_ip)) for p in server["dnsNames"])
    assert "127.0.0.1" in server["ipAddresses"]
    assert "server auth" in server["usages"]


def test_the_mtls_patch_refuses_an_agent_it_does_not_know() -> None:
    """components/mtls tests that containers/1 is the agent and args/6 its
    --insecure before it patches: a base that moved them fails the build
    instead of patching the wrong container or word."""
    ops = yaml.safe_load((K8S / "components/mtls/migration-agent.yaml").read_text())
    tests = [(o["path"], o["value"]) for o in ops if o["op"] == "test"]
    assert ("/spec/template/spec/containers/1/name", AGENT) in tests
    assert ("/spec/template/spec/containers/1/args/6", "--insecure") in tests
    _, dep = driver_deployment("base")
    assert dep["spec"]["template"]["spec"]["containers"][1]["name"] == AGENT
    assert container(dep, AGENT)["args"][6] == "--insecure"
