"""components/loadtest and components/loadtest-mtls: the Locust master, its
workers and its Service as the manifests give them (their command lines
through vfio-loadtest's parser and Locust's own), the same users on master
and workers against the addresses of the services they deploy with, the
workers' client certificate and its role, and the NetworkPolicies: with the
component, the workers reach the drivers' and fwemu's gRPC ports and the
master's 5557, and nothing else is admitted that was not before.

Rendered over base (plaintext, components/loadtest alone),
overlays/small-loadtest and the scale overlay with both components
(test_manifests.py's LOADTEST kustomizations; every check there runs on
them too). Last, a load run configured as the manifests configure it: two
fwemu shards and a driver over both, mutual TLS, the master and a worker
with the manifests' arguments (addresses and files made local).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.shards import SHARDS_ENV, parse_shards
from grpcsvc.certs import DevCa, spiffe_id
from grpcsvc.spawn import DRIVER as DRIVER_COMMAND
from grpcsvc.spawn import FWEMU, served
from grpcsvc.tls import ENV_CA, ENV_CERT, ENV_KEY, ClientTls
from tests.deploy.k8s.test_manifests import (
    ADMIN,
    ADMIN_POD,
    DRIVER,
    FIRMWARE,
    IMAGE,
    K8S,
    KUSTOMIZATIONS,
    LOADTEST,
    LOADTEST_COMPONENTS,
    LOADTEST_MASTER,
    LOADTEST_PRINCIPAL,
    LOADTEST_SECRET,
    LOADTEST_WORKER,
    LOADTEST_WORKER_POD,
    MIGRATION_CLIENT,
    MTLS,
    SERVER_SECRET,
    WITH_LOADTEST,
    Obj,
    container_env,
    expand,
    mounted_secrets,
    name_matches,
    named_ports,
    one,
    rendered,
    secret_of,
    selects,
    workload,
    workloads,
)
from tests.deploy.locust_cli import locust_argv, locust_options
from vfioclient.scenario import ScenarioClient
from vfioload.cli import _parser as loadtest_parser
from vfioload.mix import CLASS_NAMES, parse_mix

SERVICE = "vfio-loadtest"  # the master's Service
MASTER_POD = {
    "app.kubernetes.io/name": "vfio-loadtest",
    "app.kubernetes.io/component": "loadtest-master",
}
# What each kustomization with the load generator is, without it.
WITHOUT = {k: k.removesuffix(WITH_LOADTEST) for k in LOADTEST} | {
    "overlays/small-loadtest": "overlays/small"
}


@pytest.fixture(name="kustomization", params=LOADTEST)
def kustomization_fixture(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_every_loadtest_kustomization_is_one_with_the_component() -> None:
    """base+loadtest: components/loadtest alone (plaintext); the mTLS ones
    with loadtest-mtls too."""
    assert "base" + WITH_LOADTEST in LOADTEST and MTLS["base" + WITH_LOADTEST] is None
    for k in LOADTEST:
        assert k in KUSTOMIZATIONS and WITHOUT[k] in KUSTOMIZATIONS
        assert MTLS[k] == MTLS[WITHOUT[k]]
        names = {w["metadata"]["name"] for w in workloads(rendered(k))}
        assert names == {"fwemu", "vfio-driver", LOADTEST_MASTER, LOADTEST_WORKER}
        assert not {LOADTEST_MASTER, LOADTEST_WORKER} & {
            w["metadata"]["name"] for w in workloads(rendered(WITHOUT[k]))
        }


# --- command lines ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadtestPod:
    obj: Obj
    ours: argparse.Namespace  # vfio-loadtest's own options, $(VAR)s expanded
    locust: dict[str, Any]  # Locust's, as vfio-loadtest hands them over


def loadtest_pods(
    kustomization: str, tmp_path: Path
) -> tuple[LoadtestPod, LoadtestPod, tuple[Obj, ...], str]:
    """(master, worker, the objects, the namespace)."""
    objs = rendered(kustomization)
    pods = []
    parsed = []
    for name in (LOADTEST_MASTER, LOADTEST_WORKER):
        obj = one(objs, "Deployment", name)
        namespace = obj["metadata"].get("namespace", "default")
        env = container_env(obj, objs, namespace)
        (c,) = obj["spec"]["template"]["spec"]["containers"]
        assert "command" not in c, "args only: the image's ENTRYPOINT (tini) stays PID 1"
        program, *argv = (expand(a, env) for a in c["args"])
        assert program == "vfio-loadtest"
        ours, rest = loadtest_parser().parse_known_args(argv)
        parsed.append((obj, ours, locust_argv(rest, ours.mix)))
    options = locust_options([argv for _, _, argv in parsed], tmp_path)
    for (obj, ours, _), locust in zip(parsed, options, strict=True):
        pods.append(LoadtestPod(obj, ours, locust))
    return pods[0], pods[1], objs, namespace


def test_the_master_serves_the_ui_and_its_workers_port(kustomization: str, tmp_path: Path) -> None:
    """One master, not headless (runs start from its web UI), binding Locust's
    master port and the UI on the ports its container and Service name; its
    probes ask the UI."""
    master, _, objs, _ = loadtest_pods(kustomization, tmp_path)
    assert master.obj["spec"]["replicas"] == 1
    opts = master.locust
    assert opts["master"] is True and opts["worker"] is False and opts["headless"] is False
    ports = named_ports(master.obj)
    assert ports == {"master": opts["master_bind_port"], "web": opts["web_port"]}
    assert ports == {"master": 5557, "web": 8089}
    assert opts["master_bind_host"] == "*" and opts["web_host"] in ("", "*")
    (c,) = master.obj["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/", "port": "web"}, probe

    svc = one(objs, "Service", SERVICE)
    template = master.obj["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"] == MASTER_POD and selects(svc["spec"]["selector"], template)
    others = [w for w in workloads(objs) if w is not master.obj]
    assert not any(
        selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        for w in others
    )
    assert {p["name"]: (p["port"], ports[p["targetPort"]]) for p in svc["spec"]["ports"]} == {
        "master": (5557, 5557),
        "web": (8089, 8089),
    }


def test_the_workers_join_the_master_through_its_service(
    kustomization: str, tmp_path: Path
) -> None:
    master, worker, objs, _ = loadtest_pods(kustomization, tmp_path)
    assert worker.obj["spec"]["replicas"] == 2
    opts = worker.locust
    assert opts["worker"] is True and opts["master"] is False
    svc = one(objs, "Service", SERVICE)
    assert opts["master_host"] == svc["metadata"]["name"]
    service_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert opts["master_port"] == service_ports["master"] == master.locust["master_bind_port"]
    (c,) = worker.obj["spec"]["template"]["spec"]["containers"]
    assert "ports" not in c, "a worker listens on nothing"


def test_master_and_workers_run_the_same_users_against_the_deployed_services(
    kustomization: str, tmp_path: Path
) -> None:
    """The same options of vfio-loadtest's own on both (--driver, --scenario,
    --mix, --vf-size...: the master weighs the classes, the workers run them),
    the user classes of the mix;
    --driver is the drivers' headless Service by its full name on their gRPC
    port, --scenario shard 0 exactly as the drivers' shard map names it."""
    master, worker, objs, namespace = loadtest_pods(kustomization, tmp_path)

    def shared(ours: argparse.Namespace) -> dict[str, Any]:
        """Every option of vfio-loadtest's own but the TLS files (workers only)."""
        return {k: v for k, v in vars(ours).items() if not k.startswith("tls_")}

    assert {"driver", "scenario", "mix", "vf_size"} <= set(shared(worker.ours))
    assert shared(master.ours) == shared(worker.ours)
    assert master.locust["user_classes"] == worker.locust["user_classes"]
    assert worker.locust["user_classes"] == [CLASS_NAMES[k] for k in parse_mix(worker.ours.mix)]
    assert set(parse_mix(worker.ours.mix)) == set(CLASS_NAMES), "every user class"

    drivers = one(objs, "Service", "vfio-driver")
    grpc = {p["name"]: p["port"] for p in drivers["spec"]["ports"]}["grpc"]
    assert worker.ours.driver == f"vfio-driver.{namespace}.svc.cluster.local:{grpc}"
    dep = one(objs, "Deployment", "vfio-driver")
    shards = parse_shards(container_env(dep, objs, namespace)[SHARDS_ENV])
    assert worker.ours.scenario == shards.addresses[0]


