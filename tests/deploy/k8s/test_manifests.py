"""deploy/k8s: every kustomization renders with `kubectl kustomize`, every
object it renders validates strictly against Kubernetes' own schemas
(kubernetes-validate; the Prometheus Operator's ServiceMonitor and
cert-manager's Issuer and Certificate, which have no schema there, are checked
here), and the invariants the design relies on hold: the shard count, probes,
resources, the locked-down containers, the network policies, the headless
Services, and with the mtls components mutual TLS on every gRPC listener and
link, each certificate file mounted from the Secret that holds it, the
principals matching the roles, and the server certificate naming every
address it is dialled by. The load generator's component (components/loadtest,
with loadtest-mtls) is rendered over both mTLS overlays: overlays/small-loadtest,
and the scale overlay with the components added (a kustomization made in a
temporary directory); test_loadtest.py checks what is its own.

kubectl comes from PATH (.ci/run installs it where it is missing). Locally the
tests skip without kubectl or kubernetes-validate; under CI they fail instead.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.cli import _parser as driver_parser
from driver.service.server import VFIO_SERVICE
from driver.shards import SHARDS_ENV, parse_shards
from fwemu.cli import _parser as fwemu_parser
from fwemu.scenario import parse_scenario
from grpcsvc import tls
from grpcsvc.access import DEFAULT_DRIVER_PRINCIPAL
from grpcsvc.healthcheck import _parser as healthcheck_parser

K8S = Path(__file__).resolve().parents[3] / "deploy" / "k8s"
# The newest Kubernetes whose schemas kubernetes-validate ships (pyproject pins
# kubernetes-validate>=1.37).
KUBERNETES_VERSION = "1.37.0"
IMAGE = "vfio-mlx5-emu"
UID = 10001  # the image's user (deploy/Dockerfile)

# A kustomization "X+loadtest" is X with components/loadtest added, and
# loadtest-mtls where X has mTLS (rendered from a temporary kustomization).
WITH_LOADTEST = "+loadtest"
LOADTEST_COMPONENTS = ("components/loadtest", "components/loadtest-mtls")
# kustomization -> (shards, driver replicas, has ServiceMonitors)
KUSTOMIZATIONS = {
    "base": (2, 2, False),
    "overlays/small": (2, 1, False),
    "overlays/scale": (16, 4, True),
    "base" + WITH_LOADTEST: (2, 2, False),
    "overlays/small-loadtest": (2, 1, False),
    "overlays/scale" + WITH_LOADTEST: (16, 4, True),
}
# kustomization -> where its certificates come from (None: plaintext)
MTLS = {
    "base": None,
    "overlays/small": "secrets",
    "overlays/scale": "cert-manager",
    "base" + WITH_LOADTEST: None,
    "overlays/small-loadtest": "secrets",
    "overlays/scale" + WITH_LOADTEST: "cert-manager",
}
# The kustomizations with the load generator (components/loadtest).
LOADTEST = ("base" + WITH_LOADTEST, "overlays/small-loadtest", "overlays/scale" + WITH_LOADTEST)
LOADTEST_MASTER, LOADTEST_WORKER = "vfio-loadtest-master", "vfio-loadtest-worker"
LOADTEST_SECRET = "vfio-loadtest-tls"
LOADTEST_PRINCIPAL = "spiffe://vfio-mlx5-emu/loadtest"
LOADTEST_WORKER_POD = {
    "app.kubernetes.io/name": "vfio-loadtest",
    "app.kubernetes.io/component": "loadtest-worker",
}
SERVICES = ("fwemu", "vfio-driver")  # the workloads of base
# The Secrets components/mtls mounts: server, the drivers' firmware link, probes.
SERVER_SECRET, DRIVER_SECRET, PROBE_SECRET = (
    "vfio-server-tls",
    "vfio-driver-client-tls",
    "vfio-probe-tls",
)
SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt"}  # kubernetes.io/tls, plus cert-manager's CA
ADMIN = "spiffe://vfio-mlx5-emu/admin"
MIGRATION_CLIENT = {"vfio-mlx5-emu/migration-client": "true"}
ADMIN_POD = {"vfio-mlx5-emu/admin": "true"}
LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of")
FIRMWARE = {"app.kubernetes.io/name": "fwemu", "app.kubernetes.io/component": "firmware"}
DRIVER = {"app.kubernetes.io/name": "vfio-driver", "app.kubernetes.io/component": "driver"}

Obj = dict[str, Any]


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing, and CI runs these checks (.ci/run installs it)")
    pytest.skip(f"{what} is missing")


@functools.cache
def _render(kustomization: str) -> tuple[Obj, ...] | str:
    """The rendered objects, or why rendering failed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return "kubectl"
    with tempfile.TemporaryDirectory() as tmp:
        if kustomization.endswith(WITH_LOADTEST):
            # kustomize takes other directories by relative paths only.
            here = Path(tmp)
            (here / "kustomization.yaml").write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "kustomize.config.k8s.io/v1beta1",
                        "kind": "Kustomization",
                        **({"namespace": "vfio"} if MTLS[kustomization] else {}),
                        "resources": [
                            os.path.relpath(K8S / kustomization.removesuffix(WITH_LOADTEST), here)
                        ],
                        "components": [
                            os.path.relpath(K8S / c, here)
                            for c in LOADTEST_COMPONENTS[: 2 if MTLS[kustomization] else 1]
                        ],
                    }
                )
            )
        else:
            here = K8S / kustomization
        done = subprocess.run(
            [kubectl, "kustomize", str(here)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if done.returncode != 0:
        return f"error: kubectl kustomize {kustomization} failed: {done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def rendered(kustomization: str) -> tuple[Obj, ...]:
    got = _render(kustomization)
    if got == "kubectl":
        _missing("kubectl")
    assert not isinstance(got, str), got
    return got


@pytest.fixture(name="objects", params=list(KUSTOMIZATIONS))
def objects_fixture(request: pytest.FixtureRequest) -> Iterator[tuple[str, tuple[Obj, ...]]]:
    yield request.param, rendered(request.param)


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv
    except ImportError:
        _missing("kubernetes-validate (pip install -e '.[test]')")
    return kv


def one(objects: tuple[Obj, ...], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name}"
    return found[0]


def workloads(objects: tuple[Obj, ...]) -> list[Obj]:
    return [o for o in objects if o["kind"] in ("StatefulSet", "Deployment")]


# The services' workloads (kind, name): every kustomization has them.
SERVICE_WORKLOADS = (("StatefulSet", "fwemu"), ("Deployment", "vfio-driver"))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


# The drivers' migration agent: a second container of every driver pod.
AGENT = "migration-agent"


def container(obj: Obj, name: str | None = None) -> Obj:
    """A workload's container `name`; by default its own, the one named as the
    workload's app.kubernetes.io/name (a driver pod also runs its agent)."""
    template = obj["spec"]["template"]
    wanted = name or template["metadata"]["labels"]["app.kubernetes.io/name"]
    (c,) = [c for c in template["spec"]["containers"] if c["name"] == wanted]
    found: Obj = c
    return found


def container_args(obj: Obj, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The container's args through the service's own command-line parser."""
    c = container(obj)
    assert "command" not in c, "args only: the image's ENTRYPOINT (tini) stays PID 1"
    return parser.parse_args(c["args"][1:])


def workload(objects: tuple[Obj, ...], name: str) -> tuple[Obj, argparse.Namespace]:
    """The firmware's StatefulSet or the driver's Deployment, and its args."""
    if name == "fwemu":
        obj = one(objects, "StatefulSet", name)
        return obj, container_args(obj, fwemu_parser())
    obj = one(objects, "Deployment", name)
    return obj, container_args(obj, driver_parser())


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def named_ports(obj: Obj, name: str | None = None) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(obj, name)["ports"]}


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of an env value ($$ is a literal $)."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


def container_env(
    obj: Obj, objects: tuple[Obj, ...], namespace: str, name: str | None = None
) -> dict[str, str]:
    """The container's environment as the kubelet gives it (downward API and
    ConfigMap references resolved, $(VAR) expanded)."""
    c = container(obj, name)
    env: dict[str, str] = {}
    for e in c.get("env", []):
        source = e.get("valueFrom")
        if source is None:
            env[e["name"]] = expand(e["value"], env)
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.namespace"
            env[e["name"]] = namespace
        else:
            ref = source["configMapKeyRef"]
            env[e["name"]] = str(one(objects, "ConfigMap", ref["name"])["data"][ref["key"]])
    return env


# --- rendering and schemas --------------------------------------------------------------------


def check_servicemonitor(sm: Obj) -> None:
    """monitoring.coreos.com/v1 ServiceMonitor (no schema in kubernetes-validate):
    the fields this project uses, with their types."""
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", sm["metadata"]["name"])
    spec = sm["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    labels = spec["selector"]["matchLabels"]
    assert labels and all(isinstance(v, str) for v in labels.values())
    assert spec["endpoints"]
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert isinstance(ep["port"], str) and ep["path"].startswith("/")
        for key in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"[0-9]+(ms|s|m|h)", ep.get(key, "1s")), ep


def check_cert_manager(obj: Obj) -> None:
    """cert-manager.io/v1 Issuer and Certificate (no schema in
    kubernetes-validate): the fields this project uses, with their types."""
    assert obj["apiVersion"] == "cert-manager.io/v1", obj["apiVersion"]
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    spec = obj["spec"]
    if obj["kind"] == "Issuer":
        assert len(spec) == 1 and set(spec) <= {"selfSigned", "ca"}, spec
        if "ca" in spec:
            assert set(spec["ca"]) == {"secretName"}
        return
    assert obj["kind"] == "Certificate", obj["kind"]
    assert set(spec) <= {
        "secretName", "commonName", "dnsNames", "ipAddresses", "uris", "usages", "isCA",
        "duration", "privateKey", "issuerRef",
    }, spec  # fmt: skip
    assert isinstance(spec["secretName"], str) and spec["secretName"]
    assert set(spec["issuerRef"]) == {"name", "kind"} and spec["issuerRef"]["kind"] == "Issuer"
    assert spec["privateKey"] == {"algorithm": "ECDSA", "size": 256}
    for key in ("dnsNames", "ipAddresses", "uris", "usages"):
        assert all(isinstance(v, str) and v for v in spec.get(key, [])), key
    assert set(spec.get("usages", [])) <= {"server auth", "client auth", "digital signature"}
    assert spec.get("commonName") or spec.get("dnsNames") or spec.get("uris")
    assert re.fullmatch(r"[0-9]+h", spec.get("duration", "1h"))


def validate(obj: Obj) -> None:
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        check_servicemonitor(obj)
    elif obj["apiVersion"].startswith("cert-manager.io/"):
        check_cert_manager(obj)
    else:
        kubernetes_validate().validate(obj, KUBERNETES_VERSION, strict=True)


def test_every_rendered_object_validates_strictly(objects: tuple[str, tuple[Obj, ...]]) -> None:
    _, objs = objects
    for obj in objs:
        validate(obj)


def test_strict_validation_catches_a_misspelled_field() -> None:
    """The check above is not vacuous: strict validation refuses an unknown
    field, and the ServiceMonitor check a misnamed one."""
    kv = kubernetes_validate()
    objs = rendered("overlays/scale")
    sts = one(objs, "StatefulSet", "fwemu")
    bad = {**sts, "spec": {**sts["spec"], "replica": 3}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, KUBERNETES_VERSION, strict=True)
    sm = one(objs, "ServiceMonitor", "fwemu")
    with pytest.raises(AssertionError):
        check_servicemonitor({**sm, "spec": {**sm["spec"], "endpoint": []}})
    cert = one(objs, "Certificate", SERVER_SECRET)
    with pytest.raises(AssertionError):
        check_cert_manager({**cert, "spec": {**cert["spec"], "dnsName": ["x"]}})


def test_the_servicemonitor_component_scrapes_both_metrics_ports() -> None:
    objs = rendered("overlays/scale")
    for name, labels in (("fwemu", FIRMWARE), ("vfio-driver", DRIVER)):
        sm = one(objs, "ServiceMonitor", name)
        svc = one(objs, "Service", name)
        assert sm["spec"]["selector"]["matchLabels"] == labels
        assert selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
        assert not any(
            selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
            for s in objs
            if s["kind"] == "Service" and s is not svc
        )
        assert [ep["port"] for ep in sm["spec"]["endpoints"]] == ["metrics"]
        assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    for kustomization, (_, _, monitors) in KUSTOMIZATIONS.items():
        has = any(o["kind"] == "ServiceMonitor" for o in rendered(kustomization))
        assert has == monitors, kustomization


# --- sharding ---------------------------------------------------------------------------------


def test_the_shard_map_names_every_statefulset_pod(objects: tuple[str, tuple[Obj, ...]]) -> None:
    """The drivers' VFIO_FIRMWARE_SHARDS, as the kubelet expands it, parses to
    exactly the StatefulSet's pods through its headless Service on the gRPC
    port, as many as the StatefulSet has replicas."""
    kustomization, objs = objects
    shards, drivers, _ = KUSTOMIZATIONS[kustomization]
    sts = one(objs, "StatefulSet", "fwemu")
    dep = one(objs, "Deployment", "vfio-driver")
    namespace = dep["metadata"].get("namespace", "default")
    assert sts["metadata"].get("namespace", "default") == namespace
    svc = one(objs, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    grpc_port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["grpc"]

    env = container_env(dep, objs, namespace)
    m = parse_shards(env[SHARDS_ENV])
    assert m.template is not None, "the manifests use the TEMPLATE@N form"
    assert sts["spec"]["replicas"] == m.count == shards
    assert dep["spec"]["replicas"] == drivers
    assert m.addresses == tuple(
        f"{sts['metadata']['name']}-{k}.{svc['metadata']['name']}.{namespace}"
        f".svc.cluster.local:{grpc_port}"
        for k in range(shards)
    )
    _, fw = workload(objs, "fwemu")
    assert port_of(fw.listen) == grpc_port == named_ports(sts)["grpc"]


def test_each_firmware_pod_is_its_own_shard(objects: tuple[str, tuple[Obj, ...]]) -> None:
    sts, args = workload(objects[1], "fwemu")
    assert args.command == "serve" and args.shard == "auto"
    assert args.listen == "0.0.0.0:50051" and args.metrics_listen == "0.0.0.0:9101"
    assert sts["spec"]["podManagementPolicy"] == "Parallel"


def test_the_scenario_is_mounted_and_parses(
    objects: tuple[str, tuple[Obj, ...]],
) -> None:
    _, objs = objects
    sts, args = workload(objs, "fwemu")
    pod = sts["spec"]["template"]["spec"]
    (mount,) = [
        m for m in container(sts)["volumeMounts"] if args.scenario.startswith(m["mountPath"])
    ]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    cm = one(objs, "ConfigMap", volume["configMap"]["name"])
    key = args.scenario[len(mount["mountPath"]) :].lstrip("/")
    doc = parse_scenario(cm["data"][key], key)
    assert sum(g.count for g in doc.vfs) > 0


def test_the_driver_serves_every_shard_over_the_network(
    objects: tuple[str, tuple[Obj, ...]],
) -> None:
    dep, args = workload(objects[1], "vfio-driver")
    assert args.command == "serve" and args.memory == "remote"
    assert args.firmware is None and args.firmware_shards is None, f"from {SHARDS_ENV}"
    assert args.listen == "0.0.0.0:50052" and args.metrics_listen == "0.0.0.0:9102"
    startup = container(dep)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > args.firmware_wait > 0


# --- pods -------------------------------------------------------------------------------------

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def probe_target(kustomization: str, probe: Obj) -> tuple[int, str, argparse.Namespace | None]:
    """(port, grpc.health.v1 service, the exec probe's grpc-health-check
    arguments) of a probe: the kubelet's own gRPC probe when plaintext, an
    exec probe presenting a client certificate under mTLS (the kubelet's
    cannot present one)."""
    kinds = set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"}
    if MTLS[kustomization] is None:
        assert kinds == {"grpc"}
        return probe["grpc"]["port"], probe["grpc"].get("service", ""), None
    assert kinds == {"exec"}
    program, *argv = probe["exec"]["command"]
    assert program == "grpc-health-check"
    args = healthcheck_parser().parse_args(argv)
    host, _, port = args.target.rpartition(":")
    assert host == "127.0.0.1", "over the pod's loopback, the server certificate names it"
    assert probe["timeoutSeconds"] > args.timeout
    return int(port), args.service, args


def test_every_container_has_requests_limits_and_health_probes(
    objects: tuple[str, tuple[Obj, ...]],
) -> None:
    """Probes ask grpc.health.v1 on the port the service listens on."""
    kustomization, objs = objects
    for name in ("fwemu", "vfio-driver"):
        w, args = workload(objs, name)
        listen = port_of(args.listen)
        for c in w["spec"]["template"]["spec"]["containers"]:
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) == {"cpu", "memory"}, (c["name"], kind)
            if c["name"] == AGENT:
                continue  # its probes: test_migration_agent.py
            for probe in PROBES:
                assert probe_target(kustomization, c[probe])[0] == listen, (c["name"], probe)
            assert {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"] == listen


def test_the_drivers_readiness_follows_its_firmware_and_liveness_does_not(
    objects: tuple[str, tuple[Obj, ...]],
) -> None:
    """Readiness asks vfio.v1.Vfio (NOT_SERVING while a firmware shard is
    unreachable: the pod leaves the Service); startup and liveness ask the
    server (""), which stays SERVING: a restart would not bring a firmware back.
    fwemu's probes all ask the server."""
    kustomization, objs = objects
    driver = container(workload(objs, "vfio-driver")[0])
    assert probe_target(kustomization, driver["readinessProbe"])[1] == VFIO_SERVICE
    for probe in ("startupProbe", "livenessProbe"):
        assert probe_target(kustomization, driver[probe])[1] == "", probe
    for c in workload(objs, "fwemu")[0]["spec"]["template"]["spec"]["containers"]:
        for probe in PROBES:
            assert probe_target(kustomization, c[probe])[1] == "", probe


# --- transport security -----------------------------------------------------------------------


def mounted_secrets(obj: Obj, name: str | None = None) -> dict[str, str]:
    """mount path -> Secret name of a workload's Secret volumes (in its
    container `name`, by default its own)."""
    pod = obj["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    c = container(obj, name)
    return {m["mountPath"]: secrets[m["name"]] for m in c["volumeMounts"] if m["name"] in secrets}


def secret_of(obj: Obj, path: str, name: str | None = None) -> str:
    """The Secret a file of the container comes from (its key: the file's name)."""
    directory, _, key = path.rpartition("/")
    assert key in SECRET_KEYS, path
    found = mounted_secrets(obj, name).get(directory)
    assert found is not None, f"nothing mounts a Secret at {directory}"
    return found


def tls_options(args: argparse.Namespace, prefix: str = "tls") -> tuple[str, str, str]:
    attr = prefix.replace("-", "_")
    ca = getattr(args, f"{attr}_client_ca" if prefix == "tls" else f"{attr}_ca")
    return getattr(args, f"{attr}_cert"), getattr(args, f"{attr}_key"), ca


def test_grpc_listens_on_the_pod_network_only_with_tls_or_insecure(
    objects: tuple[str, tuple[Obj, ...]],
) -> None:
    """The listen policy: 0.0.0.0 needs TLS or an explicit --insecure (base,
    with NetworkPolicy its only guard); the mtls component requires client
    certificates instead, and leaves no --insecure behind."""
    kustomization, objs = objects
    for name in ("fwemu", "vfio-driver"):
        _, args = workload(objs, name)
        server = tls.ServerTls(*tls_options(args)) if args.tls_cert else None
        tls.check_listen(args.listen, server, args.insecure)
        if MTLS[kustomization] is None:
            assert server is None and args.insecure, name
        else:
            assert server is not None and server.mutual and not args.insecure, name


WITH_MTLS = [k for k, source in MTLS.items() if source is not None]
WITH_CERT_MANAGER = [k for k, source in MTLS.items() if source == "cert-manager"]


@pytest.mark.parametrize("kustomization", WITH_MTLS)
def test_every_certificate_file_comes_from_the_secret_that_holds_it(kustomization: str) -> None:
    """Server certificate and CA, the driver's firmware link, the probes':
    each file is a key of the Secret mounted at its directory."""
    objs = rendered(kustomization)
    for name in ("fwemu", "vfio-driver"):
        w, args = workload(objs, name)
        for path in tls_options(args):
            assert secret_of(w, path) == SERVER_SECRET, (name, path)
        c = container(w)
        for probe in PROBES:
            _, _, health = probe_target(kustomization, c[probe])
            assert health is not None
            for path in (health.tls_ca, health.tls_cert, health.tls_key):
                assert secret_of(w, path) == PROBE_SECRET, (name, probe, path)
    dep, args = workload(objs, "vfio-driver")
    for path in tls_options(args, "firmware-tls"):
        assert secret_of(dep, path) == DRIVER_SECRET, path
    sts, _ = workload(objs, "fwemu")
    assert DRIVER_SECRET not in mounted_secrets(sts).values(), "fwemu is no driver"


def issued_principal(cert: Obj) -> str:
    """The principal the services see for a Certificate's: URI SAN, else CN."""
    spec = cert["spec"]
    return str(spec["uris"][0]) if spec.get("uris") else str(spec["commonName"])


@pytest.mark.parametrize("kustomization", WITH_MTLS)
def test_the_principals_match_the_roles(kustomization: str) -> None:
    """fwemu takes the drivers' firmware link as a driver; both services take
    the admin certificate as admin; the probes' certificate has no role. With
    components/loadtest-mtls fwemu takes the load test's principal as an admin
    too (its users create VFs), the drivers do not (a migration client there)."""
    objs = rendered(kustomization)
    _, fw = workload(objs, "fwemu")
    _, drv = workload(objs, "vfio-driver")
    assert fw.driver_principals == {DEFAULT_DRIVER_PRINCIPAL}
    assert drv.admin_principals == {ADMIN}
    loadtest = {LOADTEST_PRINCIPAL} if kustomization in LOADTEST else set()
    assert fw.admin_principals == {ADMIN, *loadtest}
    if MTLS[kustomization] == "cert-manager":
        certs = {c["spec"]["secretName"]: c for c in objs if c["kind"] == "Certificate"}
        assert issued_principal(certs[DRIVER_SECRET]) in fw.driver_principals
        assert issued_principal(certs["vfio-admin-tls"]) == ADMIN
        probe = issued_principal(certs[PROBE_SECRET])
        assert probe not in fw.driver_principals | fw.admin_principals
        # Issued with or without the load generator; a role only with it.
        assert issued_principal(certs[LOADTEST_SECRET]) == LOADTEST_PRINCIPAL
        assert "client auth" in certs[LOADTEST_SECRET]["spec"]["usages"]
        assert "client auth" in certs[DRIVER_SECRET]["spec"]["usages"]
        assert "server auth" in certs[SERVER_SECRET]["spec"]["usages"]


def name_matches(pattern: str, host: str) -> bool:
    """A certificate's DNS name against a host (a leading '*.' is one label)."""
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return pattern == host


@pytest.mark.parametrize("kustomization", WITH_CERT_MANAGER)
def test_cert_manager_issues_every_secret_and_names_every_address_dialled(
    kustomization: str,
) -> None:
    """The server certificate covers every firmware shard the drivers dial
    (their shard map, as the kubelet expands it), the driver Service's names
    and the probes' loopback; the CA chain is one Issuer from a self-signed root."""
    objs = rendered(kustomization)
    certs = {c["spec"]["secretName"]: c for c in objs if c["kind"] == "Certificate"}
    issuers = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Issuer"}
    for secret in (SERVER_SECRET, DRIVER_SECRET, PROBE_SECRET):
        issuer = issuers[certs[secret]["spec"]["issuerRef"]["name"]]
        ca = certs[issuer["spec"]["ca"]["secretName"]]
        assert ca["spec"]["isCA"] is True
        assert "selfSigned" in issuers[ca["spec"]["issuerRef"]["name"]]["spec"]
    dep = one(objs, "Deployment", "vfio-driver")
    namespace = dep["metadata"]["namespace"]
    shards = parse_shards(container_env(dep, objs, namespace)[SHARDS_ENV])
    server = certs[SERVER_SECRET]["spec"]
    dialled = [a.rpartition(":")[0] for a in shards.addresses]
    dialled += [f"vfio-driver.{namespace}.svc.cluster.local", f"vfio-driver.{namespace}.svc"]
    for host in dialled:
        assert any(name_matches(p, host) for p in server["dnsNames"]), host
    assert "127.0.0.1" in server["ipAddresses"]
    assert not any(name_matches(p, "fwemu-0.fwemu.elsewhere.svc") for p in server["dnsNames"])


def test_containers_run_locked_down(objects: tuple[str, tuple[Obj, ...]]) -> None:
    _, objs = objects
    for w in workloads(objs):
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == UID
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["terminationGracePeriodSeconds"] > 5  # the services drain for 5 s
        assert pod["automountServiceAccountToken"] is False
        # The load generator runs the image built with the loadtest extra.
        image = IMAGE if w["metadata"]["name"] in SERVICES else f"{IMAGE}-loadtest"
        for c in pod["containers"]:
            assert re.fullmatch(rf"{image}:[\w.-]+", c["image"]), c["image"]
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}


def test_objects_carry_the_recommended_labels(objects: tuple[str, tuple[Obj, ...]]) -> None:
    _, objs = objects
    for o in objs:
        if o["kind"] in ("ConfigMap", "Namespace"):
            continue
        labels = o["metadata"]["labels"]
        assert all(labels.get(k) for k in LABELS), (o["kind"], o["metadata"]["name"])
        assert labels["app.kubernetes.io/part-of"] == "vfio-mlx5-emu"
    for w in workloads(objs):
        template = w["spec"]["template"]["metadata"]["labels"]
        assert all(template.get(k) for k in LABELS)
        assert selects(w["spec"]["selector"]["matchLabels"], template)


def test_each_workload_has_a_disruption_budget(objects: tuple[str, tuple[Obj, ...]]) -> None:
    """The services' workloads; the load generator has none (a drain may end
    a load run: it is no service anybody depends on)."""
    _, objs = objects
    pdbs = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    for w in workloads(objs):
        template = w["spec"]["template"]["metadata"]["labels"]
        if w["metadata"]["name"] not in SERVICES:
            assert not any(selects(p["spec"]["selector"]["matchLabels"], template) for p in pdbs)
            continue
        (pdb,) = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], template)]
        assert pdb["spec"] == {**pdb["spec"], "maxUnavailable": 1}