def test_the_loadtest_pods_have_requests_limits_and_the_loadtest_image(
    kustomization: str,
) -> None:
    """The image built with the loadtest extra, at the services' tag."""
    objs = rendered(kustomization)
    (service_image,) = {
        c["image"]
        for w in workloads(objs)
        if w["metadata"]["name"] in ("fwemu", "vfio-driver")
        for c in w["spec"]["template"]["spec"]["containers"]
    }
    tag = service_image.rpartition(":")[2]
    for name in (LOADTEST_MASTER, LOADTEST_WORKER):
        (c,) = one(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert c["image"] == f"{IMAGE}-loadtest:{tag}"
        for kind in ("requests", "limits"):
            assert set(c["resources"][kind]) == {"cpu", "memory"}, (name, kind)


# --- certificates and roles -------------------------------------------------------------------


def test_with_mtls_the_workers_present_the_loadtest_certificate_and_the_master_none(
    kustomization: str, tmp_path: Path
) -> None:
    """Every TLS file of the workers is a key of vfio-loadtest-tls mounted at
    its directory; the master calls no service and mounts no Secret. In
    plaintext (base), neither has any."""
    master, worker, _, _ = loadtest_pods(kustomization, tmp_path)
    assert not mounted_secrets(master.obj)
    assert (master.ours.tls_ca, master.ours.tls_cert, master.ours.tls_key) == (None,) * 3
    files = (worker.ours.tls_ca, worker.ours.tls_cert, worker.ours.tls_key)
    if MTLS[kustomization] is None:
        assert files == (None,) * 3 and not mounted_secrets(worker.obj)
        return
    assert all(files)
    for path in files:
        assert secret_of(worker.obj, path) == LOADTEST_SECRET, path
    assert set(mounted_secrets(worker.obj).values()) == {LOADTEST_SECRET}


@pytest.mark.parametrize("kustomization", [k for k in LOADTEST if MTLS[k] == "cert-manager"])
def test_cert_manager_issues_the_loadtest_certificate_and_names_what_it_dials(
    kustomization: str, tmp_path: Path
) -> None:
    """vfio-loadtest-tls from the namespace's CA, principal
    spiffe://vfio-mlx5-emu/loadtest (fwemu's admin: test_manifests.py); the
    server certificate names the driver and Scenario hosts the workers dial."""
    _, worker, objs, _ = loadtest_pods(kustomization, tmp_path)
    certs = {c["spec"]["secretName"]: c for c in objs if c["kind"] == "Certificate"}
    issuers = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Issuer"}
    cert = certs[LOADTEST_SECRET]
    assert cert["spec"]["uris"] == [LOADTEST_PRINCIPAL] == [spiffe_id("loadtest")]
    issuer = issuers[cert["spec"]["issuerRef"]["name"]]
    assert issuer["spec"]["ca"]["secretName"] == certs[SERVER_SECRET]["spec"]["issuerRef"]["name"]
    server = certs[SERVER_SECRET]["spec"]["dnsNames"]
    for address in (worker.ours.driver, worker.ours.scenario):
        host = address.rpartition(":")[0]
        assert any(name_matches(p, host) for p in server), host


def test_loadtest_mtls_needs_the_mtls_component() -> None:
    """Over plaintext base its patch of fwemu's --admin-principals (args/16,
    from components/mtls) has nothing to patch: rendering fails, loudly."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        rendered("base")  # skips or fails as every rendering test does
        return
    with tempfile.TemporaryDirectory() as tmp:
        here = Path(tmp)
        (here / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [os.path.relpath(K8S / "base", here)],
                    "components": [os.path.relpath(K8S / c, here) for c in LOADTEST_COMPONENTS],
                }
            )
        )
        done = subprocess.run(
            [kubectl, "kustomize", str(here)], capture_output=True, text=True, timeout=120
        )
    assert done.returncode != 0
    assert "loadtest-mtls" in done.stderr and "/containers/0/args/16" in done.stderr, done.stderr


# --- network policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A pod that could connect: its labels, namespace and namespace labels."""

    name: str
    labels: tuple[tuple[str, str], ...]
    namespace: str
    namespace_labels: tuple[tuple[str, str], ...] = ()


def container_ports(obj: Obj) -> dict[str, int]:
    """name -> number of the ports a workload's containers declare (none: {})."""
    containers = obj["spec"]["template"]["spec"]["containers"]
    return {p["name"]: p["containerPort"] for c in containers for p in c.get("ports", [])}


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels only here; empty: everything)."""
    assert set(selector) <= {"matchLabels"}, selector
    wanted: dict[str, str] = selector.get("matchLabels", {})
    return wanted.items() <= labels.items()


def admits(objs: tuple[Obj, ...], peer: Peer, dst: Obj, port: int) -> bool:
    """Whether NetworkPolicy lets `peer` connect to pods of workload `dst` on
    `port` (ingress only: the policies here have no egress rules)."""
    namespace = dst["metadata"].get("namespace", "default")
    labels = dst["spec"]["template"]["metadata"]["labels"]
    names = {number: name for name, number in container_ports(dst).items()}
    policies = [
        p
        for p in objs
        if p["kind"] == "NetworkPolicy"
        and p["metadata"].get("namespace", "default") == namespace
        and "Ingress" in p["spec"]["policyTypes"]
        and matches(p["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True  # no policy selects the pod: everything is admitted
    peer_labels = dict(peer.labels)
    ns_labels = {**dict(peer.namespace_labels), "kubernetes.io/metadata.name": peer.namespace}
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(
                p["port"] in (port, names.get(port)) and p.get("protocol", "TCP") == "TCP"
                for p in ports
            ):
                continue
            sources = rule.get("from")
            if sources is None:
                return True
            for source in sources:
                assert set(source) <= {"podSelector", "namespaceSelector"}, source
                if "namespaceSelector" in source:
                    in_namespace = matches(source["namespaceSelector"], ns_labels)
                else:
                    in_namespace = peer.namespace == namespace
                if in_namespace and matches(source.get("podSelector", {}), peer_labels):
                    return True
    return False


def peers(namespace: str) -> list[Peer]:
    """Pods of every kind that could try: each workload's, labelled clients,
    Prometheus elsewhere, the load test's pods from another namespace (even
    one allowed to hold clients), any other pod."""
    allowed = (("vfio-mlx5-emu/clients", "allowed"),)

    def t(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(labels.items()))

    return [
        Peer("fwemu", t(FIRMWARE), namespace),
        Peer("driver", t(DRIVER), namespace),
        Peer("master", t(MASTER_POD), namespace),
        Peer("worker", t(LOADTEST_WORKER_POD), namespace),
        Peer("admin", t(ADMIN_POD), namespace),
        Peer("client", t(MIGRATION_CLIENT), namespace),
        Peer("other", t({"app": "other"}), namespace),
        Peer("prometheus", t({"app.kubernetes.io/name": "prometheus"}), "monitoring"),
        Peer("client elsewhere", t(MIGRATION_CLIENT), "clients", allowed),
        Peer("worker elsewhere", t(LOADTEST_WORKER_POD), "clients", allowed),
        Peer("master elsewhere", t(MASTER_POD), "clients", allowed),
        Peer("worker in another namespace", t(LOADTEST_WORKER_POD), "other"),
    ]


def admitted(objs: tuple[Obj, ...]) -> set[tuple[str, str, int]]:
    """(peer, workload, port) for every peer, workload and port any workload listens on."""
    namespace = one(objs, "StatefulSet", "fwemu")["metadata"].get("namespace", "default")
    ports = {p for w in workloads(objs) for p in container_ports(w).values()}
    return {
        (peer.name, w["metadata"]["name"], port)
        for peer in peers(namespace)
        for w in workloads(objs)
        for port in sorted(ports)
        if admits(objs, peer, w, port)
    }


def test_the_policy_analysis_is_no_rubber_stamp() -> None:
    """Before the load generator: drivers and admins reach fwemu's gRPC,
    migration clients (also from allowed namespaces) the drivers', Prometheus
    the metrics ports; other pods, and anything on another port, nothing."""
    got = admitted(rendered("overlays/small"))
    assert ("driver", "fwemu", 50051) in got and ("admin", "fwemu", 50051) in got
    assert ("client", "vfio-driver", 50052) in got
    assert ("client elsewhere", "vfio-driver", 50052) in got
    assert ("prometheus", "fwemu", 9101) in got and ("prometheus", "vfio-driver", 9102) in got
    assert not any(peer == "other" for peer, _, _ in got)
    assert ("client", "fwemu", 50051) not in got and ("driver", "fwemu", 9101) not in got
    assert ("worker", "vfio-driver", 50052) not in got and ("worker", "fwemu", 50051) not in got


def test_the_policies_admit_the_workers_to_the_services_and_the_master_and_nothing_else_new(
    kustomization: str,
) -> None:
    """Against the same kustomization without the component: the workers of
    this namespace reach the drivers' gRPC port, fwemu's (its Scenario
    service) and the master's 5557; nothing else is admitted that was not
    before, nothing before is refused now, and nothing reaches the master's
    web UI (kubectl port-forward only) or the workers."""
    before = admitted(rendered(WITHOUT[kustomization]))
    after = admitted(rendered(kustomization))
    assert before - after == set()
    assert after - before == {
        ("worker", "vfio-driver", 50052),
        ("worker", "fwemu", 50051),
        ("worker", LOADTEST_MASTER, 5557),
    }


def test_each_loadtest_pod_is_selected_by_one_policy_of_its_own(kustomization: str) -> None:
    """The master's admits its workers on its master port only; the workers'
    admits nothing."""
    objs = rendered(kustomization)
    for name, labels in ((LOADTEST_MASTER, MASTER_POD), (LOADTEST_WORKER, LOADTEST_WORKER_POD)):
        template = one(objs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        (policy,) = [
            p
            for p in objs
            if p["kind"] == "NetworkPolicy" and matches(p["spec"]["podSelector"], template)
        ]
        assert policy["metadata"]["name"] == name
        assert policy["spec"]["podSelector"]["matchLabels"] == labels
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        rules = policy["spec"]["ingress"]
        if name == LOADTEST_WORKER:
            assert rules == []
        else:
            assert rules == [
                {
                    "from": [{"podSelector": {"matchLabels": LOADTEST_WORKER_POD}}],
                    "ports": [{"port": named_ports(one(objs, "Deployment", name))["master"],
                               "protocol": "TCP"}],
                }
            ]  # fmt: skip


# --- a load run as deployed -------------------------------------------------------------------

HOSTS = ("127.0.0.20", "127.0.0.21")  # shard k on 127.0.0.2{k}
QUIET = ("--log-level", "error", "--loop", "asyncio")
RUN_S = 8


def _common_free_port() -> int:
    """A port free on both shard addresses (fwemu binds without SO_REUSEPORT)."""
    with socket.socket() as a, socket.socket() as b:
        a.bind((HOSTS[0], 0))
        port: int = a.getsockname()[1]
        b.bind((HOSTS[1], port))
        return port


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@contextlib.contextmanager
def _shards(server_args: list[str], admins: frozenset[str]) -> Iterator[list[str]]:
    """fwemu shards 0 and 1 (2 VFs each), as the manifest's roles say."""
    roles = ["--driver-principals", "vfio-driver", "--admin-principals", ",".join(sorted(admins))]
    with contextlib.ExitStack() as stack:
        for attempt in range(5):  # another process may take the port in between
            port = _common_free_port()
            try:
                targets = [
                    stack.enter_context(
                        served(FWEMU, "--listen", f"{HOSTS[k]}:{port}", "--shard", str(k),
                               "--vfs", "2", "--size", "256KiB", *QUIET, *server_args, *roles)
                    )[1]
                    for k in range(2)
                ]  # fmt: skip
                break
            except RuntimeError:
                stack.close()
                if attempt == 4:
                    raise
        yield targets