# --- network ----------------------------------------------------------------------------------


def test_services_are_headless_with_named_ports(objects: tuple[str, tuple[Obj, ...]]) -> None:
    """The services' (the load generator's master Service: test_loadtest.py)."""
    kustomization, objs = objects
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    loadtest = {"vfio-loadtest"} if kustomization in LOADTEST else set()
    assert set(services) == {"fwemu", "vfio-driver", *loadtest}
    for w in (one(objs, kind, name) for kind, name in SERVICE_WORKLOADS):
        (svc,) = [
            s
            for s in services.values()
            if selects(s["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert svc["spec"]["clusterIP"] == "None"
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert set(ports) == {"grpc", "metrics"}
        container = named_ports(w)
        for name, p in ports.items():
            assert p["targetPort"] == name and container[name] == p["port"]
    # A shard has no stand-in: its name resolves while it is not ready; a
    # driver that is not ready is not offered to clients.
    assert services["fwemu"]["spec"]["publishNotReadyAddresses"] is True
    assert services["vfio-driver"]["spec"]["publishNotReadyAddresses"] is False


def sorted_items(labels: dict[str, str]) -> list[tuple[str, str]]:
    return sorted(labels.items())


def ingress_rules(objs: tuple[Obj, ...], labels: dict[str, str]) -> list[Obj]:
    """The rules of the one NetworkPolicy selecting pods with `labels`;
    every rule names both its ports and its peers (else it opens them all)."""
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    (np,) = [p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], labels)]
    assert np["spec"]["policyTypes"] == ["Ingress"]
    for rule in np["spec"]["ingress"]:
        assert rule.get("ports") and rule.get("from"), "a rule without ports or peers opens all"
    return list(np["spec"]["ingress"])


def split_rules(obj: Obj, rules: list[Obj]) -> tuple[Obj, Obj]:
    """(the gRPC port's rule, the metrics port's rule); the one other rule a
    pod's policy may have is its migration agent's port's, where the pod runs
    one (test_migration_agent.py checks that rule)."""
    ports = named_ports(obj)
    by_port = {tuple(p["port"] for p in r["ports"]): r for r in rules}
    expected = {(ports["grpc"],), (ports["metrics"],)}
    if any(c["name"] == AGENT for c in obj["spec"]["template"]["spec"]["containers"]):
        expected.add((named_ports(obj, AGENT)["migration"],))
    assert set(by_port) == expected, by_port
    return by_port[(ports["grpc"],)], by_port[(ports["metrics"],)]


def test_metrics_ports_take_prometheus_only(objects: tuple[str, tuple[Obj, ...]]) -> None:
    _, objs = objects
    for obj in (one(objs, kind, name) for kind, name in SERVICE_WORKLOADS):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        _, metrics = split_rules(obj, ingress_rules(objs, labels))
        for peer in metrics["from"]:
            assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def test_only_drivers_and_admin_pods_reach_the_firmwares_grpc_port(
    objects: tuple[str, tuple[Obj, ...]],
) -> None:
    """And, with components/loadtest, its workers (for Scenario)."""
    kustomization, objs = objects
    sts = one(objs, "StatefulSet", "fwemu")
    dep = one(objs, "Deployment", "vfio-driver")
    fw_labels = sts["spec"]["template"]["metadata"]["labels"]
    driver_labels = dep["spec"]["template"]["metadata"]["labels"]
    grpc_rule, _ = split_rules(sts, ingress_rules(objs, fw_labels))
    admitted = []
    for peer in grpc_rule["from"]:
        assert set(peer) == {"podSelector"}, "pods of this namespace only"
        selector = peer["podSelector"]["matchLabels"]
        assert selector, "an empty selector admits every pod"
        assert not selects(selector, fw_labels) and not selects(selector, MIGRATION_CLIENT)
        admitted.append(selector)
    assert any(selects(s, driver_labels) for s in admitted)
    assert ADMIN_POD in admitted
    loadtest = [LOADTEST_WORKER_POD] if kustomization in LOADTEST else []
    expected = [DRIVER, ADMIN_POD, *loadtest]
    assert sorted(map(sorted_items, admitted)) == sorted(map(sorted_items, expected))


def test_only_migration_clients_and_admin_pods_reach_the_drivers_grpc_port(
    objects: tuple[str, tuple[Obj, ...]],
) -> None:
    """Named workloads: pods labelled as migration clients or admins, of this
    namespace or of namespaces labelled to hold clients; never any pod of any
    namespace (the NetworkPolicy before issue 12). With components/loadtest,
    its workers of this namespace too."""
    kustomization, objs = objects
    dep = one(objs, "Deployment", "vfio-driver")
    driver_labels = dep["spec"]["template"]["metadata"]["labels"]
    grpc_rule, _ = split_rules(dep, ingress_rules(objs, driver_labels))
    pods = []
    loadtest = 0
    for peer in grpc_rule["from"]:
        assert set(peer) <= {"podSelector", "namespaceSelector"} and "podSelector" in peer
        selector = peer["podSelector"]["matchLabels"]
        if selector == LOADTEST_WORKER_POD and kustomization in LOADTEST:
            assert set(peer) == {"podSelector"}, "the load test's workers of this namespace"
            loadtest += 1
            continue
        assert selector in (MIGRATION_CLIENT, ADMIN_POD), selector
        if "namespaceSelector" in peer:
            assert peer["namespaceSelector"]["matchLabels"], "not every namespace"
        pods.append(selector)
    assert MIGRATION_CLIENT in pods and ADMIN_POD in pods
    assert loadtest == (kustomization in LOADTEST)