def local_argv(
    pod: LoadtestPod,
    objs: tuple[Obj, ...],
    namespace: str,
    values: dict[str, str],
    options: dict[str, str],
) -> list[str]:
    """A pod's vfio-loadtest arguments for this host, $(VAR)s expanded: an
    option whose value is a key of `values` (a service's address, a TLS file)
    gets that value's; an option named in `options` gets that value."""
    env = container_env(pod.obj, objs, namespace)
    out = []
    for arg in pod.obj["spec"]["template"]["spec"]["containers"][0]["args"][1:]:
        name, eq, value = expand(arg, env).partition("=")
        if eq and name in options:
            value = options[name]
        elif eq and value in values:
            value = values[value]
        out.append(f"{name}{eq}{value}")
    return out


async def _vfs(target: str, tls: ClientTls) -> list[int]:
    async with await ScenarioClient.connect(target, tls=tls) as s:
        return [v.vhca_id for v in await s.list_vfs()]


@pytest.mark.grpc
@pytest.mark.timeout(180)
def test_a_load_run_as_the_manifests_configure_it(tmp_path: Path) -> None:
    """overlays/small-loadtest's roles and arguments on this host: two fwemu
    shards (--admin-principals from the manifest: the load test's principal
    among them) and a driver over both (its own: the load test's principal is
    no admin there), mutual TLS; the master and a worker with the manifests'
    arguments, the worker presenting the load test's certificate, the master
    none. The run makes its VFs on shard 0, has no failure, detects REINITs,
    and leaves no VF behind on either shard."""
    objs = rendered("overlays/small-loadtest")
    _, fw = workload(objs, "fwemu")
    _, drv = workload(objs, "vfio-driver")
    assert LOADTEST_PRINCIPAL in fw.admin_principals
    assert LOADTEST_PRINCIPAL not in drv.admin_principals
    master, worker, _, namespace = loadtest_pods("overlays/small-loadtest", tmp_path)

    ca = DevCa(tmp_path / "pki")
    server = ca.server("server", HOSTS)
    link = ca.client("vfio-driver", uri=False)
    loadtest, admin = ca.client("loadtest"), ca.client("admin")
    assert spiffe_id("loadtest") == LOADTEST_PRINCIPAL and spiffe_id("admin") == ADMIN
    server_args = ["--tls-cert", str(server.cert), "--tls-key", str(server.key),
                   "--tls-client-ca", str(ca.cert_path)]  # fmt: skip
    admin_tls = ClientTls(str(ca.cert_path), str(admin.cert), str(admin.key))
    # No VFIO_TLS_* of the session's: each process presents what its pod does.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (ENV_CA, ENV_CERT, ENV_KEY) and not k.startswith(("LOCUST_", "VFIO_LOADTEST"))
    }
    loadtest_command = [sys.executable, "-m", "vfioload.cli"]

    with (
        _shards(server_args, fw.admin_principals) as shards,
        served(
            DRIVER_COMMAND, "--firmware-shards", ",".join(shards), "--memory", "remote",
            "--firmware-wait", "10", *QUIET, *server_args,
            "--admin-principals", ",".join(sorted(drv.admin_principals)),
            "--firmware-tls-ca", str(ca.cert_path), "--firmware-tls-cert", str(link.cert),
            "--firmware-tls-key", str(link.key),
        ) as (_, driver),
    ):  # fmt: skip
        before = [asyncio.run(_vfs(s, admin_tls)) for s in shards]
        values = {
            worker.ours.driver: driver,
            worker.ours.scenario: shards[0],
            worker.ours.tls_ca: str(ca.cert_path),
            worker.ours.tls_cert: str(loadtest.cert),
            worker.ours.tls_key: str(loadtest.key),
        }
        port = _free_port()
        worker_argv = local_argv(
            worker, objs, namespace, values, {"--master-host": "127.0.0.1", "--master-port": port}
        )
        master_argv = local_argv(
            master, objs, namespace, values,
            {"--master-bind-port": port, "--web-port": _free_port()},
        )  # fmt: skip
        assert not any(a.startswith("--tls-") for a in master_argv)
        # What the web UI's start button would ask for, from the command line.
        master_argv += ["--master-bind-host", "127.0.0.1", "--web-host", "127.0.0.1",
                        "--headless", "--expect-workers", "1", "-u", "4", "-r", "4",
                        "-t", f"{RUN_S}s", "--csv", str(tmp_path / "run"),
                        "--only-summary"]  # fmt: skip
        w = subprocess.Popen(
            [*loadtest_command, *worker_argv],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            done = subprocess.run(
                [*loadtest_command, *master_argv],
                capture_output=True, text=True, timeout=RUN_S + 90, env=env, check=False,
            )  # fmt: skip
            w.wait(timeout=30)
        finally:
            w.kill()
            _, worker_err = w.communicate()
        after = [asyncio.run(_vfs(s, admin_tls)) for s in shards]

    report = done.stderr[-3000:] + worker_err[-3000:]
    assert done.returncode == 0, report
    with (tmp_path / "run_stats.csv").open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["Type"]]
    for row in rows:
        assert row["Failure Count"] == "0", (row["Type"], row["Name"], report)
    counts = {(r["Type"], r["Name"]): int(r["Request Count"]) for r in rows}
    assert counts.get(("reinit-loop", "REINIT detection"), 0) > 0, counts
    assert {kind for kind, _ in counts} == set(CLASS_NAMES), counts
    assert after == before, "the run left VFs behind"
